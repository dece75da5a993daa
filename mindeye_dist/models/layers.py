"""Small building blocks shared by the backbone and the heads: norm and activation by name, the
residual block, the output Linear split into tiles, and activation checkpointing."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def make_norm(kind: str, dim: int) -> nn.Module:
    """``layernorm`` | ``batchnorm`` | ``none`` over the last dimension of a (B, dim) tensor."""
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "batchnorm":
        return nn.BatchNorm1d(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: expected layernorm, batchnorm or none")


def make_activation(kind: str) -> nn.Module:
    """``gelu`` | ``silu`` | ``relu``."""
    activations = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}
    if kind not in activations:
        raise ValueError(f"unknown activation {kind!r}: expected one of {', '.join(activations)}")
    return activations[kind]()


class Residual(nn.Sequential):
    """``x + layers(x)``: the residual block of both MindEye backbones."""

    def body(self, x):
        """``layers(x)`` without the skip connection."""
        return super().forward(x)

    def forward(self, x):
        return x + self.body(x)


# ---- activation checkpointing ---------------------------------------------------------------

CHECKPOINT_UNIT_ATTR = "activation_checkpoint_unit"
"""Attribute set (True) on every module whose forward runs under :func:`run_checkpointed` when
``model.activation_checkpointing`` is on; ``mindeye_dist.estimate`` finds the units by it."""


def mark_checkpoint_unit(module: nn.Module) -> nn.Module:
    setattr(module, CHECKPOINT_UNIT_ATTR, True)
    return module


_suspended = 0


@contextlib.contextmanager
def checkpointing_suspended() -> Iterator[None]:
    """Run every checkpoint unit plainly inside the block (``mindeye_dist.estimate`` counts model
    FLOPs without the recompute this way, then the recompute's extra)."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def run_checkpointed(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """``fn(*args)``, under ``torch.utils.checkpoint`` when ``enabled`` and autograd is recording.

    Non-reentrant (``use_reentrant=False``): it works when no input requires grad, with keyword
    arguments and with ZeRO-3's module hooks (the recompute calls the same modules, so their
    parameters are gathered again). The RNG state is restored for the recompute (the default
    ``preserve_rng_state=True``), so dropout masks match the forward's and the gradients equal
    those without checkpointing.
    """
    if enabled and torch.is_grad_enabled() and not _suspended:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ---- the output Linear in tiles -------------------------------------------------------------


def tile_sizes(out_features: int, tiles: int) -> list[int]:
    """Rows per tile: ``tiles`` near-equal parts of ``out_features``, the larger ones first."""
    if not 1 <= tiles <= out_features:
        raise ValueError(f"tiles={tiles} must be between 1 and out_features={out_features}")
    base, extra = divmod(out_features, tiles)
    return [base + (1 if i < extra else 0) for i in range(tiles)]


class LinearTile(nn.Module):
    """Rows ``[start, start + out)`` of a Linear's weight; the bias slice comes from the parent.

    A module of its own so that ZeRO-3 gathers (and releases) its weight in its own forward hooks.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's initialisation (kaiming_uniform_ with a = sqrt(5)): fan_in is in_features for
        # every tile, and CPU uniform_ draws elements in order, so consecutive tiles drawn one after
        # the other hold exactly the values one nn.Linear(in, sum(out)) draws with the same seed.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class TiledLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` whose weight is split by output rows into ``tiles``
    submodules, run one after the other.

    Why: ZeRO-3 gathers a module's parameters whole for its forward and backward. MindEye's output
    Linear (hidden -> tokens x dim: 808M parameters at MindEye1 size, 1.75B at MindEye2's) would be
    gathered at once, on every rank, twice a step; in tiles at most one tile (plus whatever
    ``stage3_max_live_parameters`` keeps) is gathered at a time, and its gradient is reduced before
    the next tile's is computed. Under ``deepspeed.zero.Init`` each tile is also created and
    partitioned on its own, so the whole fp32 weight never exists on a rank. DeepSpeed's
    ``deepspeed.zero.TiledLinear`` does the same but imports DeepSpeed into the model and stores
    ``tiles.<i>.<j>.weight`` keys; this one stays a plain module and keeps ``nn.Linear``'s layout.

    Same computation as ``nn.Linear``: every output element is the same dot product plus the same
    bias element (``F.linear`` per tile with the bias slice), concatenated in order; same
    parameter count; same initial values for the same seed on the CPU (tile weights in row order,
    then the bias). ``state_dict()`` is in ``nn.Linear``'s layout (``weight`` (out, in), ``bias``)
    and ``load_state_dict`` accepts that layout (and the per-tile one), so checkpoints and exported
    weights move freely between tiled and untiled models.
    """

    def __init__(self, in_features: int, out_features: int, tiles: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.sizes = tile_sizes(out_features, tiles)
        self.tiles = nn.ModuleList(LinearTile(in_features, rows) for rows in self.sizes)
        if bias:  # after the tiles: nn.Linear draws its bias after the whole weight
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.register_state_dict_post_hook(_merge_tiles)
        self.register_load_state_dict_pre_hook(_split_tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for tile, rows in zip(self.tiles, self.sizes):
            bias = self.bias[start:start + rows] if self.bias is not None else None
            outs.append(tile(x, bias))  # (..., rows)
            start += rows
        return torch.cat(outs, dim=-1)  # (..., out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tiles={len(self.sizes)}, " \
               f"bias={self.bias is not None}"


def _tile_key(prefix: str, i: int) -> str:
    return f"{prefix}tiles.{i}.weight"


def _merge_tiles(module: TiledLinear, state: dict, prefix: str, _local_metadata) -> None:
    """state_dict post-hook: ``tiles.<i>.weight`` -> one ``weight`` (out, in), then ``bias`` (nn.Linear's order).

    ZeRO-3 placeholders (partitioned parameters hold an empty tensor) concatenate to an empty
    ``weight``, which :func:`_split_tiles` hands back to every tile.
    """
    keys = [_tile_key(prefix, i) for i in range(len(module.sizes))]
    if not all(k in state for k in keys):
        return
    tiles = [state.pop(k) for k in keys]
    bias = state.pop(prefix + "bias", None)
    state[prefix + "weight"] = torch.cat(tiles, dim=0) if all(t.dim() == 2 for t in tiles) else torch.cat(
        [t.reshape(-1) for t in tiles])
    if bias is not None:
        state[prefix + "bias"] = bias


def _split_tiles(module: TiledLinear, state: dict, prefix: str, _local_metadata, _strict, _missing, _unexpected,
                 error_msgs: list) -> None:
    """load_state_dict pre-hook: a ``weight`` (out, in) becomes the tiles' row blocks (views)."""
    key = prefix + "weight"
    if key not in state:
        return  # per-tile keys (or nothing: reported as missing by load_state_dict)
    weight = state.pop(key)
    if weight.numel() == 0 and weight.dim() == 1:  # a ZeRO-3 placeholder (see _merge_tiles)
        for i in range(len(module.sizes)):
            state[_tile_key(prefix, i)] = weight
        return
    if weight.dim() != 2 or tuple(weight.shape) != (module.out_features, module.in_features):
        error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, the shape in "
                          f"current model is {(module.out_features, module.in_features)} (in {len(module.sizes)} tiles)")
        state[key] = weight  # reported as unexpected too, so a strict load fails
        return
    for i, block in enumerate(torch.split(weight, module.sizes, dim=0)):
        state[_tile_key(prefix, i)] = block


_TILE_KEY = re.compile(r"^(?P<prefix>.*)tiles\.(?P<index>\d+)\.weight$")


def untile_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``<prefix>tiles.<i>.weight`` keys (a :class:`TiledLinear`'s parameters by name, e.g. from
    DeepSpeed's ``zero_to_fp32``) merged into ``<prefix>weight`` (out, in), in ``nn.Linear``'s
    layout and key order; every other entry unchanged."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        match = _TILE_KEY.match(key)
        if match:
            groups.setdefault(match["prefix"], {})[int(match["index"])] = value
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _TILE_KEY.match(key)
        if not match:
            if not (key.endswith("bias") and key[: -len("bias")] in groups):
                out[key] = value
            continue
        prefix, tiles = match["prefix"], groups[match["prefix"]]
        if prefix + "weight" in out:
            continue
        if sorted(tiles) != list(range(len(tiles))):
            raise KeyError(f"{prefix}tiles.*.weight: tiles {sorted(tiles)} are not numbered 0..{len(tiles) - 1}")
        out[prefix + "weight"] = torch.cat([tiles[i] for i in range(len(tiles))], dim=0)
        if prefix + "bias" in state:
            out[prefix + "bias"] = state[prefix + "bias"]
    return out


def _merge_tiles_on_load(module: nn.Linear, state: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook of an untiled output Linear: per-tile keys load too."""
    if prefix + "weight" in state or _tile_key(prefix, 0) not in state:
        return
    tiles = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix + "tiles.")]}
    state.update(untile_state_dict(tiles))


def output_linear(in_features: int, out_features: int, tiles: int) -> nn.Module:
    """``nn.Linear`` when ``tiles`` is 1, else a :class:`TiledLinear` with the same state-dict layout.
    Either loads the other's state dict (and the per-tile key layout)."""
    if tiles == 1:
        layer = nn.Linear(in_features, out_features)
        layer.register_load_state_dict_pre_hook(_merge_tiles_on_load)
        return layer
    return TiledLinear(in_features, out_features, tiles)
