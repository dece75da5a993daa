"""Training throughput of the real step, as users run it.

The step is ``mindeye_dist.train``'s: ``TrainingModel`` (MindEye + the prior's loss in one
forward) driven by ``mindeye_dist.engine.DeepSpeedEngine`` (a DeepSpeed engine, world of one,
built from a shipped ``ds_configs/*.json`` resolved by ``resolve_ds_config``, with the client
optimizer ``mindeye_dist.optim`` builds: torch's fused AdamW on CPU), ``train._forward_loss``
(BiMixCo mixup + engine forward + ``MindEyeLoss``), ``engine.backward`` and ``engine.step``.
Batches are synthetic and already in memory, so the step is measured without data cost; the
data-wait share of the real loader is measured separately (:func:`measure_real_loader`).

Every step is timed on its own (CPU timings are exact; on GPU the device is synced between
phases), the median over the timed steps is reported, and FLOP/s = training FLOPs per sample
(``estimate``: FlopCounterMode on the meta device) x samples/s.
"""

from __future__ import annotations

import gc
import time
import types
from typing import Any, Callable, Optional

import torch

from mindeye_dist.bench.common import PresetSpec, build, count, experiment_config, log, median, sync, synthetic_batch


def make_engine(cfg, model, device: torch.device):
    """``DeepSpeedEngine`` exactly as ``train.run`` builds it (for the initialised world)."""
    from mindeye_dist.distributed import get_world_size
    from mindeye_dist.ds_config import load_ds_config, resolve_ds_config
    from mindeye_dist.engine import DeepSpeedEngine
    from mindeye_dist.train import TrainingModel, resolve_path

    ds = resolve_ds_config(load_ds_config(resolve_path(cfg.run.ds_config)), cfg, get_world_size())
    return DeepSpeedEngine(TrainingModel(model), cfg, ds, cfg.train.max_steps, device)


class Stepper:
    """One training step of ``train.run``'s loop (without data loading and logging)."""

    def __init__(self, engine, cfg, device: torch.device):
        from mindeye_dist.losses import MindEyeLoss

        self.engine, self.device = engine, device
        self.loss_fn = MindEyeLoss(cfg.loss, cfg.train.max_steps)
        self.gen = torch.Generator().manual_seed(0)
        self.step_index = 0
        self.skipped = 0

    def __call__(self, batch, phases: Optional[list] = None) -> None:
        from mindeye_dist.train import _forward_loss

        t0 = time.perf_counter()
        terms = _forward_loss(self.engine, self.loss_fn, batch, self.step_index, self.gen)
        if phases is not None:
            sync(self.device)
        t1 = time.perf_counter()
        self.engine.backward(terms.total)
        if phases is not None:
            sync(self.device)
        t2 = time.perf_counter()
        if not self.engine.step():
            self.skipped += 1
        if phases is not None:
            sync(self.device)
            phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        self.step_index += 1


def _timed_steps(stepper: Stepper, batch, repeats: int, budget_s: float, device) -> tuple[list[float], list]:
    """Per-step wall times (at least 2 steps unless ``repeats`` < 2, then stop at the time budget)."""
    times, phases = [], []
    start = time.perf_counter()
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        stepper(batch, phases)
        times.append(time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > budget_s:
            break
    return times, phases


def _row(mb: int, times: list[float], phases: list, flops_per_sample: float, peak: float,
         datasheet_peak: Optional[float]) -> dict[str, Any]:
    step = median(times)
    sps = mb / step
    flops = flops_per_sample * sps
    return {
        "micro_batch": mb, "timed_steps": len(times), "step_time_s": step, "step_times_s": times,
        "samples_per_s": sps, "flops_per_s": flops, "fraction_of_peak": flops / peak if peak else None,
        "mfu_datasheet": flops / datasheet_peak if datasheet_peak else None,
        "phase_s": {"forward_loss": median([p[0] for p in phases]), "backward": median([p[1] for p in phases]),
                    "optimizer_step": median([p[2] for p in phases])},
        "data_wait_share": 0.0,  # synthetic in-memory batches; see "real_loader" for the loader's share
    }


def profile_step(stepper: Stepper, batch, device: torch.device, top: int = 12) -> dict[str, Any]:
    """torch.profiler over one step: top ops by self time and a coarse category breakdown."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        stepper(batch)
        sync(device)
    wall = time.perf_counter() - t0
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total_us = sum(getattr(e, attr) for e in events) or 1.0
    cats: dict[str, float] = {}
    for e in events:
        c = _category(e.key)
        cats[c] = cats.get(c, 0.0) + getattr(e, attr)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return {
        "wall_s": wall, "timer": attr,
        "top_ops": [{"op": e.key, "self_ms": getattr(e, attr) / 1e3, "calls": e.count,
                     "share": getattr(e, attr) / total_us} for e in events[:top]],
        "categories": {k: {"ms": v / 1e3, "share": v / total_us} for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
    }


_CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "aten::linear",
                "aten::matmul", "aten::addmv", "aten::conv", "aten::convolution", "mkldnn")),
    ("optimizer (AdamW)", ("adam", "_foreach_mul", "_foreach_add", "_foreach_addcmul", "_foreach_lerp", "_foreach_sqrt",
                           "_foreach_div", "_foreach_addcdiv", "_foreach_sub")),
    ("grad norm / finite check", ("isfinite", "aten::any", "aten::maximum", "aten::bitwise_not", "aten::logical_not",
                                  "norm", "aten::abs", "aten::ne", "aten::eq", "aten::isnan", "aten::isinf", "aten::clamp")),
    ("copies (flatten/unflatten, casts)", ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone", "aten::contiguous",
                                           "aten::flatten_dense_tensors", "aten::unflatten", "aten::fill_", "aten::zero_")),
    ("collectives", ("gloo", "all_reduce", "allreduce", "c10d", "nccl")),
    ("layernorm / gelu / softmax", ("layer_norm", "gelu", "softmax", "aten::native_layer_norm")),
)


def _category(op: str) -> str:
    low = op.lower()
    for name, keys in _CATEGORIES:
        if any(k.lower() in low for k in keys):
            return name
    return "other elementwise / bookkeeping"


# ---------------------------------------------------------------------------------------------
# Shipped speed-ups, each turned off again in this process: what each one buys, measured


def _finite_per_parameter(self) -> bool:
    """The engine's earlier check: ``isfinite(grad).all()`` per parameter (bool temporaries of
    ~6 bytes per gradient element at the peak), verdict all-reduced."""
    import torch.distributed as dist

    ok = all(bool(torch.isfinite(p.grad).all()) for p in self.module.parameters() if p.grad is not None)
    bad = torch.tensor([0.0 if ok else 1.0], device=self.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


VARIANTS = {
    "system_malloc": "glibc's allocator defaults (blocks over 32 MiB mmapped and unmapped on free) instead of "
                     "mindeye_dist.hostmem.reuse_freed_memory (train.host_memory=reuse, the CPU default)",
    "world1_allreduce": "DeepSpeed's backward all-reduce left on with one rank (it flattens every gradient into "
                        "buckets, 'all-reduces' them over one rank, scales by 1/1 and copies them back)",
    "per_param_finite_check": "the non-finite gradient check as one isfinite().all() per parameter instead of one "
                              "torch.nn.utils.get_total_norm pass (fp32 ZeRO-0 only)",
}


def apply_variants(engine, names: list[str]) -> Callable[[], None]:
    """Turn the named speed-ups off; returns the function that puts the shipped state back."""
    from mindeye_dist import hostmem

    allocator, allreduce = hostmem.current(), engine.engine.enable_backward_allreduce

    def restore() -> None:
        if allocator == "reuse" and hostmem.current() != "reuse":
            hostmem.reuse_freed_memory()
        engine.engine.enable_backward_allreduce = allreduce
        engine.__dict__.pop("_local_grads_finite_everywhere", None)

    for name in names:
        if name == "system_malloc":
            hostmem.system_defaults()
        elif name == "world1_allreduce":
            engine.engine.enable_backward_allreduce = True
        elif name == "per_param_finite_check":
            engine._local_grads_finite_everywhere = types.MethodType(_finite_per_parameter, engine)
        else:
            restore()
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return restore


# ---------------------------------------------------------------------------------------------


def measure_real_loader(stepper: Stepper, url: str, micro_batch: int, steps: int, warmup: int, num_workers: int,
                        device: torch.device) -> dict[str, Any]:
    """The same engine fed by ``build_train_loader`` (as in ``train.run``): data-wait share."""
    from mindeye_dist.config import DataConfig
    from mindeye_dist.data import build_train_loader
    from mindeye_dist.metrics import ThroughputMeter

    cfg = DataConfig(url=url, num_workers=num_workers)
    loader = build_train_loader(cfg, micro_batch, seed=0, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(warmup):
        stepper(next(it).to(device))
    meter = ThroughputMeter(world_size=1)
    meter.start()
    for _ in range(steps):
        with meter.data_wait():
            batch = next(it).to(device)
        stepper(batch)
        meter.step(len(batch))
    rep = meter.report(sync_device=device)
    return {"url_kind": "local", "micro_batch": micro_batch, "num_workers": num_workers, "steps": steps,
            "samples_per_s": rep["samples_per_s"], "step_time_s": rep["step_time_s"],
            "data_wait_s": rep["data_wait_s"], "data_wait_share": rep["data_wait_share"]}


def measure_preset(spec: PresetSpec, micro_batches: list[int], *, repeats: int, warmup: int, device: torch.device,
                   precision: str, ds_config: str, peak: float, datasheet_peak: Optional[float],
                   budget_s: float = 60.0, profile: bool = False, variants: bool = False, variant_repeats: int = 2,
                   variant_micro_batch: Optional[int] = None, real_loader: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Throughput of the real training step for one preset at each micro-batch size.

    One engine per preset (DeepSpeed world of one; ``train_micro_batch_size_per_gpu`` only feeds
    DeepSpeed's bookkeeping at ZeRO-0, the step itself takes whatever batch it is given).
    ``budget_s`` caps the timed steps per micro-batch (at least 2 are timed).
    """
    cfg = experiment_config(spec, micro_batches[0], precision=precision, ds_config=ds_config)
    est = count(spec, cfg)
    flops_per_sample = float(est["flops"]["total"])
    out: dict[str, Any] = {"preset": spec.name, "model_preset": spec.preset, "overrides": list(spec.overrides),
                           "params": est["params"]["total"], "flops_per_sample": flops_per_sample,
                           "flops_by_component": est["flops"], "precision": precision, "ds_config": ds_config}
    t = time.perf_counter()
    torch.manual_seed(0)
    model = build(spec, cfg)
    out["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    engine = make_engine(cfg, model, device)
    out["engine_init_s"] = time.perf_counter() - t
    out["engine"] = f"mindeye_dist.engine.DeepSpeedEngine (DeepSpeed ZeRO-{engine.zero_stage}, world of one), " \
                    f"optimizer {engine.optimizer_name}"
    stepper = Stepper(engine, cfg, device)
    model_cfg = engine.module.model.config
    rows = []
    for mb in micro_batches:
        batch = synthetic_batch(model_cfg, mb, device)
        for _ in range(warmup):
            stepper(batch)
        times, phases = _timed_steps(stepper, batch, repeats, budget_s, device)
        row = _row(mb, times, phases, flops_per_sample, peak, datasheet_peak)
        rows.append(row)
        log(f"{spec.name} mb {mb}: {row['step_time_s'] * 1e3:.1f} ms/step, {row['samples_per_s']:.1f} samples/s, "
            f"{row['flops_per_s'] / 1e9:.1f} GFLOP/s ({row['fraction_of_peak']:.2f} of peak)")
    out["rows"] = rows
    best = max(rows, key=lambda r: r["flops_per_s"])
    if profile:
        batch = synthetic_batch(model_cfg, best["micro_batch"], device)
        out["profile"] = {"micro_batch": best["micro_batch"], **profile_step(stepper, batch, device)}
    if variants and device.type == "cpu":
        vrow = next((r for r in rows if r["micro_batch"] == variant_micro_batch), best)
        batch = synthetic_batch(model_cfg, vrow["micro_batch"], device)
        out["variants"] = measure_variants(engine, stepper, batch, vrow, variant_repeats, flops_per_sample, peak,
                                           datasheet_peak, device)
    if real_loader:
        out["real_loader"] = measure_real_loader(stepper, device=device, **real_loader)
        log(f"{spec.name} real loader: data-wait share {out['real_loader']['data_wait_share']:.3f}")
    out["skipped_steps"] = stepper.skipped
    del stepper, engine, model
    gc.collect()
    return out


def measure_variants(engine, stepper: Stepper, batch, base_row: dict, repeats: int, flops_per_sample: float,
                     peak: float, datasheet_peak: Optional[float], device) -> dict[str, Any]:
    """Step time as shipped and with each shipped speed-up turned off on its own (the baseline is
    re-measured in the same window, interleaved, so load drift hits every side alike)."""
    from mindeye_dist import hostmem

    host_memory = "reuse" if hostmem.current() == "reuse" else "system"
    mb = base_row["micro_batch"]
    labels = [("as shipped", [])] + [(f"off: {n}", [n]) for n in VARIANTS
                                      if n != "per_param_finite_check" or engine._manual_check]
    if host_memory != "reuse":
        labels = [lab for lab in labels if lab[1] != ["system_malloc"]]
    result: dict[str, Any] = {"micro_batch": mb, "descriptions": VARIANTS, "host_memory": host_memory, "rows": {}}
    times: dict[str, list[float]] = {label: [] for label, _ in labels}
    phases: dict[str, list] = {label: [] for label, _ in labels}
    for _ in range(max(1, repeats)):
        for label, names in labels:
            restore = apply_variants(engine, names)
            try:
                stepper(batch)  # a warm-up step after the switch (the allocator refills, buckets are built)
                t, p = _timed_steps(stepper, batch, 1, 1e9, device)
            finally:
                restore()
            times[label] += t
            phases[label] += p
    for label, _ in labels:
        row = _row(mb, times[label], phases[label], flops_per_sample, peak, datasheet_peak)
        result["rows"][label] = row
        log(f"variant {label}: {row['step_time_s'] * 1e3:.1f} ms/step ({row['fraction_of_peak']:.2f} of peak)")
    base = result["rows"]["as shipped"]["step_time_s"]
    for row in result["rows"].values():
        row["speedup_vs_shipped"] = base / row["step_time_s"]
    return result
