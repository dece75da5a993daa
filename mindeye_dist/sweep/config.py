"""Sweep configuration: typed like the experiment config (dataclasses, YAML, ``key=value`` overrides).

A sweep trains one base experiment at several model sizes and data sizes (and seeds), picks the
learning rate per model size by an ASHA search, and hands every trial to ``train.run`` through
Ray Train. Example (``launchers/configs/sweeps/smoke.yaml``)::

    name: smoke
    base:
      config: launchers/configs/demo.yaml      # the experiment every trial starts from
      ds_config: ds_configs/zero2.json
      overrides: [model.prior=false]              # applied to every trial
    data:
      synthetic: {preset: tiny, seed: 0}          # built into SWEEP_DIR/data when url is empty
    models:
      - {name: h16, overrides: [model.hidden_dim=16]}
      - {name: h64, overrides: [model.hidden_dim=64]}
    data_sizes: [1.0]                             # fractions (<= 1.0) or counts of training stimuli
    seeds: [0]
    lr: {search: asha, values: [1.0e-3, 3.0e-3, 1.0e-2]}
    budget: {samples: 4000}                       # per trial: steps = samples / global batch
    resources: {workers_per_trial: 2, cpus_per_worker: 1}

Errors name the dotted key (``lr.values[1]``) like the experiment config's do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from mindeye_dist.config import _check, apply_overrides, from_dict, load_yaml

__all__ = ["BaseSpec", "BudgetSpec", "DataSpec", "LRSpec", "ModelSize", "ResourceSpec", "SweepConfig",
           "load_sweep_config"]


@dataclass
class BaseSpec:
    config: str = "launchers/configs/demo.yaml"
    """Experiment YAML every trial starts from (the shipped demo recipe by default)."""
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON for every trial."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` experiment overrides applied to every trial (before the trial's own)."""


@dataclass
class DataSpec:
    url: str = ""
    """Dataset every trial reads (local path or s3://); empty = build ``synthetic`` into SWEEP_DIR/data."""
    synthetic: dict = field(default_factory=dict)
    """``{preset: NAME, seed: N}`` or ``{member: FAMILY_MEMBER}`` (plus SyntheticSpec field overrides)
    for the dataset built when ``url`` is empty."""
    s3_endpoint: str = ""
    """S3 endpoint for ``url`` (empty: AWS_ENDPOINT_URL or AWS)."""


@dataclass
class ModelSize:
    name: str = ""
    """Label of this size in results, tables and figures (letters, digits, ``-``, ``_``)."""
    overrides: list[str] = field(default_factory=list)
    """``model.*`` overrides that make this size (``model.preset=scale-1b`` or width/depth)."""

    def __post_init__(self) -> None:
        import re

        _check(bool(re.fullmatch(r"[A-Za-z0-9_-]+", self.name)), "models[].name", self.name,
               "a label of letters, digits, - and _")
        for o in self.overrides:
            _check(o.startswith("model."), f"models.{self.name}.overrides", o, "model.* key=value overrides")


@dataclass
class LRSpec:
    search: Literal["asha", "none"] = "asha"
    """``asha``: per model size, an ASHA search over ``values`` on validation loss against samples
    seen; the full runs use the winner. ``none``: every trial uses ``values[0]``."""
    values: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    """Candidate peak learning rates (``optim.max_lr``)."""
    grace_fraction: float = 0.2
    """ASHA's first rung, as a share of the trial budget (cheap rungs first)."""
    reduction_factor: int = 3
    """ASHA keeps 1 in this many trials at each rung."""
    data_size: Optional[float] = None
    """Data size the search runs at (one of ``data_sizes``); null = the largest."""
    concurrency: Optional[int] = None
    """Candidates of one size trained at once; null = all of them. 1 runs them one after another,
    middle value first: later candidates are stopped at a rung when they trail the recorded ones,
    and a machine with fewer cores than ranks x candidates is not oversubscribed."""

    def __post_init__(self) -> None:
        _check(self.concurrency is None or self.concurrency >= 1, "lr.concurrency", self.concurrency,
               "an integer >= 1, or null for all candidates at once")
        _check(len(self.values) >= 1 and all(v > 0 for v in self.values), "lr.values", self.values,
               "a non-empty list of positive learning rates")
        _check(0 < self.grace_fraction <= 1, "lr.grace_fraction", self.grace_fraction, "a fraction in (0, 1]")
        _check(self.reduction_factor >= 2, "lr.reduction_factor", self.reduction_factor, "an integer >= 2")


@dataclass
class BudgetSpec:
    samples: Optional[int] = None
    """Training samples per trial (every size gets the same; steps = samples / global batch)."""
    flops: Optional[float] = None
    """Training FLOPs per trial instead (compute-matched: bigger models see fewer samples)."""
    evals: int = 10
    """Validations per trial (ASHA's rungs can only fall on them)."""
    min_steps: int = 10
    """Fewest optimizer steps a trial gets, whatever the budget says."""

    def __post_init__(self) -> None:
        _check((self.samples is None) != (self.flops is None), "budget", {"samples": self.samples, "flops": self.flops},
               "exactly one of budget.samples and budget.flops")
        _check(self.samples is None or self.samples > 0, "budget.samples", self.samples, "a positive integer")
        _check(self.flops is None or self.flops > 0, "budget.flops", self.flops, "a positive number")
        _check(self.evals >= 1, "budget.evals", self.evals, "an integer >= 1")
        _check(self.min_steps >= 1, "budget.min_steps", self.min_steps, "an integer >= 1")


@dataclass
class ResourceSpec:
    workers_per_trial: int = 2
    """Ray Train workers (ranks) per trial."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker (fractions allowed)."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (0 trains on CPU with gloo; >0 uses NCCL)."""
    concurrency: int = 1
    """Trials running at once in the final phase (the ASHA search runs all of a size's candidates
    at once so its rungs compare them)."""
    device_memory_gb: Optional[float] = None
    """Memory per rank on the device (GPU memory, or host memory per rank on CPU); a trial whose
    estimated peak does not fit is refused before anything starts. Null: not checked."""
    placement: Literal["PACK", "SPREAD"] = "PACK"
    """Ray placement of a trial's workers: PACK on as few nodes as possible, SPREAD across nodes."""

    def __post_init__(self) -> None:
        _check(self.workers_per_trial >= 1, "resources.workers_per_trial", self.workers_per_trial, "an integer >= 1")
        _check(self.cpus_per_worker > 0, "resources.cpus_per_worker", self.cpus_per_worker, "> 0")
        _check(self.gpus_per_worker >= 0, "resources.gpus_per_worker", self.gpus_per_worker, ">= 0")
        _check(self.concurrency >= 1, "resources.concurrency", self.concurrency, "an integer >= 1")


@dataclass
class SweepConfig:
    name: str = "sweep"
    """Name of the sweep (Ray experiment names are derived from it)."""
    base: BaseSpec = field(default_factory=BaseSpec)
    """The experiment every trial starts from."""
    data: DataSpec = field(default_factory=DataSpec)
    """The dataset."""
    models: list[ModelSize] = field(default_factory=list)
    """Model sizes (the parameter axis)."""
    data_sizes: list[float] = field(default_factory=lambda: [1.0])
    """Training stimuli per trial: fractions of the train split (<= 1.0) or counts (> 1)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """``run.seed`` of the full runs (the LR search uses the first)."""
    lr: LRSpec = field(default_factory=LRSpec)
    """How the learning rate is chosen per size."""
    budget: BudgetSpec = field(default_factory=lambda: BudgetSpec(samples=10_000))
    """Training budget per trial."""
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    """Ray resources."""
    max_failures: int = 2
    """A failed trial is retried this many times, resuming from its own last checkpoint."""
    dashboard: bool = False
    """Start Ray's dashboard (bound to 127.0.0.1) when the sweep starts its own Ray."""

    def __post_init__(self) -> None:
        _check(len(self.models) >= 1, "models", self.models, "at least one model size")
        names = [m.name for m in self.models]
        _check(len(set(names)) == len(names), "models[].name", names, "distinct names")
        _check(len(self.data_sizes) >= 1 and all(d > 0 for d in self.data_sizes), "data_sizes", self.data_sizes,
               "positive fractions (<= 1.0) or counts")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds, "distinct seeds")
        _check(self.max_failures >= 0, "max_failures", self.max_failures, ">= 0")
        if self.lr.data_size is not None:
            _check(self.lr.data_size in self.data_sizes, "lr.data_size", self.lr.data_size,
                   f"one of data_sizes {self.data_sizes}")

    def search_data_size(self) -> float:
        return self.lr.data_size if self.lr.data_size is not None else max(self.data_sizes)


def load_sweep_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> SweepConfig:
    """Defaults < YAML < ``key=value`` overrides, validated (errors name the key)."""
    data = load_yaml(path)
    data = apply_overrides(data, list(overrides or []))
    return from_dict(SweepConfig, data)
