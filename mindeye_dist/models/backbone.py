"""Residual MLP backbone: voxels -> (B, n_tokens, token_dim) CLIP-like tokens.

Two layouts (digest sections 2.1 and 6.2), both with per-subject input adapters:

MindEye1 ``BrainNetwork``::

    adapter Linear(V_s -> h) -> LN -> GELU -> Dropout(0.5)            # MindEye1's ``lin0``
    n_blocks x  x + [Linear(h -> h) -> LN -> GELU -> Dropout(0.15)]
    Linear(h -> n_tokens * token_dim)                                  # ``lin1``, 86% of the params

MindEye2 ``RidgeRegression`` + ``BrainNetwork``::

    adapter Linear(V_s -> h)                                           # the "ridge", one per subject
    n_blocks x  x + [LN -> Linear(h -> h) -> GELU -> Dropout(0.15) -> Linear(h -> h)]
    Linear(h -> n_tokens * token_dim)                                  # ``backbone_linear``

MindEye2's blocks also have a token-mixing half over ``seq_len=1`` (LN(1), Linear(1, 1) x 2:
6 parameters per block, 24 in all); it is the identity up to an affine map of one scalar
per feature and is left out here.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.layers import Residual, make_activation, make_norm
from mindeye_dist.models.subjects import SubjectAdapters, SubjectIds


def _block(cfg: ModelConfig) -> nn.Module:
    h = cfg.hidden_dim
    if cfg.arch == "mindeye1":
        return Residual(nn.Linear(h, h), make_norm(cfg.norm, h), make_activation(cfg.activation),
                        nn.Dropout(cfg.dropout))
    return Residual(make_norm(cfg.norm, h), nn.Linear(h, h), make_activation(cfg.activation), nn.Dropout(cfg.dropout),
                    nn.Linear(h, h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_dim
        self.n_tokens = cfg.n_tokens
        self.adapters = SubjectAdapters(cfg.subject_table(), h, bias=True)
        if cfg.arch == "mindeye1":
            self.stem = nn.Sequential(make_norm(cfg.norm, h), make_activation(cfg.activation),
                                      nn.Dropout(cfg.input_dropout))
        else:
            self.stem = nn.Dropout(cfg.input_dropout) if cfg.input_dropout > 0 else nn.Identity()
        self.blocks = nn.Sequential(*[_block(cfg) for _ in range(cfg.n_blocks)])
        self.to_tokens = nn.Linear(h, cfg.out_dim())

    def hidden(self, voxels: torch.Tensor, subject: SubjectIds = None) -> torch.Tensor:
        """(B, max_voxels) -> (B, h): the shared hidden state before the output Linear."""
        return self.blocks(self.stem(self.adapters(voxels, subject)))

    def tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, h) -> (B, n_tokens, token_dim)."""
        return rearrange(self.to_tokens(hidden), "b (n d) -> b n d", n=self.n_tokens)

    def forward(self, voxels: torch.Tensor, subject: SubjectIds = None) -> torch.Tensor:
        return self.tokens(self.hidden(voxels, subject))
