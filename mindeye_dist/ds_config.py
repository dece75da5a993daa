"""DeepSpeed JSON: load it, fill ``"auto"`` from the experiment config, refuse disagreements.

One source of truth per value (DESIGN principle 4): the experiment YAML owns micro-batch,
accumulation, clipping, precision, optimizer and schedule; ``ds_configs/*.json`` own the ZeRO
stage, offload and communication. A value the experiment owns may be ``"auto"`` (filled here) or
an explicit number that must agree; anything else is a :class:`DSConfigError` naming both.
The optimizer and LR scheduler are built by :mod:`mindeye_dist.optim` and handed to DeepSpeed as
client objects (so the references' no-decay parameter groups hold), so ``optimizer`` and
``scheduler`` blocks in the JSON are refused with a fix-it message.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from mindeye_dist.config import ExperimentConfig


class DSConfigError(ValueError):
    """The DeepSpeed JSON is unreadable or disagrees with the experiment config."""


SHIPPED_DIR = Path(__file__).resolve().parent / "ds_configs"
"""The shipped ``ds_configs/*.json``: a symlink to the repository's ``ds_configs/`` in a source tree,
real files in an installed package (package data)."""


def find_ds_config(path: str | os.PathLike) -> Path:
    """``path`` as given (absolute, or relative to the working directory); else a shipped config
    of that name (``ds_configs/zero2.json`` or just ``zero2.json``), so the defaults work from an
    installed package and from any directory. A path that is neither comes back unchanged (the
    loader then says it does not exist)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    shipped = SHIPPED_DIR / p.name
    if p.parent in (Path("."), Path("ds_configs")) and shipped.is_file():
        return shipped
    return p


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    path = find_ds_config(path)
    if not path.is_file():
        shipped = sorted(p.name for p in SHIPPED_DIR.glob("*.json"))
        raise DSConfigError(f"DeepSpeed config {str(path)!r} does not exist (shipped configs in ds_configs/: {', '.join(shipped)})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DSConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DSConfigError(f"DeepSpeed config {str(path)!r} must be a JSON object")
    return data


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def _fill(ds: dict[str, Any], dotted: str, value: Any, owner: str, owner_value: Any = None) -> None:
    """Set ``dotted`` to ``value`` if absent or "auto"; otherwise it must equal ``value``."""
    *parents, leaf = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DSConfigError(f"DeepSpeed config: {part!r} must be an object")
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
        return
    same = current == value
    if isinstance(current, (int, float)) and isinstance(value, (int, float)) and not isinstance(current, bool):
        same = abs(float(current) - float(value)) <= 1e-12 * max(1.0, abs(float(value)))
    if not same:
        raise DSConfigError(
            f"DeepSpeed config sets {dotted}={current!r} but the experiment config has "
            f"{owner}={value if owner_value is None else owner_value!r}. "
            f"The experiment owns this value: set it to \"auto\" in the JSON (or change {owner})."
        )


def resolve_ds_config(ds: dict[str, Any], cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """Return a copy of ``ds`` with every experiment-owned value filled and checked.

    Checks the identity ``train_batch_size = micro × accumulation × world`` before any worker
    allocates, so a mismatch fails in seconds with both numbers in the message.
    """
    if world_size < 1:
        raise DSConfigError(f"world size must be >= 1, got {world_size}")
    ds = copy.deepcopy(ds)
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise DSConfigError(
                f"DeepSpeed config has a {owned!r} block, but the {owned} is owned by the experiment config "
                f"(optim.*: max_lr, weight_decay, betas, eps, schedule) so that parameter groups and the "
                f"schedule stay one source of truth. Remove the {owned!r} block from the JSON."
            )
    t = cfg.train
    micro, accum = t.micro_batch_size, t.grad_accum_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", accum, "train.grad_accum_steps")
    global_batch = micro * accum * world_size
    current = ds.get("train_batch_size", "auto")
    if current != "auto" and current != global_batch:
        raise DSConfigError(
            f"DeepSpeed config sets train_batch_size={current!r} but micro_batch_size × grad_accum_steps × world_size "
            f"= {micro} × {accum} × {world_size} = {global_batch}. Set train_batch_size to \"auto\" "
            f"(or change train.micro_batch_size / train.grad_accum_steps / the number of ranks)."
        )
    ds["train_batch_size"] = global_batch
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), "optim.grad_clip")
    _fill(ds, "bf16.enabled", t.precision == "bf16", "train.precision", t.precision)
    _fill(ds, "fp16.enabled", t.precision == "fp16", "train.precision", t.precision)
    if not ds["fp16"]["enabled"]:
        ds.pop("fp16")  # DeepSpeed validates fp16 sub-keys even when disabled on some versions
    if offloads_optimizer(ds):
        # A client optimizer with optimizer offload is refused unless this is off; mindeye_dist.optim
        # picks DeepSpeedCPUAdam on GPU hosts and torch's fused AdamW on CPU-only hosts.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)  # our own metrics replace DeepSpeed's step prints
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def write_ds_config(ds: dict[str, Any], path: str | os.PathLike) -> None:
    from mindeye_dist.fsutil import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(ds, indent=2, sort_keys=True) + "\n").encode())
