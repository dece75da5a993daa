"""Scale ladder: the largest MindEye model (backbone + prior) that trains here at 2 ranks, per ZeRO variant.

Each *rung* is one real run of ``deepspeed --num_accelerators 2 launchers/train.py`` with the
MindEye1 pipeline config (``launchers/configs/mindeye1.yaml``: BiMixCo/SoftCLIP + 30 x prior MSE,
bf16, OneCycle) on a synthetic dataset with MindEye1's dimensions (15,724 voxels, 257 x 768
targets); only the backbone width ``model.hidden_dim`` changes between rungs (4096 is MindEye1's
940M backbone; the prior, 56M, is the same in every rung). For each rung it records:

* whether it trained: every step logged, finite, and the mean loss of the last 3 steps below the
  mean of the first 3 (``train.max_steps`` >= 20, logged every step);
* peak RSS per rank: ``VmHWM`` of each rank process, read from ``/proc`` every 0.25 s by this
  process while the run lasts (the ranks are the launcher's descendants running train.py; the
  data-loader workers are not ranks and are left out); the max over the two ranks;
* step time: the median ``perf/step_time_s`` of the logged steps after the first two (which
  include warm-up);
* ``estimate.py``'s prediction of the same number: the stage's ``peak_bytes`` (model states,
  the largest transient, activations) plus ``host_bytes`` (on a machine without an accelerator
  "offloaded to the host" is the same RAM) plus the *process baseline*, the peak RSS of a rank
  of the same launcher, config and dataset training a 64-wide model (Python, torch, DeepSpeed,
  gloo, the loader, the batch: memory no model term owns), measured once per ladder.

Rungs are picked, not searched: for each variant the widths are tried from the largest down, a
width is started only when ``2 x`` its predicted per-rank peak fits in ``MemAvailable`` minus a
safety margin (3 GiB by default), and a watchdog ends the run (and records it as aborted) if
``MemAvailable`` falls below the guard (2 GiB) while it runs, so the ladder never pushes this
shared machine into the OOM killer. The first width of a variant that trains is its rung; the
widths above it that were skipped are reported with what they would have needed (the ceiling
that could not be tested, and why).

    python launchers/scale_ladder.py --out /tmp/ladder        # under `flock /tmp/mindeye_heavy.lock`
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mindeye_dist.bench.common import REPO_ROOT, log, mem_available_bytes, proc_kib_bytes

GIB = 2**30
MINDEYE1_DIMS = {"n_voxels": 15724, "n_tokens": 257, "token_dim": 768}
"""NSD subject 1's nsdgeneral voxels and CLIP ViT-L/14's 257 x 768 tokens (MindEye1)."""
VARIANTS: dict[str, str] = {
    "zero2": "ds_configs/zero2.json",
    "zero3": "ds_configs/zero3.json",
    "zero3_offload": "ds_configs/zero3_offload.json",
    "zero3_nvme": "ds_configs/zero3_nvme.json",
}
"""Ladder column -> the shipped DeepSpeed config it runs."""
WIDTHS = (8192, 6144, 4096, 3072, 2048, 1024)
"""Backbone widths tried, largest first (MindEye1 layout: 4 blocks; 4096 = MindEye1's backbone)."""
BASELINE_WIDTH = 64


@dataclass(frozen=True)
class Rung:
    variant: str
    """Key of :data:`VARIANTS`."""
    hidden_dim: int
    """Backbone width."""
    overrides: tuple[str, ...] = ("model.lowlevel=false",)
    """Experiment overrides on top of ``launchers/configs/mindeye1.yaml`` (the rung's model)."""
    steps: int = 20
    micro_batch: int = 2
    precision: str = "bf16"

    @property
    def name(self) -> str:
        extra = "" if self.overrides == Rung.overrides else "-" + ",".join(o.removeprefix("model.") for o in self.overrides)
        return f"{self.variant}-h{self.hidden_dim}{extra}"

    def config_overrides(self) -> list[str]:
        return [f"model.hidden_dim={self.hidden_dim}", f"model.output_tiles={output_tiles(self.hidden_dim)}",
                f"train.max_steps={self.steps}", f"train.micro_batch_size={self.micro_batch}",
                f"train.precision={self.precision}", *self.overrides]


def output_tiles(hidden_dim: int) -> int:
    """Tiles of the output Linear (hidden -> 257 x 768) for a rung: 256 rows of the weight's
    transpose per tile (50.5M parameters), at least the preset's 8. Small tiles keep ZeRO-3's
    gathered set and, with NVMe offload, the swap buffers (sized by the largest partition) small;
    the computation is the same whatever the count."""
    return max(8, hidden_dim // 256)


NVME_PARAM_BUFFERS = 16
"""Parameter swap buffers per rank for NVMe rungs. DeepSpeed holds every swapped-in parameter
partition in a buffer of its own (``partitioned_param_swapper.py``), whatever its size; the
shipped config's 5 ran out in the first forward of a MindEye1-shaped model ("Not enough buffers 0
for swapping 1"): the prior's transformer layers fetch more than 5 parameters at once."""


NVME_ZERO3 = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
"""ZeRO-3 knobs of NVMe rungs: a swapped-in parameter is released as soon as its module is done
(with the shipped reuse distance, 1e8 elements, the 16 parameters of the prior's first layers were
all kept and no buffer was left for the next one), and nothing is prefetched: DeepSpeed 0.19.8's
NVMe prefetch in the backward failed at 1.0B parameters with "param 12 already assigned swap
buffer id 7" (``__prefetch_nvme_param_partitions``), and on 2 cores there is little to overlap."""


def nvme_param_buffer_size(rung: "Rung", world_size: int = 2) -> int:
    """Elements per swap buffer for ``rung``: its largest parameter's partition at ``world_size``
    ranks, rounded up to a multiple of 2**20 (the shipped 1e8 is 400 MB each in fp32, far more than
    most rungs need, and too little for none)."""
    import torch

    from mindeye_dist.models import build_model

    cfg = _experiment(rung)
    with torch.device("meta"):
        model = build_model(cfg.model, n_voxels=MINDEYE1_DIMS["n_voxels"], n_tokens=MINDEYE1_DIMS["n_tokens"],
                            token_dim=MINDEYE1_DIMS["token_dim"], lowlevel_shape=[4, 64, 64])
    largest = max(p.numel() for p in model.parameters())
    part = math.ceil(largest / world_size)
    return int(math.ceil(part / 2**20) * 2**20)


def rung_ds_config(variant: str, nvme_dir: Path, param_buffer_size: Optional[int] = None) -> dict[str, Any]:
    """The variant's shipped DeepSpeed config; NVMe swap files go to ``nvme_dir`` (one per run:
    DeepSpeed names them by rank and parameter id only, so two runs on one path would collide).
    With ``param_buffer_size`` (:func:`nvme_param_buffer_size`), an NVMe variant's parameter swap
    buffers are sized to the rung: that many elements each, :data:`NVME_PARAM_BUFFERS` of them."""
    from mindeye_dist.ds_config import load_ds_config

    ds = load_ds_config(REPO_ROOT / VARIANTS[variant])
    for key in ("offload_optimizer", "offload_param"):
        block = ds.get("zero_optimization", {}).get(key)
        if isinstance(block, dict) and block.get("device") == "nvme":
            block["nvme_path"] = str(nvme_dir)
            if key == "offload_param" and param_buffer_size:
                block["buffer_size"] = int(param_buffer_size)
                block["buffer_count"] = NVME_PARAM_BUFFERS
                ds["zero_optimization"].update(NVME_ZERO3)
    return ds


def _rung_ds_config(rung: "Rung", nvme_dir: Path) -> dict[str, Any]:
    size = nvme_param_buffer_size(rung) if "nvme" in rung.variant else None
    return rung_ds_config(rung.variant, nvme_dir, size)


@dataclass
class LadderOptions:
    out: str
    """Directory for the datasets, run directories, ladder.json and ladder.md."""
    variants: tuple[str, ...] = ("zero2", "zero3", "zero3_offload", "zero3_nvme")
    widths: tuple[int, ...] = WIDTHS
    steps: int = 20
    micro_batch: int = 2
    precision: str = "bf16"
    activation_checkpointing: bool = True
    """Rungs run with ``model.activation_checkpointing=true`` (the output Linear is in the preset's 8 tiles)."""
    margin_gib: float = 3.0
    """A rung starts only when MemAvailable - 2 x its predicted per-rank peak stays above this."""
    guard_gib: float = 2.0
    """A running rung is ended when MemAvailable drops below this."""
    timeout_s: float = 3600.0
    """Per rung."""
    extra_rungs: tuple[Rung, ...] = ()
    """Run after the ladder whatever it found (e.g. the full MindEye1 preset)."""
    n_train: int = 96
    """Synthetic train stimuli (a tenth becomes the validation split)."""


# ---- estimate -------------------------------------------------------------------------------


def _experiment(rung: Rung, data_url: str = "", run_dir: str = "", activation_checkpointing: bool = True):
    from mindeye_dist.config import load_config

    overrides = rung.config_overrides() + [f"model.activation_checkpointing={str(activation_checkpointing).lower()}"]
    if data_url:
        overrides += [f"data.url={data_url}", f"run.dir={run_dir}"]
    return load_config(REPO_ROOT / "launchers/configs/mindeye1.yaml", [*overrides, f"run.ds_config={VARIANTS[rung.variant]}"])


def predict(rung: Rung, activation_checkpointing: bool = True, lowlevel_shape: Optional[list[int]] = None) -> dict[str, Any]:
    """estimate.py's numbers for the rung at 2 ranks: parameters and bytes per rank (the variant's
    full offload level; device + host, which are one RAM on a CPU-only machine)."""
    from mindeye_dist.estimate import estimate

    cfg = _experiment(rung, activation_checkpointing=activation_checkpointing)
    ds = _rung_ds_config(rung, Path("/nonexistent"))
    result = estimate(cfg.model, flops=False, world_size=2, ds_config=ds, micro_batch_size=rung.micro_batch,
                      precision=rung.precision, lowlevel_shape=lowlevel_shape, **MINDEYE1_DIMS)
    stages = result["memory"]["stages"]
    row = stages[list(stages)[-1]]  # the config's own offload level comes last
    return {"params": result["params"]["total"], "params_by_component": result["params"],
            "estimate_peak_bytes": row["peak_bytes"] + row["host_bytes"], "estimate_row": row,
            "nvme_bytes": row.get("nvme_bytes", 0)}


# ---- data -----------------------------------------------------------------------------------


def make_dataset(out_dir: Path, n_train: int) -> str:
    """A synthetic subject with MindEye1's dims, VAE latents 4 x 64 x 64 included, built once.

    The latents are there even for rungs without the low-level head: the ``mindeye1`` preset fixes
    ``lowlevel_shape`` and refuses a dataset that disagrees (every rung of the first ladder run,
    2026-12-01, failed on it with 16 x 16 latents)."""
    from mindeye_dist.data import build_synthetic_dataset

    path = out_dir / "data_me1"
    if not (path / "meta.json").is_file():
        log(f"building the synthetic dataset at {path} ({n_train} train stimuli, 15724 voxels, 257x768)")
        build_synthetic_dataset("demo", str(path), seed=0, n_train=n_train, n_test=32, progress=False,
                                vae_size=64, shard_size_mb=16.0, **MINDEYE1_DIMS)
    return str(path)


# ---- one run --------------------------------------------------------------------------------


def _runs_train_py(argv: list[bytes]) -> bool:
    """Whether a command line is ``python [-flags] .../launchers/train.py ...``: the script itself,
    not DeepSpeed's ``launch`` module or ``deepspeed`` runner, which carry train.py as an argument
    (taking them for the rank measured the launcher's 0.24 GiB, 2026-12-01)."""
    for part in argv[1:]:
        if part.endswith(b"launchers/train.py"):
            return True
        if part == b"-m" or not part.startswith(b"-"):
            return False
    return False


def _rank_pids(root: int) -> list[int]:
    """Descendants of ``root`` running launchers/train.py that are not themselves children of one
    (the ranks, without the data-loader workers they fork)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [(root, False)]
    while stack:
        pid, under_rank = stack.pop()
        for child in children.get(pid, []):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    is_train = _runs_train_py(f.read().split(b"\0"))
            except OSError:
                continue
            if is_train and not under_rank:  # a forked child of a rank (a loader worker) runs train.py too
                found.append(child)
            stack.append((child, under_rank or is_train))
    return found


@dataclass
class _Watch:
    """Peak RSS per rank process and the memory guard, polled while a run lasts."""

    root: int
    guard_bytes: int
    peaks: dict[int, int] = field(default_factory=dict)
    min_available: Optional[int] = None
    tripped: bool = False

    def poll(self) -> None:
        workers: set[int] = set()
        for pid in _rank_pids(self.root):
            workers.add(pid)
            hwm = proc_kib_bytes(f"/proc/{pid}/status", "VmHWM")
            if hwm is not None:
                self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
        available = mem_available_bytes()
        if available is not None:
            self.min_available = available if self.min_available is None else min(self.min_available, available)
            if available < self.guard_bytes and not self.tripped:
                self.tripped = True
                log(f"memory guard: MemAvailable {available / GIB:.1f} GiB < {self.guard_bytes / GIB:.1f} GiB; ending the run")
                try:
                    os.killpg(self.root, signal.SIGKILL)
                except OSError:
                    pass


def _losses(run_dir: Path) -> tuple[dict[int, float], list[float]]:
    losses, times = {}, []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return losses, times
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss/total" in row:
            losses[int(row["step"])] = float(row["loss/total"])
            if row.get("perf/step_time_s") is not None and int(row["step"]) > 2:
                times.append(float(row["perf/step_time_s"]))
    return losses, times


def run_rung(rung: Rung, data_url: str, out_dir: Path, options: LadderOptions,
             activation_checkpointing: Optional[bool] = None) -> dict[str, Any]:
    """Launch the rung through the real launcher and measure it (see the module doc)."""
    from mindeye_dist.distributed import free_port

    ckpt = options.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    run_dir = out_dir / "runs" / rung.name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg_args = [*rung.config_overrides(), f"model.activation_checkpointing={str(ckpt).lower()}", f"data.url={data_url}",
                f"run.dir={run_dir}", "train.log_every_steps=1", "train.eval_every_steps=0", "checkpoint.every_steps=0",
                "data.num_workers=0", "data.shuffle_buffer=16", "log.tensorboard=false", "log.progress=off"]
    nvme_dir = out_dir / "nvme" / rung.name
    ds_path = out_dir / "ds_configs" / f"{rung.name}.json"
    ds_path.parent.mkdir(parents=True, exist_ok=True)
    ds_path.write_text(json.dumps(_rung_ds_config(rung, nvme_dir), indent=2))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()),
           str(REPO_ROOT / "launchers/train.py"), "--ds_config", str(ds_path),
           "--config", str(REPO_ROOT / "launchers/configs/mindeye1.yaml"), *cfg_args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "logs" / f"{rung.name}.log"
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        watch = _Watch(proc.pid, int(options.guard_gib * GIB))
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                watch.poll()
                stop.wait(0.25)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            rc = proc.wait(timeout=options.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = "timeout"
        finally:
            stop.set()
            poller.join()
            try:  # nothing of the run may outlive it (ranks, loader workers)
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            if nvme_dir.exists():  # swap files: the size of the optimizer states
                import shutil

                shutil.rmtree(nvme_dir, ignore_errors=True)
    wall = time.perf_counter() - start
    losses, times = _losses(run_dir)
    steps = sorted(losses)
    finite = all(math.isfinite(v) for v in losses.values())
    first = statistics.fmean(losses[s] for s in steps[:3]) if len(steps) >= 6 else None
    last = statistics.fmean(losses[s] for s in steps[-3:]) if len(steps) >= 6 else None
    trained = (rc == 0 and steps == list(range(1, rung.steps + 1)) and finite and first is not None and last < first)
    status = "trained" if trained else ("aborted: memory guard" if watch.tripped else
                                        "timeout" if rc == "timeout" else f"failed (exit {rc})")
    peaks = sorted(watch.peaks.values(), reverse=True)
    tail = "" if trained else log_path.read_text()[-1500:]
    return {"rung": rung.name, "variant": rung.variant, "ds_config": VARIANTS[rung.variant], "hidden_dim": rung.hidden_dim,
            "overrides": list(rung.overrides), "activation_checkpointing": ckpt, "status": status, "trained": trained,
            "exit": rc, "steps": len(steps), "loss_first3": first, "loss_last3": last,
            "losses": [losses[s] for s in steps], "step_time_s": statistics.median(times) if times else None,
            "peak_rss_bytes_per_rank": peaks[0] if peaks else None, "peak_rss_bytes_ranks": peaks,
            "min_mem_available_bytes": watch.min_available, "wall_s": wall, "load_avg_start": load_start,
            "load_avg_end": os.getloadavg()[0], "log": str(log_path), "log_tail": tail}


# ---- the ladder -----------------------------------------------------------------------------


def _fits(need_per_rank: float, options: LadderOptions, settle_s: float = 0.0) -> tuple[bool, Optional[int]]:
    """Whether 2 ranks of ``need_per_rank`` fit in MemAvailable minus the margin. A rung the guard
    just ended returns its memory over seconds: wait up to ``settle_s`` for it before saying no
    (2026-12-01: zero3_offload-h1024 was skipped with 11.3 GiB "available" right after h2048's kill)."""
    deadline = time.monotonic() + settle_s
    while True:
        available = mem_available_bytes()
        if available is None:
            return True, None
        fits = 2 * need_per_rank <= available - options.margin_gib * GIB
        if fits or time.monotonic() >= deadline:
            return fits, available
        time.sleep(2.0)


def _with_estimate(row: dict[str, Any], pred: dict[str, Any], baseline: Optional[int]) -> dict[str, Any]:
    est = pred["estimate_peak_bytes"] + (baseline or 0)
    row.update(params=pred["params"], estimate_peak_bytes_per_rank=est, estimate_model_bytes=pred["estimate_peak_bytes"],
               baseline_bytes=baseline, nvme_bytes=pred["nvme_bytes"],
               estimate_vs_measured=(est / row["peak_rss_bytes_per_rank"]) if row.get("peak_rss_bytes_per_rank") else None)
    return row


def measure_baseline(data_url: str, out_dir: Path, options: LadderOptions) -> dict[str, Any]:
    """Peak RSS per rank of the same launcher, config and data with a 64-wide backbone and no
    prior: the process's own memory (interpreter, libraries, gloo, loader, batch)."""
    rung = Rung("zero2", BASELINE_WIDTH, overrides=("model.lowlevel=false", "model.prior=false"), steps=6,
                micro_batch=options.micro_batch, precision=options.precision)
    row = run_rung(rung, data_url, out_dir, options, activation_checkpointing=False)
    pred = predict(rung, activation_checkpointing=False)
    row["estimate_model_bytes"] = pred["estimate_peak_bytes"]
    # the model's own share (a few MB) is taken out, so the baseline is what no model term owns
    row["baseline_bytes"] = (row["peak_rss_bytes_per_rank"] - pred["estimate_peak_bytes"]) if row["peak_rss_bytes_per_rank"] else None
    return row


def run_ladder(options: LadderOptions) -> dict[str, Any]:
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"options": {k: v for k, v in dataclasses.asdict(options).items() if k != "extra_rungs"},
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rungs": [], "skipped": [],
                              "host": {"mem_total_bytes": proc_kib_bytes("/proc/meminfo", "MemTotal"),
                                       "cpus": os.cpu_count()}}
    data_url = make_dataset(out, options.n_train)
    earlier = _earlier_rows(out, options)
    base = earlier.pop("_baseline", None) or measure_baseline(data_url, out, options)
    result["baseline"] = base
    baseline = base["baseline_bytes"]
    log(f"process baseline per rank: {baseline / GIB if baseline else float('nan'):.2f} GiB")
    # Rungs of earlier invocations on the same OUT (same steps, batch and precision) are kept: the
    # ladder can be run a variant at a time, and a rerun after an interruption does not redo them.
    extras = {r.name for r in options.extra_rungs}
    result["rungs"] += [row for name, row in earlier.items() if row["variant"] not in options.variants
                        and name not in extras]

    def kept(rung: Rung) -> bool:
        """Whether ``rung`` was measured by an earlier invocation; its row is then added to the result."""
        row = earlier.get(rung.name)
        if row is not None:
            result["rungs"].append(row)
            log(f"{rung.name}: kept from the earlier run in {out} ({row['status']})")
        return row is not None

    for variant in options.variants:
        for width in sorted(options.widths, reverse=True):
            rung = Rung(variant, width, steps=options.steps, micro_batch=options.micro_batch, precision=options.precision)
            if kept(rung):  # earlier rows are trained rungs: this variant is done
                break
            pred = predict(rung, options.activation_checkpointing)
            need = pred["estimate_peak_bytes"] + (baseline or 0)
            fits, available = _fits(need, options, settle_s=60.0 if result["rungs"] and not result["rungs"][-1]["trained"] else 0.0)
            if not fits:
                result["skipped"].append({"rung": rung.name, "variant": variant, "hidden_dim": width, "params": pred["params"],
                                          "estimate_peak_bytes_per_rank": need, "mem_available_bytes": available,
                                          "reason": f"needs 2 x {need / GIB:.1f} GiB + {options.margin_gib:g} GiB margin; "
                                                    f"{(available or 0) / GIB:.1f} GiB available"})
                log(f"{rung.name}: skipped ({result['skipped'][-1]['reason']})")
                continue
            log(f"{rung.name}: {pred['params'] / 1e9:.2f}B parameters, predicted {need / GIB:.1f} GiB per rank")
            row = _with_estimate(run_rung(rung, data_url, out, options), pred, baseline)
            result["rungs"].append(row)
            log(f"{rung.name}: {row['status']}, peak {fmt_gib(row['peak_rss_bytes_per_rank'])} GiB/rank, "
                f"step {row['step_time_s'] or float('nan'):.1f} s")
            _write(out, result)
            if row["trained"]:
                break
    for rung in options.extra_rungs:
        rung = dataclasses.replace(rung, steps=options.steps, micro_batch=options.micro_batch,
                                   precision=options.precision)
        if kept(rung):
            continue
        vae = any(o == "model.lowlevel=true" for o in rung.overrides)
        pred = predict(rung, options.activation_checkpointing, lowlevel_shape=[4, 64, 64] if vae else None)
        need = pred["estimate_peak_bytes"] + (baseline or 0)
        fits, available = _fits(need, options)
        if not fits:
            result["skipped"].append({"rung": rung.name, "variant": rung.variant, "hidden_dim": rung.hidden_dim,
                                      "params": pred["params"], "estimate_peak_bytes_per_rank": need,
                                      "mem_available_bytes": available, "reason": "does not fit now"})
            continue
        result["rungs"].append(_with_estimate(run_rung(rung, data_url, out, options), pred, baseline))
        _write(out, result)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _write(out, result)
    return result


def _earlier_rows(out: Path, options: LadderOptions) -> dict[str, Any]:
    """Rows of an earlier ``ladder.json`` in ``out`` measured with the same steps, micro-batch,
    precision and checkpointing, by rung name (its baseline under ``_baseline``); {} otherwise."""
    path = out / "ladder.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    keys = ("steps", "micro_batch", "precision", "activation_checkpointing", "n_train")
    if any(old.get("options", {}).get(k) != getattr(options, k) for k in keys):
        log(f"{path}: measured with other settings; starting afresh")
        return {}
    # Only rungs that trained are kept: a failure, the memory guard or the timeout is tried again
    # (a failure may have been a bug since fixed).
    rows: dict[str, Any] = {r["rung"]: r for r in old.get("rungs", []) if r.get("rung") and r.get("trained")}
    if (old.get("baseline") or {}).get("trained"):
        rows["_baseline"] = old["baseline"]
    return rows


def fmt_gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _write(out: Path, result: dict[str, Any]) -> None:
    (out / "ladder.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "ladder.md").write_text(format_markdown(result))


def format_markdown(result: dict[str, Any]) -> str:
    """A markdown table: one row per rung run, then the widths that were not tried and why."""
    rows = ["| ZeRO variant (ds config) | backbone width | parameters | status | loss first 3 → last 3 steps | "
            "peak RSS / rank GiB | estimate GiB (ratio) | step s | load avg |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rungs"]:
        loss = "-" if r["loss_first3"] is None else f"{r['loss_first3']:.3f} → {r['loss_last3']:.3f}"
        ratio = "" if r.get("estimate_vs_measured") is None else f" ({r['estimate_vs_measured']:.2f})"
        step = "-" if r["step_time_s"] is None else f"{r['step_time_s']:.1f}"
        extra = "".join(f", `{o}`" for o in r.get("overrides") or () if o not in Rung.overrides)
        rows.append(f"| {r['variant']} (`{r['ds_config']}`){extra} | {r['hidden_dim']} | {r['params'] / 1e9:.3f}B | {r['status']} | "
                    f"{loss} ({r['steps']} steps) | {fmt_gib(r['peak_rss_bytes_per_rank'])} | "
                    f"{fmt_gib(r.get('estimate_peak_bytes_per_rank'))}{ratio} | {step} | "
                    f"{r['load_avg_start']:.1f}-{r['load_avg_end']:.1f} |")
    base = result.get("baseline") or {}
    lines = ["\n".join(rows), ""]
    if base.get("baseline_bytes"):
        lines.append(f"Process baseline (same launcher and data, 64-wide backbone, no prior): "
                     f"{fmt_gib(base['peak_rss_bytes_per_rank'])} GiB peak RSS per rank; the estimate column is "
                     f"estimate.py's peak (states + transient + activations, device + host) + "
                     f"{fmt_gib(base['baseline_bytes'])} GiB.")
    if result["skipped"]:
        lines += ["", "Not run (the ceiling this machine could not test):", ""]
        lines += [f"- {s['rung']}: {s['params'] / 1e9:.2f}B parameters, predicted {fmt_gib(s['estimate_peak_bytes_per_rank'])} "
                  f"GiB per rank: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"
