"""Retrieval projector ("retrieval submodule"): token-wise LN -> GELU -> Linear, three times.

Shared weights over tokens, (B, T, D) -> (B, T, D). MindEye1: 768 -> 2048 -> 2048 -> 768;
MindEye2: 1664 -> 1664 -> 1664 -> 1664 (digest sections 2.1, 6.2).
"""

from __future__ import annotations

from torch import nn


class Projector(nn.Sequential):
    def __init__(self, dim: int, hidden_dim: int):
        widths = [dim, hidden_dim, hidden_dim, dim]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(widths, widths[1:]):
            layers += [nn.LayerNorm(d_in), nn.GELU(), nn.Linear(d_in, d_out)]
        super().__init__(*layers)
