"""The trials of a sweep, their schedules, FLOPs and memory: everything decided before Ray starts.

Each model size is counted once on the meta device (:func:`mindeye_dist.estimate.estimate`:
parameters, training FLOPs per sample, memory per rank for the sweep's DeepSpeed config), so
``--dry-run`` can print the plan and refuse a trial that cannot fit the declared device memory
before anything is launched. Schedules are matched per size: a trial's steps follow from the
budget (samples, or FLOPs / FLOPs-per-sample) and the global batch, and ``train.max_steps`` sets
the length of its LR and loss schedules (a OneCycle cut short would under-train; Chinchilla).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mindeye_dist.config import ExperimentConfig, load_config
from mindeye_dist.errors import ConfigError
from mindeye_dist.sweep.config import SweepConfig

SEARCH, FINAL = "lr_search", "final"
REPO_ROOT = Path(__file__).resolve().parents[2]
"""Relative config paths are looked up in the working directory, then here (a source checkout)."""


@dataclass
class SizeInfo:
    name: str
    overrides: list[str]
    params: int
    flops_per_sample: float
    peak_bytes_per_rank: Optional[int]
    """Estimated peak memory per rank (model states + transients + activations)."""


@dataclass
class TrialSpec:
    trial_id: str
    """Stable id: ``SIZE-dDATA-sSEED-lrLR`` (the run directory's name)."""
    role: str
    """``lr_search`` (an ASHA candidate) or ``final`` (a full run at the chosen rate)."""
    size: str
    data_size: int
    """Training stimuli (rows of the train split) this trial uses."""
    seed: int
    lr: Optional[float]
    """Peak learning rate (None until the search has chosen it)."""
    steps: int
    samples: int
    """Training samples the trial consumes (steps x global batch)."""
    flops: float
    """Training FLOPs the trial spends (samples x FLOPs per sample)."""
    params: int
    overrides: list[str] = field(default_factory=list)
    """Every ``key=value`` that defines the trial, on top of the base config (run.dir excluded)."""

    def with_lr(self, lr: float) -> "TrialSpec":
        return dataclasses.replace(self, lr=lr, trial_id=trial_id(self.size, self.data_size, self.seed, lr),
                                   overrides=[o for o in self.overrides if not o.startswith("optim.max_lr=")]
                                   + [f"optim.max_lr={lr!r}"])


def trial_id(size: str, data_size: int, seed: int, lr: Optional[float]) -> str:
    return f"{size}-d{data_size}-s{seed}" + ("" if lr is None else f"-lr{lr:.3g}")


@dataclass
class SweepPlan:
    sweep: SweepConfig
    data_url: str
    train_count: int
    """Rows in the dataset's train split."""
    global_batch: int
    sizes: dict[str, SizeInfo]
    data_sizes: list[int]
    search: list[TrialSpec]
    """ASHA candidates: every size x every lr value, at the search data size and the first seed."""
    finals: list[TrialSpec]
    """Full runs: size x data x seed; ``lr`` None while it waits for the search."""

    def to_json(self) -> dict[str, Any]:
        from mindeye_dist.config import to_dict

        return {"sweep": to_dict(self.sweep), "data_url": self.data_url, "train_count": self.train_count,
                "global_batch": self.global_batch, "data_sizes": self.data_sizes,
                "sizes": {k: dataclasses.asdict(v) for k, v in self.sizes.items()},
                "search": [dataclasses.asdict(t) for t in self.search],
                "finals": [dataclasses.asdict(t) for t in self.finals]}


def base_config(sweep: SweepConfig, data_url: str, extra: Optional[list[str]] = None) -> ExperimentConfig:
    """The experiment config a trial starts from (base YAML < base overrides < ``extra``).

    Ridge stacking (``model.ridge_skip_rank``, which ``recipe: auto`` derives) is off unless the
    sweep's overrides turn it on: a trial's validation loss is what the scaling report fits, and
    a blend with a closed-form ridge map that is the same at every model size is not the network's."""
    from mindeye_dist.ds_config import find_ds_config

    path = Path(sweep.base.config)
    if not path.is_file() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    overrides = ["model.ridge_skip_rank=0", *sweep.base.overrides, f"data.url={data_url}", f"run.ds_config={find_ds_config(sweep.base.ds_config)}",
                 *([f"data.s3_endpoint={sweep.data.s3_endpoint}"] if sweep.data.s3_endpoint else []), *(extra or [])]
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        raise ConfigError(f"sweep base experiment ({sweep.base.config} + base.overrides): {err}") from err


def _data_count(value: float, train_count: int) -> int:
    n = int(round(value * train_count)) if value <= 1.0 else int(value)
    if not 1 <= n <= train_count:
        raise ConfigError(f"data_sizes entry {value} gives {n} training stimuli; the train split has {train_count}")
    return n


def _count_size(cfg: ExperimentConfig, meta, ds: dict[str, Any], world: int) -> tuple[int, float, Optional[int]]:
    import contextlib
    import sys

    from mindeye_dist.estimate import estimate
    from mindeye_dist.trainer import ModelDims

    dims = {k: v for k, v in ModelDims.from_meta(meta).kwargs().items() if k != "nominal"}
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's estimators print
        est = estimate(cfg.model, **dims, ds_config=ds, world_size=world,
                       micro_batch_size=cfg.train.micro_batch_size, precision=cfg.train.precision)
    from mindeye_dist.ds_config import zero_stage

    stages = est["memory"]["stages"]
    stage = next((v for v in stages.values() if v["stage"] == zero_stage(ds)), None)
    return int(est["params"]["total"]), float(est["flops"]["total"]), None if stage is None else int(stage["peak_bytes"])


def make_plan(sweep: SweepConfig, data_url: str) -> SweepPlan:
    """Count every size, turn budgets into steps, list the trials. Reads meta.json only."""
    from mindeye_dist.data import read_meta
    from mindeye_dist.ds_config import load_ds_config, resolve_ds_config

    world = sweep.resources.workers_per_trial
    base = base_config(sweep, data_url)
    meta = read_meta(data_url, s3_endpoint=sweep.data.s3_endpoint or None)
    train_count = meta.split(base.data.train_split).count
    global_batch = base.train.micro_batch_size * base.train.grad_accum_steps * world
    sizes: dict[str, SizeInfo] = {}
    for size in sweep.models:
        cfg = base_config(sweep, data_url, size.overrides)
        ds = resolve_ds_config(load_ds_config(cfg.run.ds_config), cfg, world)
        params, fps, peak = _count_size(cfg, meta, ds, world)
        sizes[size.name] = SizeInfo(size.name, list(size.overrides), params, fps, peak)
    data_sizes = sorted({_data_count(d, train_count) for d in sweep.data_sizes})
    search_data = _data_count(sweep.search_data_size(), train_count)

    def spec(size: str, data: int, seed: int, lr: Optional[float], role: str) -> TrialSpec:
        info = sizes[size]
        budget = sweep.budget.samples if sweep.budget.samples is not None else sweep.budget.flops / info.flops_per_sample
        steps = max(sweep.budget.min_steps, math.ceil(budget / global_batch))
        evals = min(sweep.budget.evals, steps)
        overrides = [*info.overrides, f"train.max_steps={steps}", f"train.eval_every_steps={max(1, steps // evals)}",
                     f"run.seed={seed}"] + ([f"data.train_subset={data}"] if data < train_count else [])
        t = TrialSpec(trial_id(size, data, seed, None), role, size, data, seed, None, steps, steps * global_batch,
                      steps * global_batch * info.flops_per_sample, info.params, overrides)
        return t.with_lr(lr) if lr is not None else t

    first_seed = sweep.seeds[0]
    if sweep.lr.search == "asha":
        search = [spec(m.name, search_data, first_seed, lr, SEARCH) for m in sweep.models for lr in sweep.lr.values]
        finals = [spec(m.name, d, s, None, FINAL) for m in sweep.models for d in data_sizes for s in sweep.seeds]
    else:
        search = []
        finals = [spec(m.name, d, s, sweep.lr.values[0], FINAL) for m in sweep.models for d in data_sizes
                  for s in sweep.seeds]
    return SweepPlan(sweep, data_url, train_count, global_batch, sizes, data_sizes, search, finals)


def check_memory(plan: SweepPlan) -> list[str]:
    """Trials that cannot fit ``resources.device_memory_gb`` (one line each; empty when all fit)."""
    limit = plan.sweep.resources.device_memory_gb
    if limit is None:
        return []
    bad = []
    for name, info in plan.sizes.items():
        if info.peak_bytes_per_rank is not None and info.peak_bytes_per_rank > limit * 2**30:
            bad.append(f"{name}: estimated peak {info.peak_bytes_per_rank / 2**30:.1f} GiB per rank > "
                       f"resources.device_memory_gb={limit:g} (more workers per trial, a ZeRO-3 / offload "
                       f"ds_config, or a smaller micro-batch)")
    return bad


def format_plan(plan: SweepPlan) -> str:
    """The dry-run table: every trial with its resources, schedule, FLOPs and memory per rank."""
    res = plan.sweep.resources
    lines = [f"sweep {plan.sweep.name!r}: dataset {plan.data_url} ({plan.train_count} training stimuli), "
             f"global batch {plan.global_batch} ({res.workers_per_trial} workers x "
             f"{res.cpus_per_worker:g} CPU{f' + {res.gpus_per_worker:g} GPU' if res.gpus_per_worker else ''})",
             f"{'trial':34s}{'role':>10s}{'params':>14s}{'data':>8s}{'lr':>9s}{'steps':>7s}{'samples':>10s}"
             f"{'FLOPs':>10s}{'mem/rank':>10s}"]
    for t in [*plan.search, *plan.finals]:
        peak = plan.sizes[t.size].peak_bytes_per_rank
        lr = "search" if t.lr is None else f"{t.lr:.3g}"
        mem = "?" if peak is None else f"{peak / 2**30:.2f}G" if peak >= 2**30 else f"{peak / 2**20:.0f}M"
        lines.append(f"{t.trial_id:34s}{t.role:>10s}{t.params:>14,d}{t.data_size:>8d}{lr:>9s}{t.steps:>7d}"
                     f"{t.samples:>10d}{t.flops:>10.2e}{mem:>10s}")
    total = sum(t.flops for t in plan.search) + sum(t.flops for t in plan.finals)
    lines.append(f"{len(plan.search)} search + {len(plan.finals)} full trials, {total:.2e} training FLOPs in all "
                 "(search candidates stopped early by ASHA spend less)")
    return "\n".join(lines)


def write_plan(plan: SweepPlan, sweep_dir: Path) -> None:
    from mindeye_dist.fsutil import atomic_write_bytes

    atomic_write_bytes(sweep_dir / "sweep.json", (json.dumps(plan.to_json(), indent=2) + "\n").encode())
