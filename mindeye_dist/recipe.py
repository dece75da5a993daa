"""The recipe for a new dataset: training settings derived from the data's size and shape.

``launchers/configs/default.yaml`` (what ``train.py`` uses without ``--config``) sets
``recipe: auto``. :func:`load_config` then reads the dataset's ``meta.json`` and fills in the
settings below *under* the YAML and the command line: anything a config file or a ``key=value``
names explicitly wins, and the resolved values are what the run directory's ``config.yaml``
records. Print them for a dataset without training::

    python -m mindeye_dist.recipe DATA_URL

The rules, and the measurements behind them (README "The recipe for a new dataset"; the study's
commands and tables are in ``docs/recipe.md``):

* **Width.** The backbone's hidden width follows the distinct training stimuli ``n``:
  ``hidden = clip(2^round(log2(n / 6)), 256, 1024)`` (1,000 stimuli: 256; 6,000: 1024).
  A wider first layer needs more stimuli to fit; on the family's tuning members 1024 beat the
  demo's 256 wherever there were thousands of stimuli.
* **Depth.** One residual block: the second block of the demo preset bought nothing on any
  tuning member and costs steps.
* **Schedule.** A fixed number of passes over the distinct stimuli, more when there are few of
  them (``epochs = clip(60 * sqrt(1000 / n), 15, 120)``), capped at :data:`MAX_SAMPLES` so a
  40-session dataset still trains in minutes on a CPU; validation ~12 times per run,
  ``checkpoint.select=best`` (evaluate.py and export.py use the best validation, never the test
  split), early stop after 4 validations without improvement.
* **Batch.** 256 stimuli per optimizer step, fewer when the dataset is small (at most an eighth of
  the stimuli per step, so an epoch is ≥ 8 steps); split across the ranks the launcher started
  (``WORLD_SIZE``) and rounded so every rank gets whole micro-batches.
* **Ridge stacked with the MLP** (``model.ridge_skip_rank``, :mod:`mindeye_dist.models.ridge_skip`):
  rank 1024 whenever rank 0 can hold the training split for the closed-form fit (at most
  :data:`RIDGE_SKIP_MAX_BYTES`; 40 sessions of NSD-sized 257x768 targets would not), else off.
* **Temperature, learning rate, mixup, regularisation.** Fixed, not derived: see default.yaml,
  where each is justified.

None of this applies to the MindEye presets' configs (``mindeye1.yaml``, ``mindeye2*.yaml``),
which keep the references' settings.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

MAX_SAMPLES = 400_000
"""Cap on training samples (stimulus presentations) of a derived schedule."""
TARGET_GLOBAL_BATCH = 256
"""Stimuli per optimizer step when the dataset has enough of them."""
EVALS_PER_RUN = 12
"""Validations per run (checkpoint.select=best picks among them)."""
RIDGE_SKIP_RANK = 1024
"""Rank of the ridge map stacked with the MLP (model.ridge_skip_rank) when the data allow it."""
RIDGE_SKIP_MAX_BYTES = 8 << 30
"""Most host memory the ridge fit may take on rank 0 (see :func:`ridge_fit_bytes`)."""


def ridge_fit_bytes(n_train: int, n_voxels: int, out_dim: int) -> int:
    """Rank 0's memory for the ridge skip's fit: the training split in float32 (voxels and
    targets) plus the float64 copy and centred copy of the voxels the SVD works on."""
    return 4 * n_train * (n_voxels + out_dim) + 16 * n_train * n_voxels


@dataclass(frozen=True)
class DataShape:
    """What the rules read from meta.json."""

    n_train: int
    """Distinct training stimuli (train split rows)."""
    n_voxels: int
    n_tokens: int
    token_dim: int
    reps: int
    n_val: int

    @classmethod
    def from_meta(cls, meta, train_split: str = "train", val_split: str = "val") -> "DataShape":
        train = meta.split(train_split)
        n_val = meta.splits[val_split].count if val_split in meta.splits else 0
        return cls(n_train=int(train.count), n_voxels=int(meta.n_voxels), n_tokens=int(meta.n_tokens),
                   token_dim=int(meta.token_dim), reps=int(train.reps), n_val=int(n_val))


def _pow2(x: float) -> int:
    return int(2 ** round(math.log2(max(x, 1.0))))


def derive(shape: DataShape, world_size: int = 1) -> tuple[dict[str, Any], dict[str, str]]:
    """(settings as a nested config mapping, why each was chosen) for a dataset of ``shape``."""
    n = shape.n_train
    why: dict[str, str] = {}
    hidden = int(min(1024, max(256, _pow2(n / 6))))
    why["model.hidden_dim"] = f"{n} distinct training stimuli -> clip(2^round(log2(n/6)), 256, 1024) = {hidden}"
    global_batch = int(min(TARGET_GLOBAL_BATCH, max(8, n // 8)))
    micro = max(1, global_batch // max(1, world_size))
    why["train.micro_batch_size"] = (f"min({TARGET_GLOBAL_BATCH}, n/8) = {global_batch} stimuli per step over "
                                     f"{world_size} rank(s) -> {micro} per rank")
    step_samples = micro * max(1, world_size)
    epochs = float(min(120.0, max(15.0, 60.0 * math.sqrt(1000.0 / max(n, 1)))))
    samples = min(MAX_SAMPLES, epochs * n)
    steps = max(50, int(round(samples / step_samples)))
    why["train.max_steps"] = (f"clip(60*sqrt(1000/n), 15, 120) = {epochs:.0f} epochs of {n} stimuli, capped at "
                              f"{MAX_SAMPLES:,} samples -> {steps} steps of {step_samples}")
    every = max(10, steps // EVALS_PER_RUN)
    why["train.eval_every_steps"] = f"~{EVALS_PER_RUN} validations per run -> every {every} steps"
    fit_bytes = ridge_fit_bytes(n, shape.n_voxels, shape.n_tokens * shape.token_dim)
    ridge_rank = RIDGE_SKIP_RANK if fit_bytes <= RIDGE_SKIP_MAX_BYTES and shape.n_val >= 2 else 0
    why["model.ridge_skip_rank"] = (
        f"ridge stacked with the MLP, rank {RIDGE_SKIP_RANK}: its fit holds {fit_bytes / 2**30:.2f} GiB on rank 0"
        if ridge_rank else
        "off: no validation split to choose its alpha and blend on" if shape.n_val < 2 else
        f"off: its fit would hold {fit_bytes / 2**30:.1f} GiB on rank 0 (> {RIDGE_SKIP_MAX_BYTES / 2**30:.0f} GiB)")
    settings: dict[str, Any] = {
        "model": {"hidden_dim": hidden, "projector_hidden_dim": hidden, "ridge_skip_rank": ridge_rank},
        "train": {"micro_batch_size": micro, "max_steps": steps, "eval_every_steps": every,
                  "log_every_steps": max(1, min(50, every // 2))},
        "checkpoint": {"every_steps": every},
    }
    if shape.n_val < 2:
        # No validation split: nothing to select on or stop early with.
        settings["train"]["eval_every_steps"] = 0
        settings["checkpoint"]["select"] = "last"
        settings["train"]["early_stop_patience"] = 0
        why["train.eval_every_steps"] = "the dataset has no validation split: no validation, last checkpoint"
    return settings, why


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def world_size_from_env() -> int:
    """Ranks the launcher started (deepspeed, torchrun and Ray Train set WORLD_SIZE); 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def apply(data: dict[str, Any], world_size: Optional[int] = None) -> dict[str, Any]:
    """``data`` (a config mapping with ``recipe: auto``) with the derived settings underneath it."""
    from mindeye_dist.data.errors import DataError
    from mindeye_dist.data.meta import read_meta
    from mindeye_dist.errors import ConfigError

    section = data.get("data") or {}
    url = section.get("url") or ""
    if not url:
        # Nothing to derive from yet (training refuses an empty data.url by itself); a validation
        # cadence keeps default.yaml's checkpoint.select=best loadable for inspection.
        return _merge({"train": {"eval_every_steps": 100}}, data)
    try:
        meta = read_meta(str(url), section.get("s3_endpoint") or None)
    except DataError as err:
        raise ConfigError(f"recipe: auto could not read the dataset at data.url={url!r}: {err}") from err
    shape = DataShape.from_meta(meta, section.get("train_split", "train"), section.get("val_split", "val"))
    settings, _ = derive(shape, world_size if world_size is not None else world_size_from_env())
    return _merge(settings, data)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import json
    import sys

    from mindeye_dist.data.meta import read_meta

    parser = argparse.ArgumentParser(description="Print the settings recipe: auto derives for a dataset.")
    parser.add_argument("data_url")
    parser.add_argument("--world-size", type=int, default=2, help="ranks the run will use (default 2)")
    parser.add_argument("--s3-endpoint", default=None)
    parser.add_argument("--json", action="store_true", help="print the settings as JSON")
    args = parser.parse_args(argv)
    try:
        shape = DataShape.from_meta(read_meta(args.data_url, args.s3_endpoint))
    except Exception as err:  # noqa: BLE001 - a CLI answer, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings, why = derive(shape, args.world_size)
    if args.json:
        print(json.dumps({"shape": shape.__dict__, "settings": settings, "why": why}, indent=2))
        return 0
    print(f"{args.data_url}: {shape.n_train} training stimuli x {shape.reps} reps, {shape.n_voxels} voxels, "
          f"{shape.n_tokens}x{shape.token_dim} targets, {shape.n_val} validation stimuli")
    for key, reason in why.items():
        print(f"  {key:26s} {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
