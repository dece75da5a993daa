"""Read a sweep's ``results.jsonl`` (the contract ``launchers/sweep.py`` writes) and check every row.

One JSON object per line. Rows with ``role`` "final" (or no role) are the sweep's trials and go
into the fits; they need every field in :data:`REQUIRED_FINAL`. Rows with ``role`` "lr_search" are
the learning-rate search (ASHA rungs or trials) and need only :data:`REQUIRED_SEARCH`. A row
missing a required field, or holding a value of the wrong kind, is an error naming the line, the
trial and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_FINAL = ("trial_id", "params", "data_size", "samples_seen", "flops", "lr", "val_loss",
                  "val_image_top1", "val_brain_top1", "wall_s", "overrides")
REQUIRED_SEARCH = ("trial_id", "lr", "val_loss")
ROLES = ("final", "lr_search")
# Final rows whose status is missing or one of these are fitted; any other status (a trial that
# errored but still wrote a row) is listed in the report and left out of the fits.
FITTED_STATUSES = ("finished", "ok", "completed", "terminated", "done", "success")

# field -> (lower bound, inclusive?, upper bound) for numbers; None = unbounded.
_NUMBER_RULES = {
    "params": (0.0, False, None), "data_size": (0.0, False, None), "samples_seen": (0.0, True, None),
    "flops": (0.0, True, None), "lr": (0.0, False, None),
    # The fits are on logarithms of the loss, so it must be positive.
    "val_loss": (0.0, False, None), "wall_s": (0.0, True, None),
    "val_image_top1": (0.0, True, 1.0), "val_brain_top1": (0.0, True, 1.0),
    "ridge_image_top1": (0.0, True, 1.0), "ridge_brain_top1": (0.0, True, 1.0),
    "way": (2.0, True, None), "rung": (0.0, True, None),
}


class ResultsError(ValueError):
    """``results.jsonl`` (or ``sweep.json``) is missing or malformed; the message names line, trial and field."""


@dataclass(frozen=True)
class Trial:
    """One finished trial of the sweep (a ``final`` row)."""

    trial_id: str
    """Ray Tune's trial id (or the sweep's own name for it)."""
    params: float
    """Trainable parameter count N."""
    data_size: float
    """Training stimuli per epoch D."""
    samples_seen: float
    """Training samples processed."""
    flops: float
    """Training FLOPs spent."""
    lr: float
    """Peak learning rate used."""
    val_loss: float
    """Contrastive validation loss (lower is better)."""
    val_image_top1: float
    """Image retrieval top-1 on the validation split, in [0, 1]."""
    val_brain_top1: float
    """Brain retrieval top-1 on the validation split, in [0, 1]."""
    wall_s: float
    """Wall-clock seconds of the trial."""
    overrides: dict
    """key=value overrides that define the trial."""
    ridge_image_top1: float | None = None
    """Ridge baseline's image top-1 on the same data's validation split."""
    ridge_brain_top1: float | None = None
    """Ridge baseline's brain top-1 on the same data's validation split."""
    status: str | None = None
    """Trial status as the sweep wrote it."""
    seed: int | None = None
    """Run seed."""
    way: int | None = None
    """Retrieval way (300 in MindEye's protocol; smaller on small validation sets)."""
    line: int = 0
    """Line of results.jsonl the row came from."""

    def fitted(self) -> bool:
        """Whether the trial goes into the fits (its status is missing or a finished one)."""
        return self.status is None or self.status.lower() in FITTED_STATUSES

    def below_ridge(self) -> list[str]:
        """Which retrievals ('image', 'brain') are below the ridge baseline."""
        out = []
        if self.ridge_image_top1 is not None and self.val_image_top1 < self.ridge_image_top1:
            out.append("image")
        if self.ridge_brain_top1 is not None and self.val_brain_top1 < self.ridge_brain_top1:
            out.append("brain")
        return out


@dataclass(frozen=True)
class SearchRow:
    """One row of the learning-rate search (an ``lr_search`` row: a rung or a trial)."""

    trial_id: str
    """Trial id of the search trial."""
    lr: float
    """Learning rate tried."""
    val_loss: float
    """Validation loss reached."""
    params: float | None = None
    """Trainable parameter count of the size searched."""
    data_size: float | None = None
    """Training stimuli per epoch of the size searched."""
    samples_seen: float | None = None
    """Samples processed when the row was written (the ASHA time attribute)."""
    rung: float | None = None
    """ASHA rung, when the sweep records it."""
    status: str | None = None
    """Trial status (e.g. stopped early, finished)."""
    line: int = 0
    """Line of results.jsonl the row came from."""


@dataclass
class SweepResults:
    """Everything ``results.jsonl`` and ``sweep.json`` hold, checked."""

    trials: list[Trial]
    """Final rows, in file order (duplicates resolved to the last row)."""
    search: list[SearchRow]
    """LR-search rows, in file order."""
    sweep: dict = field(default_factory=dict)
    """``sweep.json`` when present, else {}."""
    notes: list[str] = field(default_factory=list)
    """Things about the file itself the report should mention (duplicate rows, ...)."""

    def fitted(self) -> list[Trial]:
        """Final trials that go into the fits."""
        return [t for t in self.trials if t.fitted()]


def _where(path: Path, line: int, trial_id) -> str:
    return f"{path}:{line}" + (f": trial {trial_id!r}" if trial_id is not None else "")


def _check_number(row: dict, key: str, where: str) -> float:
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ResultsError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    lo, lo_inclusive, hi = _NUMBER_RULES[key]
    if (value < lo if lo_inclusive else value <= lo) or (hi is not None and value > hi):
        bound = f"{'>=' if lo_inclusive else '>'} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        raise ResultsError(f"{where}: field {key!r} must be {bound}, got {value!r}")
    return float(value)


def _optional_number(row: dict, key: str, where: str) -> float | None:
    return None if row.get(key) is None else _check_number(row, key, where)


def _parse_row(row: dict, path: Path, line: int) -> Trial | SearchRow:
    trial_id = row.get("trial_id")
    where = _where(path, line, trial_id)
    role = row.get("role") or "final"
    if role not in ROLES:
        raise ResultsError(f"{where}: field 'role' must be one of {', '.join(ROLES)} (or absent), got {role!r}")
    required = REQUIRED_FINAL if role == "final" else REQUIRED_SEARCH
    for key in required:
        if row.get(key) is None:
            raise ResultsError(f"{where}: missing required field {key!r} (a {role} row needs: "
                               f"{', '.join(required)})")
    status = None if row.get("status") is None else str(row["status"])
    if role == "lr_search":
        return SearchRow(trial_id=str(trial_id), lr=_check_number(row, "lr", where),
                         val_loss=_check_number(row, "val_loss", where),
                         params=_optional_number(row, "params", where),
                         data_size=_optional_number(row, "data_size", where),
                         samples_seen=_optional_number(row, "samples_seen", where),
                         rung=_optional_number(row, "rung", where), status=status, line=line)
    overrides = row["overrides"]
    if isinstance(overrides, list) and all(isinstance(o, str) and "=" in o for o in overrides):
        overrides = dict(o.split("=", 1) for o in overrides)  # ["key=value", ...], as sweeps before 2026-11-30 wrote
    if not isinstance(overrides, dict):
        raise ResultsError(f"{where}: field 'overrides' must be an object of key: value, got {row['overrides']!r}")
    numbers = {k: _check_number(row, k, where) for k in REQUIRED_FINAL if k not in ("trial_id", "overrides")}
    way = _optional_number(row, "way", where)
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ResultsError(f"{where}: field 'seed' must be an integer, got {seed!r}")
    return Trial(trial_id=str(trial_id), overrides=dict(overrides), **numbers,
                 ridge_image_top1=_optional_number(row, "ridge_image_top1", where),
                 ridge_brain_top1=_optional_number(row, "ridge_brain_top1", where),
                 status=status, seed=seed, way=None if way is None else int(way), line=line)


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise ResultsError(f"{path}:{line}: not valid JSON ({err.msg} at column {err.colno}); "
                               "each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ResultsError(f"{path}:{line}: each line must be a JSON object, got {type(row).__name__}")
        rows.append((line, row))
    return rows


def load_results(sweep_dir: str | Path) -> SweepResults:
    """Read and check ``SWEEP_DIR/results.jsonl`` (and ``SWEEP_DIR/sweep.json`` when present)."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "results.jsonl"
    if not path.is_file():
        raise ResultsError(f"{path} not found: run `python launchers/sweep.py --config SWEEP.yaml "
                           f"--out {sweep_dir}` first (it writes one row per finished trial)")
    trials: dict[str, Trial] = {}
    search, notes = [], []
    for line, row in _read_rows(path):
        parsed = _parse_row(row, path, line)
        if isinstance(parsed, SearchRow):
            search.append(parsed)
            continue
        if parsed.trial_id in trials:
            # A resumed sweep may write a finished trial twice; the later row is the one that counts.
            notes.append(f"trial {parsed.trial_id!r} appears on lines {trials[parsed.trial_id].line} "
                         f"and {line}; the report uses line {line}")
            del trials[parsed.trial_id]
        trials[parsed.trial_id] = parsed
    if not trials:
        raise ResultsError(f"{path} holds no final trials (rows with role 'final' or no role): "
                           "nothing to fit; has the sweep finished any trial?")
    sweep = {}
    sweep_json = sweep_dir / "sweep.json"
    if sweep_json.is_file():
        try:
            sweep = json.loads(sweep_json.read_text())
        except json.JSONDecodeError as err:
            raise ResultsError(f"{sweep_json}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(sweep, dict):
            raise ResultsError(f"{sweep_json}: must hold a JSON object (the sweep config)")
    return SweepResults(trials=list(trials.values()), search=search, sweep=sweep, notes=notes)
