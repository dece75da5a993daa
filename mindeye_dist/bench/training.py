"""Training throughput of the real step, as users run it.

The step is :meth:`mindeye_dist.trainer.Trainer.step`, the one ``train.run`` calls: MindEye + the
prior's loss in one forward, driven by ``mindeye_dist.engine.DeepSpeedEngine`` (a DeepSpeed
engine, world of one, built from a shipped ``ds_configs/*.json`` resolved by
``resolve_ds_config``, with the client optimizer ``mindeye_dist.optim`` builds: torch's fused
AdamW on CPU), BiMixCo mixup and ``MindEyeLoss``, backward and the engine step. Batches are
synthetic and already in memory and handed to ``step()``, so the step is measured without data
cost; the data-wait share of the real loader is measured separately with the same trainer
drawing from ``build_train_loader`` (:func:`measure_real_loader`).

Every step is timed on its own (CPU timings are exact; on GPU the device is synced between
phases by a :class:`RecordingTimer` handed to the trainer), the median over the timed steps is
reported, and FLOP/s = training FLOPs per sample (``estimate``: FlopCounterMode on the meta
device) x samples/s.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Optional

import torch

from mindeye_dist.bench.common import PresetSpec, count, experiment_config, log, median, sync, synthetic_batch
from mindeye_dist.trainer import ModelDims, PhaseTimer, Trainer


class RecordingTimer(PhaseTimer):
    """Phase durations (forward_loss, backward, optimizer_step) of each micro-step, device synced
    at every mark; records only while ``enabled``."""

    def __init__(self, device: torch.device):
        self.device, self.enabled = device, False
        self.phases: list[tuple[float, ...]] = []
        self._row: list[float] = []
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            sync(self.device)
            self._row, self._t = [], time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.enabled:
            sync(self.device)
            now = time.perf_counter()
            self._row.append(now - self._t)
            self._t = now
            if phase == "optimizer_step":
                self.phases.append(tuple(self._row))


def make_trainer(spec: PresetSpec, cfg, device: torch.device, ds_config: Optional[dict[str, Any]] = None,
                 world_size: int = 1, rank: int = 0) -> Trainer:
    """The :class:`Trainer` ``train.run`` would build for this preset (at the spec's data dims)."""
    dims = ModelDims(**{k: (tuple(v) if k == "lowlevel_shape" else v) for k, v in spec.data_dims().items()}, nominal=True)
    return Trainer(cfg, dims, rank=rank, world_size=world_size, device=device, ds_config=ds_config,
                   timer=RecordingTimer(device))


class Stepper:
    """One training step exactly as ``train.run`` takes it: ``Trainer.step`` on an in-memory batch."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.timer: RecordingTimer = trainer.timer

    @property
    def skipped(self) -> int:
        return self.trainer.state.skipped_steps

    def __call__(self, batch, phases: Optional[list] = None) -> None:
        self.timer.enabled = phases is not None
        self.trainer.step([batch])
        if phases is not None:
            phases.append(self.timer.phases[-1])


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


VARIANTS = {
    "system_malloc": "glibc's allocator defaults (blocks over 32 MiB mmapped and unmapped on free) instead of "
                     "mindeye_dist.hostmem.reuse_freed_memory (train.host_memory=reuse, the CPU default)",
    "world1_allreduce": "DeepSpeed's backward all-reduce left on with one rank (it flattens every gradient into "
                        "buckets, 'all-reduces' them over one rank, scales by 1/1 and copies them back)",
    "fused_update": "DeepSpeed's own ZeRO-0 update instead of mindeye_dist.engine's fused one (fp32: its clip_grad_norm_, "
                    "a second norm pass and a multiply of every gradient; bf16: FP16_UnfusedOptimizer.step, an amax+amin "
                    "overflow scan, a norm and an unscale pass before the AdamW)",
}


def apply_variants(trainer: Trainer, names: list[str]) -> Callable[[], None]:
    """Turn the named speed-ups off (engine options and the host allocator, both public switches);
    returns the function that puts the shipped state back."""
    import dataclasses

    from mindeye_dist import hostmem

    options = trainer.engine.options
    allocator, shipped = hostmem.current(), dataclasses.replace(options)

    def restore() -> None:
        if allocator == "reuse" and hostmem.current() != "reuse":
            hostmem.reuse_freed_memory()
        for f in dataclasses.fields(shipped):
            setattr(options, f.name, getattr(shipped, f.name))

    for name in names:
        if name == "system_malloc":
            hostmem.system_defaults()
        elif name == "world1_allreduce":
            options.skip_one_rank_allreduce = False
        elif name == "fused_update":
            options.fused_update = False
        else:
            restore()
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return restore


# ---------------------------------------------------------------------------------------------


def measure_real_loader(stepper: Stepper, url: str, micro_batch: int, steps: int, warmup: int, num_workers: int,
                        device: torch.device) -> dict[str, Any]:
    """The same trainer drawing from ``build_train_loader`` (as in ``train.run``): data-wait share
    from the trainer's own meter."""
    from mindeye_dist.config import DataConfig
    from mindeye_dist.data import build_train_loader

    trainer = stepper.trainer
    cfg = DataConfig(url=url, num_workers=num_workers)
    trainer.attach_loader(build_train_loader(cfg, micro_batch, seed=0, rank=0, world_size=1))
    stepper.timer.enabled = False
    for _ in range(warmup):
        trainer.step()
    trainer.meter.start()
    for _ in range(steps):
        trainer.step()
    rep = trainer.meter.report(sync_device=device)
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
    trainer = make_trainer(spec, cfg, device)
    out["trainer_init_s"] = time.perf_counter() - t  # model build + DeepSpeed engine
    engine = trainer.engine
    wrapper = type(engine.engine.optimizer).__name__
    out["engine"] = (f"mindeye_dist.trainer.Trainer on DeepSpeedEngine (DeepSpeed ZeRO-{engine.zero_stage}, world of one, "
                     f"{precision}), optimizer {engine.optimizer_name}"
                     + (f" in DeepSpeed's {wrapper}" if engine.engine.optimizer is not engine.basic_optimizer else "")
                     + f", update: {engine.fused_path or 'DeepSpeed'}")
    stepper = Stepper(trainer)
    model_cfg = trainer.model.config
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
        out["variants"] = measure_variants(stepper, batch, vrow, variant_repeats, flops_per_sample, peak,
                                           datasheet_peak, device)
    if real_loader:
        out["real_loader"] = measure_real_loader(stepper, device=device, **real_loader)
        log(f"{spec.name} real loader: data-wait share {out['real_loader']['data_wait_share']:.3f}")
    out["skipped_steps"] = stepper.skipped
    del stepper, engine, trainer
    gc.collect()
    return out


def measure_variants(stepper: Stepper, batch, base_row: dict, repeats: int, flops_per_sample: float,
                     peak: float, datasheet_peak: Optional[float], device) -> dict[str, Any]:
    """Step time as shipped and with each shipped speed-up turned off on its own (the baseline is
    re-measured in the same window, interleaved, so load drift hits every side alike)."""
    from mindeye_dist import hostmem

    host_memory = "reuse" if hostmem.current() == "reuse" else "system"
    mb = base_row["micro_batch"]
    labels = [("as shipped", [])] + [(f"off: {n}", [n]) for n in VARIANTS
                                      if n != "fused_update" or stepper.trainer.engine.fused_path]
    if host_memory != "reuse":
        labels = [lab for lab in labels if lab[1] != ["system_malloc"]]
    result: dict[str, Any] = {"micro_batch": mb, "descriptions": VARIANTS, "host_memory": host_memory, "rows": {}}
    times: dict[str, list[float]] = {label: [] for label, _ in labels}
    phases: dict[str, list] = {label: [] for label, _ in labels}
    for _ in range(max(1, repeats)):
        for label, names in labels:
            restore = apply_variants(stepper.trainer, names)
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
