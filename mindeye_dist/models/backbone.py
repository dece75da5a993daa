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

MindEye2's released ``BrainNetwork`` (MedARC-AI/MindEyeV2 ``src/models.py``) also has a
token-mixing half per block over ``seq_len=1``: LN(1) -> Linear(1, 1) -> GELU -> Dropout ->
Linear(1, 1), 6 parameters each. A LayerNorm over one element outputs its bias whatever the
input, and the released forward adds that half's output to the *previous* token-mixing output,
so the residual MLP blocks' outputs are discarded and voxels -> tokens is affine.
``model.backbone_blocks`` picks:

* ``working`` (default): the residual blocks above do their job (the paper's description), and
  the token-mixing half is left out (24 parameters fewer than the release);
* ``released``: the released computation exactly, with its parameters (``token_mixers``), so
  MindEye2's checkpoints load and compute what they computed (:meth:`Backbone._released_hidden`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.layers import (Residual, make_activation, make_norm, mark_checkpoint_unit, output_linear,
                                        run_checkpointed)
from mindeye_dist.models.subjects import SubjectAdapters, SubjectIds


def _block(cfg: ModelConfig) -> nn.Module:
    h = cfg.hidden_dim
    if cfg.arch == "mindeye1":
        return Residual(nn.Linear(h, h), make_norm(cfg.norm, h), make_activation(cfg.activation),
                        nn.Dropout(cfg.dropout))
    return Residual(make_norm(cfg.norm, h), nn.Linear(h, h), make_activation(cfg.activation), nn.Dropout(cfg.dropout),
                    nn.Linear(h, h))


def _token_mixer(cfg: ModelConfig) -> nn.Sequential:
    """MindEye2's ``mixer_blocks2`` entry over ``seq_len=1``: LN(1) -> Linear(1,1) -> act -> Dropout -> Linear(1,1)."""
    return nn.Sequential(nn.LayerNorm(1), nn.Linear(1, 1), make_activation(cfg.activation), nn.Dropout(cfg.dropout),
                         nn.Linear(1, 1))


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
        self.released = cfg.backbone_blocks == "released"
        if self.released:
            self.token_mixers = nn.ModuleList(_token_mixer(cfg) for _ in range(cfg.n_blocks))
        # hidden -> tokens x dim: 86% of MindEye1's backbone; in tiles so ZeRO-3 never gathers it whole
        self.to_tokens = output_linear(h, cfg.out_dim(), cfg.output_tiles)
        self.checkpointing = bool(cfg.activation_checkpointing)
        if self.checkpointing:
            for block in self.blocks:
                mark_checkpoint_unit(block)

    def hidden(self, voxels: torch.Tensor, subject: SubjectIds = None) -> torch.Tensor:
        """(B, max_voxels) -> (B, h): the shared hidden state before the output Linear."""
        x = self.stem(self.adapters(voxels, subject))
        if self.released:
            return self._released_hidden(x)
        for block in self.blocks:
            x = run_checkpointed(block, x, enabled=self.checkpointing)  # (B, h)
        return x

    def _released_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """MindEye2's released ``BrainNetwork.forward`` mixer loop, with its single token squeezed::

            skip_mlp = skip_mixer = x
            for block, mixer:
                x = block.body(x) + skip_mlp;        skip_mlp = x     # mixer_blocks1: LN(h) -> MLP
                x = mixer(x as (B, h, 1)) + skip_mixer; skip_mixer = x  # mixer_blocks2 over length 1

        ``mixer`` starts with LayerNorm over a length-1 axis, which outputs its bias, so its output
        is a per-block constant (elementwise-dropped in training) and x_out = x_in + sum of those.
        The MLP blocks still run, as in the reference: their output is discarded and their
        parameters get zero gradients (LayerNorm's backward over one element is zero up to
        rounding), so optimizers and ZeRO treat them as the reference's training did.
        """
        skip_mlp = skip_mixer = x
        for block, mixer in zip(self.blocks, self.token_mixers):
            x = run_checkpointed(block.body, x, enabled=self.checkpointing) + skip_mlp
            skip_mlp = x
            x = mixer(rearrange(x, "b h -> b h 1"))[..., 0] + skip_mixer  # (B, h, 1) -> (B, h)
            skip_mixer = x
        return x

    def tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, h) -> (B, n_tokens, token_dim)."""
        return rearrange(self.to_tokens(hidden), "b (n d) -> b n d", n=self.n_tokens)

    def forward(self, voxels: torch.Tensor, subject: SubjectIds = None) -> torch.Tensor:
        return self.tokens(self.hidden(voxels, subject))
