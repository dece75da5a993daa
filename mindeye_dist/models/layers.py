"""Small building blocks shared by the backbone and the heads: norm and activation by name."""

from __future__ import annotations

from torch import nn


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
