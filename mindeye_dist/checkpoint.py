"""Train state, step-numbered checkpoints, ``latest`` written last, keep-last-k, export.

Layout under ``RUN_DIR/checkpoints/``::

    step_0000100/            DeepSpeed's own files (every rank writes its shards)
        train_state_rank00000.pt   TrainState + RNG states of that rank
        train_state.json           human-readable copy of rank 0's TrainState
        COMPLETE                   written by rank 0 after every rank finished
    step_0000100_universal/  DeepSpeed's universal format of step_0000100 (made once, when a run
                             resumes it on another number of ranks; pruned with its original)
    latest                   the tag of the newest COMPLETE checkpoint, replaced atomically
    best                     (checkpoint.select=best) the tag of the best-on-validation checkpoint

A checkpoint becomes visible only when ``latest`` names it, and ``latest`` is replaced only after
every rank's files are on disk and ``COMPLETE`` exists, so a job killed mid-save (even with
SIGKILL) resumes from the previous checkpoint; the partial directory is overwritten or pruned.
DeepSpeed's file is also called ``latest`` and holds just the tag, so ``engine.load_checkpoint``
reads ours unchanged. When ``best`` exists, evaluate.py and export.py use it by default
(:func:`resolve_tag`); commit never prunes it.

Loading is weights-only everywhere, DeepSpeed's loads included (see :func:`weights_only_loading`):
a checkpoint whose pickle would construct anything but tensors, containers and the few plain
DeepSpeed records below is refused, not executed. A truncated or corrupt file, or a checkpoint of
a different model, is a :class:`CheckpointError` / ConfigError naming the file or the setting and
the way out.

Changing the number of ranks (:func:`universal_for`): ZeRO 1-3 partition the optimizer state
(and at stage 3 the weights) by rank, and DeepSpeed refuses to load a partitioned checkpoint on
another data-parallel size. Its universal format (``deepspeed/checkpoint/ds_to_universal.py``:
one file per parameter and optimizer moment) loads on any number of ranks with
``checkpoint.load_universal``. Rank 0 converts once, into a temporary directory renamed into
place, while the other ranks wait; the converted copy sits next to the original. ZeRO-0 in
fp32 needs no conversion: its file holds the whole module and the client optimizer's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mindeye_dist.errors import ConfigError
from mindeye_dist.fsutil import atomic_output, atomic_write_bytes, fsync_dir

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(ValueError):
    """A checkpoint cannot be used as it is: missing, incomplete, truncated, corrupt or unsafe.
    The message names the file and says which checkpoint to use instead."""


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
    data: list = field(default_factory=list)
    """Per dataset: its :class:`mindeye_dist.data.reshard.DataPosition` as a dict (epoch, batch,
    the layout it was read with and the closed legs of a resharded epoch)."""

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


def reseed_rng(seed: int, step: int, rank: int, world_size: int,
               extra_generators: Optional[dict[str, torch.Generator]] = None) -> None:
    """Fresh RNG streams for a run resumed on another number of ranks: rank r's saved streams
    have no counterpart when the ranks change, so every stream is seeded from
    (seed, step, rank, world size) instead. Deterministic (two resumes agree), not bit-exact."""
    base = np.random.SeedSequence([seed, step, rank, world_size, 0x5E5EED])
    torch_seed, numpy_seed, python_seed, *extra = base.generate_state(3 + len(extra_generators or {}), dtype=np.uint64)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(numpy_seed) % 2**32)
    random.seed(int(python_seed))
    for value, (_, gen) in zip(extra, sorted((extra_generators or {}).items())):
        gen.manual_seed(int(value))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_output(path, durable=True) as tmp:
        torch.save(obj, tmp)


def complete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.glob("step_*") if (p / COMPLETE).is_file())


def _others_hint(ckpt_dir: Path, bad: Optional[str] = None) -> str:
    """What to use instead of checkpoint ``bad``: the other complete tags and how to select one."""
    others = [t for t in complete_tags(ckpt_dir) if t != bad]
    if not others:
        return (f"No other complete checkpoint is under {ckpt_dir}; train again (a new run.dir, or remove "
                f"{ckpt_dir} to start this one over).")
    pick = others[-1]
    return (f"Complete checkpoints{' besides ' + bad if bad else ''}: {', '.join(others)}. Use one: "
            f"evaluate.py/export.py --checkpoint {pick}; to resume training from it, write its tag into "
            f"{ckpt_dir / LATEST} (echo {pick} > {ckpt_dir / LATEST}).")


def _read_marker(ckpt_dir: Path, name: str) -> Optional[str]:
    """The tag a marker file (``latest``, ``best``) names, if the file exists and names a COMPLETE checkpoint."""
    marker = ckpt_dir / name
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not tag or not (ckpt_dir / tag / COMPLETE).is_file():
        raise CheckpointError(
            f"{marker} names {tag!r}, which is not a complete checkpoint (the file was edited or the checkpoint "
            f"deleted); point it at a directory under {ckpt_dir} that contains {COMPLETE}. {_others_hint(ckpt_dir)}")
    return tag


def read_latest(ckpt_dir: str | os.PathLike) -> Optional[str]:
    """The tag ``latest`` names, if it exists and that checkpoint is COMPLETE; else None."""
    return _read_marker(Path(ckpt_dir), LATEST)


def resolve_tag(ckpt_dir: str | os.PathLike, checkpoint: Optional[str] = None) -> str:
    """The checkpoint evaluate.py and export.py use: ``checkpoint`` is a tag, ``best``, ``latest``
    or None, which means ``best`` when the run has that marker and ``latest`` otherwise."""
    ckpt_dir = Path(ckpt_dir)
    if checkpoint in (None, BEST):
        tag = _read_marker(ckpt_dir, BEST)  # strict: a marker naming a missing checkpoint is an error here
        if tag is not None:
            return tag
        if checkpoint == BEST:
            raise CheckpointError(
                f"--checkpoint best: {ckpt_dir / BEST} does not exist (the run was not trained with "
                f"checkpoint.select=best, or no validation has run yet). Use --checkpoint latest or a tag. "
                f"{_others_hint(ckpt_dir)}")
    if checkpoint in (None, BEST, LATEST):
        tag = read_latest(ckpt_dir)
        if tag is None:
            raise CheckpointError(f"{ckpt_dir} has no complete checkpoint ('{LATEST}' is missing): the run saved none "
                                  "yet; train it further, or pass the run.dir that holds its checkpoints")
        return tag
    if not (ckpt_dir / checkpoint).is_dir():
        raise CheckpointError(f"checkpoint {checkpoint!r} does not exist under {ckpt_dir}. {_others_hint(ckpt_dir)}")
    if not (ckpt_dir / checkpoint / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir / checkpoint} is incomplete (no {COMPLETE}: its save was cut "
                              f"short). {_others_hint(ckpt_dir, checkpoint)}")
    return checkpoint


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
    """Rank 0, after every rank wrote its files: copy RUN_DIR/config.yaml into it, mark it
    COMPLETE, point ``latest`` at it (and ``best`` when ``best``), prune.

    Returns the tags removed. Only checkpoints older than the new one are pruned, and the
    partial directories of killed saves are removed with them; the one ``best`` names is kept.
    """
    run_config = ckpt_dir.parent / "config.yaml"
    if run_config.is_file():  # the settings this checkpoint was trained with (check_model_matches)
        atomic_write_bytes(ckpt_dir / tag / "config.yaml", run_config.read_bytes())
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
        base = path.name.removesuffix(UNIVERSAL_SUFFIX)  # a universal copy goes with its original
        if base not in keep and base < tag:
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
            f"checkpoint {tag} has no train state for rank {rank} ({len(saved)} ranks saved it): its files are "
            f"incomplete. Point {Path(ckpt_dir) / LATEST} at an earlier complete checkpoint to resume from it."
        )
    # Every rank checks every file of the tag (central directories only: cheap), so a truncated
    # shard of one rank stops all ranks with the same message instead of one rank.
    verify_checkpoint_files(ckpt_dir, tag)
    blob = safe_torch_load(path)
    return TrainState.from_dict(blob["train_state"]), blob["rng"]


# --------------------------------------------------------------------------------------------
# Loading safely: weights-only everywhere, and a named file when one is damaged

_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def deepspeed_checkpoint_classes() -> list[type]:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoints, found by loading ZeRO
    0/1/2/3 checkpoints (fp32, bf16, optimizer offload, 1 and 2 ranks) with weights_only=True:
    the loss scaler (fp16 uses DynamicLossScaler), the ZeRO stage enum and bf16/ZeRO-1/2
    fragment addresses. All are plain records: unpickling sets attributes, it runs nothing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Inside this block every ``torch.load`` is weights-only, also DeepSpeed's own (its checkpoint
    engine and zero_to_fp32 pass ``weights_only=False``), with DeepSpeed's checkpoint records allowed.

    torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` on every call and then ignores the caller's
    ``weights_only=False``; the variable is set only for the block (and a user's
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, which would make torch refuse both, is lifted for it).
    """
    saved = {k: os.environ.get(k) for k in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(_FORCE_NO_WEIGHTS_ONLY, None)
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_error(path: Path, err: BaseException) -> CheckpointError:
    """A CheckpointError naming ``path`` for a failed torch.load: refused as unsafe, or damaged."""
    path = Path(path)
    tag_dir = path.parent
    ckpt_dir, tag = tag_dir.parent, tag_dir.name
    text = str(err)
    # torch's weights-only refusals start with a generic paragraph; the line that names the
    # offending global or opcode follows it.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    specific = [ln for ln in lines[1:] if not ln.startswith("Check the documentation")] if "Weights only load failed" in text else []
    if specific and any("GLOBAL" in ln or "global" in ln for ln in specific):
        detail = next(ln for ln in specific if "GLOBAL" in ln or "global" in ln)
        return CheckpointError(
            f"refused to load {path}: its pickle asks for something a mindeye_dist/DeepSpeed checkpoint never "
            f"contains ({detail}). Loading it could run code from whoever wrote the file, so it is not loaded. "
            f"Use run directories you trust; if this one is yours and was written by another DeepSpeed version "
            f"(which pickles other classes), export it with that version. {_others_hint(ckpt_dir, tag)}")
    text = specific[0] if specific else text
    if isinstance(err, FileNotFoundError):
        return CheckpointError(f"checkpoint file {path} is missing. {_others_hint(ckpt_dir, tag)}")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return CheckpointError(f"checkpoint file {path} is truncated or corrupt ({first}). {_others_hint(ckpt_dir, tag)}")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's records allowed; any failure is a
    CheckpointError naming the file (truncated, corrupt, or refused as unsafe)."""
    try:
        with weights_only_loading():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError,
            AttributeError, zipfile.BadZipFile) as err:
        raise _load_error(Path(path), err) from err


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _archive_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete torch zip archive (None if it is, or is in torch's legacy
    format, which only a full load can check). Reads the central directory, not the tensors."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return None if magic[:1] == b"\x80" else "the file does not start like a torch checkpoint"
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        # The central directory is written last: a cut-short write has none.
        return f"{size} bytes, no complete zip directory: {err}"
    for record in records:
        if record.header_offset + record.compress_size > size:
            return f"{size} bytes, but record {record.filename} ends past the end of the file"
    return None


def verify_checkpoint_files(ckpt_dir: str | os.PathLike, tag: str, unpickle: bool = False) -> list[Path]:
    """Check every ``*.pt`` file of checkpoint ``tag`` before anything is loaded from it.

    Always: each is a complete archive (cheap: its central directory). With ``unpickle``: each
    also unpickles weights-only (tensors memory-mapped, not read), so an unsafe pickle is refused
    here, naming its file. Raises CheckpointError; returns the files.
    """
    tag_dir = Path(ckpt_dir) / tag
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {tag_dir} holds no .pt files. {_others_hint(Path(ckpt_dir), tag)}")
    for path in files:
        problem = _archive_problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({problem}). "
                                  f"{_others_hint(Path(ckpt_dir), tag)}")
        if unpickle:
            safe_torch_load(path, mmap=_is_zip(path))
    return files


def safe_deepspeed_load(ds_engine: Any, ckpt_dir: str | os.PathLike, tag: str, **load_kwargs: Any) -> Any:
    """``ds_engine.load_checkpoint(ckpt_dir, tag, **load_kwargs)`` with every file read weights-only.

    Files are verified first; the model's parameter shapes are compared with the checkpoint's
    (a ConfigError naming the parameters instead of DeepSpeed's size mismatch); a file DeepSpeed's
    checkpoint engine fails to read is named in a CheckpointError. Returns what
    ``load_checkpoint`` returns.
    """
    verify_checkpoint_files(ckpt_dir, tag)
    current = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in ds_engine.module.named_parameters()}
    differences = shape_differences(checkpoint_param_shapes(ckpt_dir, tag), current)
    if differences:
        raise ConfigError(_mismatch_message(Path(ckpt_dir), tag, differences, None))
    engine = ds_engine.checkpoint_engine
    original = engine.load

    def load_naming_the_file(path: str, map_location: Any = None, **kwargs: Any) -> Any:
        try:
            return original(path, map_location=map_location, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
            raise _load_error(Path(path), err) from err

    had_own = "load" in vars(engine)
    engine.load = load_naming_the_file  # this instance only, for this call
    try:
        with weights_only_loading():
            return ds_engine.load_checkpoint(str(ckpt_dir), tag=tag, **load_kwargs)
    finally:
        if had_own:
            engine.load = original
        else:
            del engine.load


# --------------------------------------------------------------------------------------------
# Does a checkpoint fit the model configured now?


def data_dims(meta: Any) -> dict[str, Any]:
    """The dataset dimensions a model is built with (``build_model``'s keyword arguments)."""
    shape = meta.field_shape("vae")
    return {"n_voxels": meta.n_voxels, "n_tokens": meta.n_tokens, "token_dim": meta.token_dim,
            "lowlevel_shape": list(shape) if shape else None}


def model_states_file(tag_dir: Path) -> Path:
    files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))  # ZeRO-3: zero_pp_rank_0_mp_rank_00_...
    if not files:
        raise CheckpointError(f"{tag_dir} has no mp_rank_00_model_states.pt: not a DeepSpeed checkpoint directory. "
                              f"{_others_hint(tag_dir.parent, tag_dir.name)}")
    return files[0]


def checkpoint_param_shapes(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, tuple[int, ...]]:
    """{parameter name: full shape} as the checkpoint's model-states file records them (tensors
    memory-mapped, not read). Names are the engine module's (``model.`` prefix included)."""
    states = safe_torch_load(model_states_file(Path(ckpt_dir) / tag), mmap=True)
    if states.get("param_shapes"):  # ZeRO 1-3: one {name: shape} per parameter group
        shapes = {name: tuple(shape) for group in states["param_shapes"] for name, shape in group.items()}
        shapes.update({n: tuple(v) for n, v in (states.get("frozen_param_shapes") or {}).items()})
        return shapes
    return {name: tuple(t.shape) for name, t in states["module"].items()}  # ZeRO-0: the whole module


def shape_differences(saved: dict[str, tuple[int, ...]], current: dict[str, tuple[int, ...]],
                      limit: int = 5) -> list[str]:
    """Lines naming parameters whose shape differs, or that only one side has (``current`` are
    parameters; ``saved`` may also hold buffers, which are ignored unless ``current`` has them)."""
    lines = [f"{name}: checkpoint {list(saved[name])}, now {list(shape)}"
             for name, shape in current.items() if name in saved and tuple(saved[name]) != tuple(shape)]
    missing = [name for name in current if name not in saved]
    if missing:
        lines.append(f"in the model but not the checkpoint: {', '.join(missing[:limit])}"
                     + (f" and {len(missing) - limit} more" if len(missing) > limit else ""))
    if len(lines) > limit + 1:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _resolved(model_cfg: Any, dims: Optional[dict[str, Any]]) -> Any:
    from mindeye_dist.models.resolve import resolve_model_config

    return resolve_model_config(model_cfg, **(dims or {}))


_DATA_FIELDS = ("n_voxels", "subjects", "n_tokens", "token_dim", "lowlevel_shape")


def config_differences(saved_cfg: Any, saved_dims: dict[str, Any], model_cfg: Any, dims: dict[str, Any]) -> list[str]:
    """Lines naming each resolved model setting that differs: ``n_voxels: checkpoint 96, dataset 80``
    for the data's dimensions, ``model.hidden_dim: checkpoint 32, now 64`` for settings. Values
    that only follow from others (the same preset, the data) are listed when nothing else is."""
    before, after = _resolved(saved_cfg, saved_dims), _resolved(model_cfg, dims)
    primary, derived = [], []
    for f in dataclasses.fields(before):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if old == new or (f.name == "subjects" and len(old or {}) == len(new or {}) == 1 and before.n_voxels != after.n_voxels):
            continue
        if f.name in _DATA_FIELDS and getattr(model_cfg, f.name) is None:
            primary.append(f"{f.name}: checkpoint {old}, dataset {new}")
        elif f.name == "preset" or getattr(saved_cfg, f.name) is not None or getattr(model_cfg, f.name) is not None:
            primary.append(f"model.{f.name}: checkpoint {old!r}, now {new!r}")
        else:
            derived.append(f"model.{f.name} (follows the preset or the data): checkpoint {old!r}, now {new!r}")
    return primary or derived


def _mismatch_message(ckpt_dir: Path, tag: str, differences: list[str], saved_data_url: Optional[str],
                      saved_config: Optional[Path] = None) -> str:
    trained_on = f", data.url={saved_data_url}" if saved_data_url else ""
    settings = saved_config or ckpt_dir.parent / "config.yaml"
    return (f"checkpoint {ckpt_dir / tag} does not fit the model configured now:\n  " + "\n  ".join(differences)
            + f"\nUse the settings and the dataset the checkpoint was trained with ({settings}{trained_on}), "
            "or train this configuration in a new run.dir.")


def check_model_matches(run_dir: str | os.PathLike, model_cfg: Any, dims: Any, *,
                        data_url: Optional[str] = None, tag: Optional[str] = None) -> None:
    """Raise a ConfigError if checkpoint ``tag`` of the run in ``run_dir`` (or, without a tag,
    the run) was trained with another model than ``model_cfg`` built on a dataset with ``dims``
    (a dict like :func:`data_dims`, or the trainer's ``ModelDims``); ``data_url`` is that
    dataset, for the message and to tell whether the dataset changed.

    Compares the resolved model config the checkpoint was trained with (``TAG/config.yaml``,
    copied there by :func:`commit`; else ``RUN_DIR/config.yaml``) with the current one, the
    data dimensions taken from the dataset that config names when it is still readable; then
    the parameter shapes the checkpoint records with those of the model built now (on the meta
    device). The message names each differing setting (``model.hidden_dim: checkpoint 256, now
    512``, ``n_voxels: checkpoint 2000, dataset 1800``) and the fix. Reads files only: every rank
    may call it and gets the same verdict.
    """
    from mindeye_dist.config import load_config

    dims = dict(dims.kwargs() if hasattr(dims, "kwargs") else dims)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    candidates = ([ckpt_dir / tag / "config.yaml"] if tag else []) + [run_dir / "config.yaml"]
    saved_path = next((p for p in candidates if p.is_file()), None)
    differences: list[str] = []
    saved_url = None
    if saved_path is not None:
        saved = load_config(saved_path)
        saved_url = saved.data.url
        saved_dims: Optional[dict[str, Any]] = dims
        if data_url is not None and saved_url and saved_url.rstrip("/") != str(data_url).rstrip("/"):
            saved_dims = _dims_of(saved_url, saved.data.s3_endpoint)
        try:
            differences = config_differences(saved.model, saved_dims or dims, model_cfg, dims)
        except ConfigError as err:  # the saved settings do not resolve on today's data
            differences = [str(err)]
    if tag is not None and not differences:
        from mindeye_dist.models import build_model

        with torch.device("meta"):
            model = build_model(model_cfg, **dims)
        current = {f"model.{name}": tuple(p.shape) for name, p in model.named_parameters()}
        differences = shape_differences(checkpoint_param_shapes(ckpt_dir, tag), current)
    if differences:
        raise ConfigError(_mismatch_message(ckpt_dir, tag or "", differences, saved_url, saved_path))


def _dims_of(url: str, s3_endpoint: str) -> Optional[dict[str, Any]]:
    """The dims of the dataset at ``url``, or None when it cannot be read any more."""
    from mindeye_dist.data import read_meta

    try:
        return data_dims(read_meta(url, s3_endpoint=s3_endpoint or None))
    except Exception:  # gone or unreachable: the parameter shapes still tell
        return None


# --------------------------------------------------------------------------------------------
# Another number of ranks: DeepSpeed's universal checkpoint


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def optimizer_partitioned(tag_dir: Path) -> bool:
    """True when the checkpoint's optimizer state is split by rank (ZeRO 1-3, and bf16 at ZeRO-0,
    whose BF16_Optimizer partitions it too); False for fp32 ZeRO-0 (one whole file)."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


_CONVERT = """
import runpy, sys
from mindeye_dist.checkpoint import weights_only_loading
sys.argv = ["ds_to_universal", *sys.argv[1:]]
with weights_only_loading():
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
"""
"""DeepSpeed's converter, run with weights-only loading forced (see :func:`universal_for`)."""


def universal_for(ckpt_dir: Path, tag: str, workers: int = 0, log=None) -> str:
    """The tag of ``tag``'s universal copy, converting it first if it does not exist (rank 0 only;
    the caller makes the other ranks wait). The conversion runs DeepSpeed's own converter in a
    child process (its memory is freed when it ends; it prints to a log instead of our stdout)
    into a temporary directory that is renamed into place only when complete."""
    import subprocess
    import sys

    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / universal_tag(tag)
    if (out / "zero" / "optimizer_state.pt").is_file():
        return out.name
    for stale in ckpt_dir.glob(".universal_tmp*"):  # a conversion killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    workers = workers or min(4, os.cpu_count() or 1)
    # The converter writes a `latest_universal` pointer next to its output folder: converting into
    # a scratch parent keeps that pointer (which would name the temporary folder) out of ckpt_dir.
    scratch = ckpt_dir / f".universal_tmp{os.getpid()}"
    args = ["--input_folder", str(ckpt_dir / tag), "--output_folder", str(scratch / out.name), "--inject_missing_state",
            "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
    if log is not None:
        log.info("converting %s to DeepSpeed's universal format (python -m deepspeed.checkpoint.ds_to_universal %s; "
                 "weights-only loads)", tag, " ".join(args))
    # The converter calls torch.load(weights_only=False); it runs under weights_only_loading() like
    # every other load of a checkpoint (its worker processes are forked and inherit that).
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", _CONVERT, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise ConfigError(f"DeepSpeed could not convert checkpoint {ckpt_dir / tag} to its universal format, which a "
                          f"resume on another number of ranks needs:\n{tail}\nResume with the number of ranks that "
                          "wrote it (checkpoints/<tag>/train_state.json: world_size)")
    os.replace(scratch / out.name, out)
    fsync_dir(ckpt_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return out.name


def convert_run_checkpoint(run_dir: Path, tag: Optional[str] = None, workers: int = 0) -> str:
    """launchers/reshard.py: make ``tag``'s (default: latest's) universal copy in ``run_dir``;
    returns a line saying what was done."""
    import logging

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir} (no 'latest' file)")
    if not (ckpt_dir / tag / COMPLETE).is_file():
        raise FileNotFoundError(f"{ckpt_dir / tag} is not a complete checkpoint; complete ones: "
                                f"{', '.join(complete_tags(ckpt_dir)) or 'none'}")
    if not optimizer_partitioned(ckpt_dir / tag):
        return f"{ckpt_dir / tag}: fp32 ZeRO-0, loads on any number of ranks as it is (nothing to convert)"
    existed = (ckpt_dir / universal_tag(tag) / "zero" / "optimizer_state.pt").is_file()
    out = universal_for(ckpt_dir, tag, workers, log=logging.getLogger("mindeye_dist.reshard"))
    return f"{ckpt_dir / out}: {'already there' if existed else 'written'}; resume with any number of ranks"


# --------------------------------------------------------------------------------------------
# Export: consolidated fp32 weights from any ZeRO stage


def consolidated_state_dict(ckpt_dir: str | os.PathLike, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """fp32 module weights from a DeepSpeed checkpoint of any ZeRO stage, on the CPU.

    Every file is verified and read weights-only first (DeepSpeed's zero_to_fp32 then runs under
    :func:`weights_only_loading` too); ``tag`` defaults to ``latest``.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = resolve_tag(ckpt_dir, tag or LATEST)
    tag_dir = ckpt_dir / tag
    verify_checkpoint_files(ckpt_dir, tag, unpickle=True)
    # ZeRO 1-3 write one "zero_pp_rank_*_optim_states.pt" per rank; ZeRO-0 keeps everything in the
    # model-states file.
    if not any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        # zero_to_fp32 fails on ZeRO-0 checkpoints ('NoneType' object is not iterable in
        # parse_model_states): the module is saved whole, so read it directly.
        state = safe_torch_load(model_states_file(tag_dir))["module"]
        return {k: v.float().clone() for k, v in state.items()}
    import sys

    # DeepSpeed prints progress to stdout; keep stdout clean for tools that print JSON there.
    with contextlib.redirect_stdout(sys.stderr), weights_only_loading():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
            # Every file was read weights-only above; what fails here is the shards' consistency.
            raise CheckpointError(f"checkpoint {tag_dir} cannot be consolidated ({str(err).strip().splitlines()[0]}). "
                                  f"{_others_hint(ckpt_dir, tag)}") from err
    return {k: v.float().contiguous().clone() for k, v in state.items()}
