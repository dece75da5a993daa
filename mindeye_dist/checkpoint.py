"""Train state, step-numbered checkpoints, ``latest`` written last, keep-last-k, export.

Layout under ``RUN_DIR/checkpoints/``::

    step_0000100/            DeepSpeed's own files (every rank writes its shards)
        train_state_rank00000.pt   TrainState + RNG states of that rank
        train_state.json           human-readable copy of rank 0's TrainState
        COMPLETE                   written by rank 0 after every rank finished
    latest                   the tag of the newest COMPLETE checkpoint, replaced atomically
    best                     (checkpoint.select=best) the tag of the best-on-validation checkpoint

A checkpoint becomes visible only when ``latest`` names it, and ``latest`` is replaced only after
every rank's files are on disk and ``COMPLETE`` exists, so a job killed mid-save (even with
SIGKILL) resumes from the previous checkpoint; the partial directory is overwritten or pruned.
DeepSpeed's file is also called ``latest`` and holds just the tag, so ``engine.load_checkpoint``
reads ours unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mindeye_dist.fsutil import atomic_write_bytes, fsync_dir

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"


@dataclass
class TrainState:
    """Everything besides weights and optimizer needed to continue a run exactly."""

    step: int = 0
    """Optimizer steps completed (skipped non-finite steps included)."""
    samples_seen: int = 0
    """Training samples consumed across all ranks (skipped batches included)."""
    epoch: int = 0
    """Data epoch the next batch comes from."""
    batch_in_epoch: int = 0
    """Micro-batches this rank has consumed in ``epoch`` (the data position)."""
    positions: list = field(default_factory=list)
    """Multi-subject runs: the (epoch, batch) of each dataset's loader (its own exact epochs)."""
    skipped_steps: int = 0
    """Steps skipped because the loss or gradients were not finite on some rank."""
    consecutive_bad: int = 0
    """Non-finite steps in a row (the run aborts at train.max_bad_steps)."""
    total_steps: int = 0
    """train.max_steps the run was started with (the loss schedule is a function of step / this)."""
    world_size: int = 1
    """Ranks that wrote the checkpoint."""
    best_val: dict = field(default_factory=dict)
    """Best validation metrics so far (never test)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rng_state(extra_generators: Optional[dict[str, torch.Generator]] = None) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),  # tensors load with weights_only
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], extra_generators: Optional[dict[str, torch.Generator]] = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    import ast

    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, gen in (extra_generators or {}).items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(ckpt_dir: str | os.PathLike) -> Optional[str]:
    """The tag ``latest`` names, if it exists and that checkpoint is COMPLETE; else None."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag or not (ckpt_dir / tag / COMPLETE).is_file():
        raise RuntimeError(
            f"{latest} names {tag!r}, which is not a complete checkpoint. The file was edited or the "
            f"checkpoint deleted; point it at a directory under {ckpt_dir} that contains {COMPLETE}."
        )
    return tag


def complete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.glob("step_*") if (p / COMPLETE).is_file())


def prepare_tag_dir(ckpt_dir: Path, tag: str) -> None:
    """Rank 0, before a save: remove a partial directory a killed save left under this tag."""
    target = ckpt_dir / tag
    if target.exists():
        if (ckpt_dir / LATEST).is_file() and (ckpt_dir / LATEST).read_text().strip() == tag:
            raise RuntimeError(f"refusing to overwrite {target}: it is the checkpoint 'latest' names")
        shutil.rmtree(target)
    ckpt_dir.mkdir(parents=True, exist_ok=True)


def write_rank_state(ckpt_dir: Path, tag: str, rank: int, state: TrainState, rng: dict[str, Any]) -> None:
    target = ckpt_dir / tag
    target.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({"train_state": state.to_dict(), "rng": rng}, target / f"train_state_rank{rank:05d}.pt")
    if rank == 0:
        atomic_write_bytes(target / "train_state.json", (json.dumps(state.to_dict(), indent=2) + "\n").encode())


def commit(ckpt_dir: Path, tag: str, keep_last: int, best: bool = False) -> list[str]:
    """Rank 0, after every rank wrote its files: mark COMPLETE, point ``latest`` at it (and
    ``best`` when ``best``), prune.

    Returns the tags removed. Only checkpoints older than the new one are pruned, and the
    partial directories of killed saves are removed with them; the one ``best`` names is kept.
    """
    atomic_write_bytes(ckpt_dir / tag / COMPLETE, b"")
    atomic_write_bytes(ckpt_dir / LATEST, tag.encode())
    if best:  # after latest: a kill in between leaves TrainState.best_val["tag"], which resume re-marks
        mark_best(ckpt_dir, tag)
    removed = []
    complete = complete_tags(ckpt_dir)
    keep = set(complete[-keep_last:]) | {tag}
    best_file = ckpt_dir / BEST
    if best_file.is_file():
        keep.add(best_file.read_text().strip())
    for path in sorted(ckpt_dir.glob("step_*")):
        if path.name not in keep and path.name < tag:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def mark_best(ckpt_dir: Path, tag: str) -> None:
    """Point ``best`` at the complete checkpoint ``tag``."""
    atomic_write_bytes(Path(ckpt_dir) / BEST, tag.encode())


def read_best(ckpt_dir: str | os.PathLike) -> Optional[str]:
    """The tag ``best`` names, if the file exists and that checkpoint is COMPLETE; else None."""
    path = Path(ckpt_dir) / BEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag / COMPLETE).is_file() else None


def read_rank_state(ckpt_dir: Path, tag: str, rank: int) -> tuple[TrainState, dict[str, Any]]:
    path = Path(ckpt_dir) / tag / f"train_state_rank{rank:05d}.pt"
    if not path.is_file():
        saved = sorted((Path(ckpt_dir) / tag).glob("train_state_rank*.pt"))
        raise RuntimeError(
            f"checkpoint {tag} has no train state for rank {rank} ({len(saved)} ranks saved it). "
            f"Resume with the same number of ranks it was written with."
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return TrainState.from_dict(blob["train_state"]), blob["rng"]


# --------------------------------------------------------------------------------------------
# Export: consolidated fp32 weights from any ZeRO stage


def consolidated_state_dict(ckpt_dir: str | os.PathLike, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """fp32 module weights from a DeepSpeed checkpoint of any ZeRO stage, on the CPU."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir} (no 'latest' file)")
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {tag_dir} does not exist; available: {', '.join(complete_tags(ckpt_dir)) or 'none'}")
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    # ZeRO 1-3 write one "zero_pp_rank_*_optim_states.pt" per rank; ZeRO-0 keeps everything in the
    # model-states file.
    stage = 1 if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")) else 0
    if stage == 0:
        # zero_to_fp32 does not handle ZeRO-0 checkpoints (stack notes): the module is saved whole.
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file} is missing; not a DeepSpeed checkpoint directory")
        state = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
        return {k: v.float().clone() for k, v in state.items()}
    import contextlib
    import sys

    # DeepSpeed prints progress to stdout; keep stdout clean for tools that print JSON there.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float().contiguous().clone() for k, v in state.items()}
