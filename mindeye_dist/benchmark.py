"""One-run performance harness: training throughput and FLOP/s, the machine's matmul peak, a
reference-style loop, the data loader (local vs S3) and ZeRO memory per rank, side by side.

    result = run_benchmark(BenchmarkOptions(quick=True))
    print(format_markdown(result))

Sections (each a function in :mod:`mindeye_dist.bench`):

1. ``peak``: dense n x n matmul FLOP/s at the training dtype (``metrics.measure_matmul_peak``, same
   torch thread count as training), measured before and after the training section; the higher
   is the denominator of ``fraction_of_peak``. On a GPU also the datasheet peak (MFU).
2. ``train``: the real training step (``bench.training``) per preset and micro-batch size on
   synthetic in-memory batches; for the demo preset also fed by the real loader (data-wait
   share); for the largest preset a torch.profiler breakdown and proposed-engine "what-if" runs.
3. ``reference``: the MindEye-reference-style loop (frozen ViT-L/14 run on every batch, plain
   AdamW) on the same preset and micro-batch (``bench.reference``).
3b. ``mindeye1``: the reference comparison at MindEye1 size (``bench.mindeye1``): our step against
   a step built from the references' own model code (MindEye1's BrainNetwork, dalle2-pytorch's
   prior, plain AdamW) with its frozen ViT-L/14, at 15,724 voxels, 257x768 tokens, the prior, the
   references' batch of 32, each side in its own process with its peak RSS; the source of the
   ``train_vs_reference_ratio`` and ``train_vs_cached_reference_ratio`` headlines when measured.
4. ``data``: loader samples/s and MB/s at NSD sizes, local vs loopback S3 (``bench.data``).
5. ``memory``: ZeRO 0-3 model-state RSS per rank with 2 ranks, fp32 and bf16, vs ``estimate_memory`` (``bench.memory``).

Headline ratios sit at the top level of the result (names are a contract, see
:data:`HEADLINES`), each also under ``targets`` with its first-pass target and whether it is met.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from mindeye_dist.bench.common import PresetSpec, count, device_label, experiment_config, host_info, log, \
    mem_available_bytes

HEADLINES = ("train_vs_reference_ratio", "train_vs_cached_reference_ratio", "train_flops_fraction_of_peak", "loader_vs_consumption_ratio",
             "s3_vs_local_ratio", "zero3_vs_zero0_memory_ratio", "estimate_vs_measured_memory_ratio", "device")

TARGETS = {
    "train_vs_reference_ratio": (">=", 3.0),
    "train_vs_cached_reference_ratio": (">=", 2.0),
    "train_flops_fraction_of_peak": (">=", 0.60),
    "loader_vs_consumption_ratio": (">=", 5.0),
    "s3_vs_local_ratio": (">=", 0.80),
    "zero3_vs_zero0_memory_ratio": ("<=", 0.55),
    "estimate_vs_measured_memory_ratio": ("within", 0.15),
}

SECTIONS = ("peak", "train", "reference", "mindeye1", "data", "memory")


@dataclass
class BenchmarkOptions:
    presets: list[str] = field(default_factory=lambda: ["tiny", "demo", "scale-200m"])
    """Training presets (``bench.common.PresetSpec`` syntax); the last one is the "large" preset.
    ``scale-200m`` (214M params at its nominal dims) is the default large preset: ``mindeye1-bp``
    (948M) peaks at ~21 GiB RSS in fp32 with the shipped engine, too close to a shared 24 GiB box;
    pass ``--preset ... --preset mindeye1-bp`` where memory allows (it falls back when it does not fit)."""
    micro_batch_sizes: list[int] = field(default_factory=lambda: [8, 32, 128, 512, 1024])
    """The wide Linears of the large presets reach the matmul's speed only from a few hundred rows
    up, and the optimizer's fixed cost per step is amortised over more samples."""
    repeats: int = 5
    """Timed steps per (preset, micro-batch); the median is reported."""
    warmup: int = 1
    precision: Optional[str] = None
    """fp32 on CPU, bf16 on GPU by default."""
    ds_config: str = "ds_configs/zero0.json"
    step_budget_s: float = 45.0
    """Cap on timed seconds per (preset, micro-batch); at least 2 steps are timed."""
    large_fallback: str = "scale-200m"
    """Used instead of the large preset when its fp32 training memory does not fit MemAvailable."""
    profile: bool = True
    variants: bool = True
    variant_repeats: int = 2
    variant_micro_batch: int = 512
    """Micro-batch of the runs that turn each shipped speed-up off (the best-FLOP/s one when not measured)."""
    host_memory: str = "auto"
    """``train.host_memory`` for this process (``mindeye_dist.hostmem``), as ``train.run`` applies it
    (``auto``: reuse on CPU, glibc's defaults on GPU)."""
    real_loader_preset: str = "demo"
    real_loader_micro_batch: int = 32
    real_loader_steps: int = 40
    real_loader_workers: int = 1
    """``data.num_workers`` default of the experiment config."""
    real_loader_train_samples: Optional[int] = None
    """Override the demo dataset's train size (None: the full demo dataset, 6000)."""
    reference_preset: str = "demo"
    reference_micro_batch: int = 32
    reference_steps: int = 2
    reference_encoder: str = "ViT-L-14"
    mindeye1_hidden: Optional[int] = None
    """Backbone width of the MindEye1-size comparison (None: the widest of 4096/2048/1024/512 whose
    step fits MemAvailable, ``bench.mindeye1.choose_hidden``)."""
    mindeye1_micro_batch: int = 32
    """The references' batch (MindEye1: 32 per GPU)."""
    mindeye1_rounds: int = 2
    """Alternations of the two sides' processes (each times ``mindeye1_steps`` steps after a warm-up)."""
    mindeye1_steps: int = 2
    mindeye1_shape: Optional[dict[str, Any]] = None
    """``bench.reference.MindEye1Shape`` overrides (tests shrink it); None: MindEye1's."""
    mindeye1_encoder_config: Optional[str] = None
    """An open_clip model config file registered in the reference's process (tests: a tiny ViT)."""
    consumption_preset: str = "mindeye1-bp"
    """The model whose samples/s the loader must outrun: its measured samples/s when it is among the
    training presets, else its compute ceiling (measured matmul peak / its FLOPs per sample), which
    no training step can exceed, so the ratio is a lower bound."""
    data_train_samples: int = 2048
    """About 1 GB at NSD sizes: each epoch starts fresh worker processes, and with 512 samples
    (0.6 s epochs) their start-up was a third of the measurement."""
    data_repeats: int = 3
    data_workers: int = 2
    data_batch_size: int = 32
    data_dims: Optional[dict[str, int]] = None
    """Per-sample dims of the loader dataset (None: NSD subject 1, 15,724 voxels, 257x768 targets)."""
    memory_preset: str = "scale-200m"
    memory_micro_batch: int = 8
    memory_stages: tuple[int, ...] = (0, 1, 2, 3)
    memory_small_bucket_stages: tuple[int, ...] = ()
    """Also measure these stages with 5e6-element buckets (``bench.memory.small_bucket_config``)."""
    memory_precisions: tuple[str, ...] = ("fp32", "bf16")
    """Each is measured at every stage: DeepSpeed keeps different copies per precision (an fp32
    master clone at ZeRO-1/2/3 even in fp32, see ``mindeye_dist.estimate``)."""
    memory_headline_precision: Optional[str] = None
    """Precision of ``zero3_vs_zero0_memory_ratio`` (None: the run's training precision, fp32 on
    CPU, bf16 on GPU); the other precisions' ratios are in its note and under ``memory.by_precision``."""
    matmul_n: int = 4096
    matmul_repeats: int = 5
    sections: tuple[str, ...] = SECTIONS
    work_dir: Optional[str] = None
    """Datasets are built here and reused by later runs (default: a temporary directory)."""
    wait_for_idle_s: float = 0.0
    """Wait up to this long for the 1-minute load average to drop below ``idle_load`` first."""
    idle_load: float = 0.8
    quick: bool = False
    quick_applied: bool = False
    """Set by :meth:`apply_quick` so explicit values given after it are kept."""
    command: str = ""

    def apply_quick(self) -> "BenchmarkOptions":
        """About a minute on the 2-core CPU box: small presets and sizes, one reference step."""
        return dataclasses.replace(
            self, presets=["tiny", "demo"], micro_batch_sizes=[8, 32], repeats=3, step_budget_s=5.0,
            variant_repeats=2, real_loader_steps=10, real_loader_train_samples=640, reference_micro_batch=2,
            reference_steps=1, consumption_preset="demo", data_train_samples=96, data_repeats=1,
            memory_preset="scale-10m", memory_stages=(0, 3), memory_small_bucket_stages=(), matmul_n=2048,
            matmul_repeats=5, sections=tuple(x for x in self.sections if x != "mindeye1"), quick=True, quick_applied=True)


# ---------------------------------------------------------------------------------------------


def _peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    from mindeye_dist.metrics import measure_matmul_peak

    return measure_matmul_peak(dtype=dtype, n=n, device=device, repeats=repeats)


def _fits(spec: PresetSpec, opts: BenchmarkOptions, precision: str) -> tuple[bool, dict[str, Any]]:
    """fp32 ZeRO-0 training memory at the largest micro-batch against MemAvailable.

    Model states + the biggest transient of the step (activations; DeepSpeed's world-of-one
    all-reduce, which flattens gradients in buckets of at least 500M elements or the largest
    gradient; the engine's fp32 finite check ``isfinite(grad).any()``, ~6 bytes per element of the
    largest gradient), +10%, + 2 GiB for the process and its neighbours. mindeye1-bp measured
    21 GiB RSS against 14.1 GiB of model states.
    """
    mb = max(opts.micro_batch_sizes)
    cfg = experiment_config(spec, mb, precision=precision)
    mem = count(spec, cfg, world_size=1, micro_batch=mb, precision=precision, flops=False)["memory"]
    largest = mem["largest_layer_params"]
    transient = max(mem["activations_bytes"], 4 * max(min(mem["total_params"], 500_000_000), largest), 6 * largest)
    need = int(1.1 * (mem["stages"]["0"]["model_states_bytes"] + transient)) + 2 * 2**30
    avail = mem_available_bytes()
    return (avail is None or need <= avail), {"needed_bytes": need, "mem_available_bytes": avail}


def _ensure_dataset(preset: str, work_dir: str, n_train: Optional[int]) -> str:
    """The synthetic dataset ``preset`` (tiny or demo) under ``work_dir``, built once."""
    from mindeye_dist.data import build_synthetic_dataset
    from mindeye_dist.data.meta import META_NAME

    path = os.path.join(work_dir, f"{preset}_{n_train or 'full'}")
    if not os.path.exists(os.path.join(path, META_NAME)):
        t = time.perf_counter()
        extra = {"n_train": n_train} if n_train else {}
        build_synthetic_dataset(preset, path, seed=0, progress=False, **extra)
        log(f"{preset} dataset built in {time.perf_counter() - t:.1f} s")
    return path


def _train_section(opts: BenchmarkOptions, device: torch.device, precision: str, peak: float,
                   datasheet: Optional[float], work_dir: str) -> dict[str, Any]:
    from mindeye_dist.bench.training import measure_preset

    out: dict[str, Any] = {"presets": {}, "substitutions": {}}
    names = list(opts.presets)
    for i, name in enumerate(names):
        spec = PresetSpec.parse(name)
        is_large = i == len(names) - 1 and len(names) > 1
        mbs = sorted(set(opts.micro_batch_sizes) | ({opts.reference_micro_batch} if name == opts.reference_preset else set()))
        ok, need = _fits(spec, opts, precision)
        if not ok:
            log(f"{name} needs {need['needed_bytes'] / 2**30:.1f} GiB, {need['mem_available_bytes'] / 2**30:.1f} available: "
                f"using {opts.large_fallback}")
            out["substitutions"][name] = {"used": opts.large_fallback, **need}
            spec = PresetSpec.parse(opts.large_fallback)
        real = None
        if name == opts.real_loader_preset and "train" in opts.sections:
            real = {"url": _ensure_dataset(spec.preset, work_dir, opts.real_loader_train_samples),
                    "micro_batch": opts.real_loader_micro_batch, "steps": opts.real_loader_steps, "warmup": 2,
                    "num_workers": opts.real_loader_workers}
        log(f"training: {spec.name} at micro-batches {mbs}")
        res = measure_preset(spec, mbs, repeats=opts.repeats, warmup=opts.warmup, device=device, precision=precision,
                             ds_config=opts.ds_config, peak=peak, datasheet_peak=datasheet, budget_s=opts.step_budget_s,
                             profile=opts.profile and is_large, variants=opts.variants and is_large,
                             variant_repeats=opts.variant_repeats, variant_micro_batch=opts.variant_micro_batch,
                             real_loader=real)
        res["is_large"] = is_large
        out["presets"][name] = res
    return out


def _wait_for_idle(timeout_s: float, threshold: float) -> float:
    """Sleep until the 1-minute load average is below ``threshold`` (at most ``timeout_s``)."""
    if timeout_s <= 0 or not hasattr(os, "getloadavg"):
        return 0.0
    t0 = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - t0 < timeout_s:
        log(f"waiting for an idle machine: load average {os.getloadavg()[0]:.2f} >= {threshold}")
        time.sleep(15)
    return time.monotonic() - t0


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _headlines(result: dict[str, Any], opts: BenchmarkOptions) -> dict[str, Any]:
    notes: dict[str, str] = {}
    train = result.get("train", {}).get("presets", {})
    h: dict[str, Any] = {k: None for k in HEADLINES}
    h["device"] = result["device"]
    ref = result.get("reference")
    me1 = result.get("mindeye1")
    if me1:
        sps, shape = me1["samples_per_s"], me1["shape"]
        basis = (f"MindEye1 shape ({shape['n_voxels']:,} voxels, {shape['n_tokens']}x{shape['token_dim']} tokens, prior; "
                 f"hidden {me1['hidden']}, "
                 f"{me1['params']['ours'] / 1e6:.0f}M params), micro-batch {me1['micro_batch']}, fp32: ours {sps['ours']:.3g}")
        h["train_vs_reference_ratio"] = me1["ratio_vs_reference_with_encoder"]
        notes["train_vs_reference_ratio"] = f"{basis} vs reference {sps['reference_with_encoder']:.3g} samples/s (frozen ViT-L/14 every step)"
        h["train_vs_cached_reference_ratio"] = me1["ratio_vs_reference_cached_targets"]
        notes["train_vs_cached_reference_ratio"] = f"{basis} vs reference {sps['reference_cached_targets']:.3g} samples/s (targets cached)"
    elif ref and opts.reference_preset in train:
        row = next((r for r in train[opts.reference_preset]["rows"] if r["micro_batch"] == ref["micro_batch"]), None)
        if row:
            h["train_vs_reference_ratio"] = _ratio(row["samples_per_s"], ref["samples_per_s"])
            notes["train_vs_reference_ratio"] = (f"{opts.reference_preset} preset, micro-batch {ref['micro_batch']}: ours "
                                                 f"{row['samples_per_s']:.1f} vs reference {ref['samples_per_s']:.3f} samples/s")
            cached = ref["micro_batch"] / ref["train_step_s"]
            h["train_vs_cached_reference_ratio"] = _ratio(row["samples_per_s"], cached)
            notes["train_vs_cached_reference_ratio"] = (f"{opts.reference_preset} preset (our model, plain AdamW), micro-batch "
                                                        f"{ref['micro_batch']}: ours {row['samples_per_s']:.1f} vs "
                                                        f"{cached:.1f} samples/s")
    large = next((v for v in train.values() if v.get("is_large")), None) or (list(train.values())[-1] if train else None)
    if large:
        best = max(large["rows"], key=lambda r: r["fraction_of_peak"] or 0.0)
        h["train_flops_fraction_of_peak"] = best["fraction_of_peak"]
        notes["train_flops_fraction_of_peak"] = f"{large['preset']} ({large['model_preset']}) at micro-batch {best['micro_batch']}"
    data = result.get("data")
    if data:
        h["s3_vs_local_ratio"] = _ratio(data["s3"]["samples_per_s"], data["local"]["samples_per_s"])
        if data["s3"].get("client_cpu_s_per_gb") is not None:
            notes["s3_vs_local_ratio"] = (
                f"CPU per GB delivered: loader {data['local']['client_cpu_s_per_gb']:.1f} s local, "
                f"{data['s3']['client_cpu_s_per_gb']:.1f} s S3, + S3 server {data['s3']['server_cpu_s_per_gb']:.1f} s "
                f"on the same {data.get('cpu_count')} cores")
        cons = opts.consumption_preset
        if cons in train and cons not in result["train"]["substitutions"]:
            best = max(train[cons]["rows"], key=lambda r: r["samples_per_s"])
            h["loader_vs_consumption_ratio"] = _ratio(data["local"]["samples_per_s"], best["samples_per_s"])
            notes["loader_vs_consumption_ratio"] = (f"loader (local) vs the fastest measured consumption of {cons} "
                                                    f"(micro-batch {best['micro_batch']}, {best['samples_per_s']:.1f} samples/s)")
        elif result.get("consumption_ceiling"):
            c = result["consumption_ceiling"]
            h["loader_vs_consumption_ratio"] = _ratio(data["local"]["samples_per_s"], c["samples_per_s"])
            notes["loader_vs_consumption_ratio"] = (f"loader (local) vs the compute ceiling of {cons} ({c['samples_per_s']:.1f} "
                                                    f"samples/s = matmul peak / {c['flops_per_sample'] / 1e9:.3g} GFLOP per "
                                                    f"sample; not measured, a lower bound of the ratio)")
    mem = result.get("memory")
    if mem:
        h["zero3_vs_zero0_memory_ratio"] = mem.get("zero3_vs_zero0")
        by = mem.get("by_precision") or {mem["precision"]: {"stages": mem["stages"], "zero3_vs_zero0": mem.get("zero3_vs_zero0")}}
        others = ", ".join(f"{p} {e['zero3_vs_zero0']:.3g}" for p, e in by.items()
                           if p != mem["precision"] and e.get("zero3_vs_zero0") is not None)
        notes["zero3_vs_zero0_memory_ratio"] = (f"{mem['precision']}, {mem['preset']}, 2 ranks, model states per rank "
                                                f"(RSS after malloc_trim)" + (f"; other precisions: {others}" if others else ""))
        # every precision and stage counts (the +small_buckets variants are what-ifs, not shipped)
        worst = max(((f"{p} ZeRO-{k}", s["estimate_vs_measured"]) for p, e in by.items() for k, s in e["stages"].items()
                     if s["estimate_vs_measured"] and "+" not in k),
                    key=lambda kv: abs(math.log(kv[1])), default=None)
        if worst:
            h["estimate_vs_measured_memory_ratio"] = worst[1]
            notes["estimate_vs_measured_memory_ratio"] = f"worst of all stages and precisions: {worst[0]} (estimate / measured)"
    targets = {}
    for key, (op, goal) in TARGETS.items():
        v = h[key]
        met = None if v is None else (v >= goal if op == ">=" else v <= goal if op == "<=" else abs(v - 1) <= goal)
        targets[key] = {"value": v, "target": f"{op} {goal}" if op != "within" else f"1 +/- {goal}", "met": met,
                        "note": notes.get(key, "")}
    h["targets"] = targets
    return h


def run_benchmark(opts: Optional[BenchmarkOptions] = None) -> dict[str, Any]:
    """Run the selected sections; returns the JSON-ready result (headlines at the top level)."""
    import mindeye_dist  # noqa: F401  (torchvision shim)
    from mindeye_dist.data.local_s3 import restore_env
    from mindeye_dist.distributed import init_distributed, teardown_distributed
    from mindeye_dist.metrics import device_peak_flops

    opts = opts or BenchmarkOptions()
    if opts.quick and not opts.quick_applied:
        opts = opts.apply_quick()
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    waited = _wait_for_idle(opts.wait_for_idle_s, opts.idle_load)
    t_start = time.perf_counter()
    tmp = None
    work_dir = opts.work_dir
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mindeye_bench_")
        work_dir = tmp.name
    os.makedirs(work_dir, exist_ok=True)
    dist_env = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    saved_env = {k: os.environ.get(k) for k in dist_env}
    for k in dist_env[:5]:
        os.environ.pop(k, None)  # a world of one in this process (memory runs its own ranks)
    _, _, device = init_distributed()
    from mindeye_dist import hostmem

    host_memory = hostmem.apply(opts.host_memory, device.type)  # as train.run does, before the models are built
    precision = opts.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    result: dict[str, Any] = {
        "device": device_label(device), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": opts.command, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in dataclasses.asdict(opts).items()},
        "host": host_info(), "precision": precision, "waited_for_idle_s": waited, "host_memory": host_memory,
    }
    try:
        peak = datasheet = None
        if "peak" in opts.sections or "train" in opts.sections:
            peak = _peak(device, dtype, opts.matmul_n, opts.matmul_repeats)
            datasheet = device_peak_flops(device, dtype)
            from mindeye_dist.bench.common import measure_copy_bandwidth

            bw = measure_copy_bandwidth(device, mib=64 if opts.quick else 512)
            result["peak"] = {"dtype": precision, "n": opts.matmul_n, "threads": torch.get_num_threads(),
                              "matmul_flops_per_s_before": peak, "datasheet_flops_per_s": datasheet,
                              "copy_bandwidth_bytes_per_s": bw}
            log(f"matmul peak ({precision}, n={opts.matmul_n}): {peak / 1e9:.1f} GFLOP/s; copy bandwidth {bw / 1e9:.1f} GB/s")
        if "data" in opts.sections:
            from mindeye_dist.bench.data import measure_data

            result["data"] = measure_data(work_dir, opts.data_train_samples, opts.data_repeats, opts.data_workers,
                                          opts.data_batch_size, dims=opts.data_dims)
        if "train" in opts.sections:
            result["train"] = _train_section(opts, device, precision, peak, datasheet, work_dir)
            after = _peak(device, dtype, opts.matmul_n, opts.matmul_repeats)
            result["peak"]["matmul_flops_per_s_after"] = after
            result["peak"]["matmul_flops_per_s"] = max(peak, after)
            log(f"matmul peak after training: {after / 1e9:.1f} GFLOP/s")
            if after > peak:  # rescale fractions to the higher (less disturbed) peak measurement
                for pres in result["train"]["presets"].values():
                    rows = list(pres["rows"]) + list(pres.get("variants", {}).get("rows", {}).values())
                    for r in rows:
                        r["fraction_of_peak"] = r["flops_per_s"] / after
        elif peak is not None:
            result["peak"]["matmul_flops_per_s"] = peak
        cons_spec = PresetSpec.parse(opts.consumption_preset)
        measured = result.get("train", {}).get("presets", {})
        if "data" in opts.sections and peak is not None and opts.consumption_preset not in measured:
            fps = float(count(cons_spec, experiment_config(cons_spec, 32, precision=precision))["flops"]["total"])
            result["consumption_ceiling"] = {"preset": opts.consumption_preset, "flops_per_sample": fps,
                                             "samples_per_s": result["peak"]["matmul_flops_per_s"] / fps}
        if "reference" in opts.sections:
            from mindeye_dist.bench.reference import measure_reference

            log(f"reference loop: {opts.reference_encoder} + {opts.reference_preset}, micro-batch "
                f"{opts.reference_micro_batch}, {opts.reference_steps} step(s)")
            result["reference"] = measure_reference(PresetSpec.parse(opts.reference_preset), opts.reference_micro_batch,
                                                    opts.reference_steps, device, opts.reference_encoder)
        if "mindeye1" in opts.sections:
            from mindeye_dist.bench.mindeye1 import measure_mindeye1
            from mindeye_dist.bench.reference import MindEye1Shape

            result["mindeye1"] = measure_mindeye1(
                opts.mindeye1_hidden, opts.mindeye1_micro_batch, opts.mindeye1_rounds, opts.mindeye1_steps,
                encoder=opts.reference_encoder, shape=MindEye1Shape(**(opts.mindeye1_shape or {})),
                encoder_config=opts.mindeye1_encoder_config)
        if "memory" in opts.sections:
            from mindeye_dist.bench.memory import measure_zero_memory

            log(f"memory: ZeRO {list(opts.memory_stages)} x 2 ranks, {opts.memory_preset}")
            precisions = tuple(opts.memory_precisions)
            head = opts.memory_headline_precision or (precision if precision in precisions else precisions[0])
            result["memory"] = measure_zero_memory(opts.memory_preset, opts.memory_micro_batch, tuple(opts.memory_stages),
                                                   tuple(opts.memory_small_bucket_stages), precisions=precisions,
                                                   headline_precision=head)
    finally:
        teardown_distributed()
        restore_env(saved_env)
        if tmp is not None:
            tmp.cleanup()
    result["duration_s"] = time.perf_counter() - t_start
    result["host"]["load_avg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    loads = [x[0] for x in (result["host"].get("load_avg_at_start"), result["host"]["load_avg_at_end"]) if x]
    if loads and max(loads) > opts.idle_load:
        result["load_warning"] = (f"1-minute load average reached {max(loads):.2f} (> {opts.idle_load}) around this run: "
                                  f"other processes competed for the {os.cpu_count()} cores, so timings are pessimistic; "
                                  f"2-thread OpenMP regions of small ops can slow down 10-100x under contention")
    return {**_headlines(result, opts), **result}


def format_markdown(result: dict[str, Any]) -> str:
    from mindeye_dist.bench.report import format_markdown as fmt

    return fmt(result)


__all__ = ["BenchmarkOptions", "HEADLINES", "SECTIONS", "TARGETS", "format_markdown", "run_benchmark"]
