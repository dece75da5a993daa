"""Model configuration: one dataclass for the whole MindEye composition, filled from a preset.

Owned by the models package; ``mindeye_dist.config.ExperimentConfig.model`` is this class.

Every architecture field is Optional: null means "the preset's value" (see
:mod:`mindeye_dist.models.presets`), and the data dimensions (voxels, tokens, token dim, VAE
latent shape) come from the dataset's ``meta.json`` unless set here, in which case they must
agree. :func:`mindeye_dist.models.resolve.resolve_model_config` turns a user config into a
*resolved* one (no nulls left except where a feature is off), which is what the modules take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from mindeye_dist.errors import ConfigError
from mindeye_dist.models.presets import DEFAULT_SUBJECT, PRESETS

ARCHS = ("mindeye1", "mindeye2")
NORMS = ("layernorm", "batchnorm", "none")
ACTIVATIONS = ("gelu", "silu", "relu")
BACKBONE_BLOCKS = ("working", "released")


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"model.{key}={value!r} is invalid: expected {allowed}")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Named preset (see mindeye_dist.models.presets); explicit fields below override it."""
    arch: Optional[Literal["mindeye1", "mindeye2"]] = None
    """Backbone layout: MindEye1 (input Linear-LN-GELU-Dropout, residual Linear blocks) or
    MindEye2 (per-subject adapter, residual LN-Linear-GELU-Dropout-Linear blocks); null = preset's."""
    hidden_dim: Optional[int] = None
    """Backbone width; null = preset's."""
    n_blocks: Optional[int] = None
    """Residual blocks in the backbone; null = preset's."""
    backbone_blocks: Optional[Literal["working", "released"]] = None
    """MindEye2 backbone blocks: "working" residual MLP blocks (the paper's description; the
    default) or "released" = MindEye2's released code, whose blocks drop out (voxels -> tokens is
    affine) and which loads its checkpoints; null = preset's."""
    n_voxels: Optional[int] = None
    """Input voxels (single subject); null = from the dataset's meta.json."""
    n_tokens: Optional[int] = None
    """Target tokens; null = from the dataset's meta.json."""
    token_dim: Optional[int] = None
    """Target token dimension; null = from the dataset's meta.json."""
    subjects: Optional[dict[str, int]] = None
    """Subject table {name: n_voxels}, one input adapter each, in subject-index order; null =
    the preset's table, else the dataset's, else one subject with n_voxels."""
    norm: Optional[Literal["layernorm", "batchnorm", "none"]] = None
    """Normalisation in the backbone blocks; null = preset's (layernorm in both references)."""
    activation: Optional[Literal["gelu", "silu", "relu"]] = None
    """Activation in the backbone blocks; null = preset's (gelu in both references)."""
    dropout: Optional[float] = None
    """Dropout inside each residual block (0.15 in both references); null = preset's."""
    input_dropout: Optional[float] = None
    """Dropout after the input layer (MindEye1: 0.5, MindEye2: none); null = preset's."""
    output_tiles: Optional[int] = None
    """The backbone's output Linear (hidden -> tokens x dim) in this many row tiles, so ZeRO-3
    gathers one tile at a time instead of the whole layer (same outputs, parameters and state-dict
    layout); 1 = one nn.Linear; null = preset's (mindeye1 8, mindeye2 16, others 1)."""
    activation_checkpointing: Optional[bool] = None
    """Recompute each backbone residual block and each prior transformer layer in the backward
    instead of keeping their activations (torch.utils.checkpoint, non-reentrant); same loss and
    gradients; null = preset's (off)."""
    projector_hidden_dim: Optional[int] = None
    """Width of the 3-layer retrieval projector (MindEye1 2048, MindEye2 = token dim); null = preset's."""
    ridge_skip_rank: Optional[int] = None
    """0 = off; k > 0: closed-form ridge voxels -> targets of rank k, fitted on the training split
    before the first step and stacked with the MLP: in eval mode the retrieval output is
    β·ridge + (1−β)·MLP (unit-normalised), β chosen on the validation split at every validation
    (:mod:`mindeye_dist.models.ridge_skip`); single-subject models only; null = preset's (off;
    ``recipe: auto`` derives 1024 where rank 0 can hold the fit)."""
    prior: Optional[bool] = None
    """Build the diffusion prior; null = preset's."""
    prior_depth: Optional[int] = None
    """Transformer layers in the prior (6 in both references); null = preset's."""
    prior_heads: Optional[int] = None
    """Query heads in the prior's multi-query attention; null = preset's."""
    prior_dim_head: Optional[int] = None
    """Dimension per attention head in the prior; null = preset's."""
    prior_ff_mult: Optional[int] = None
    """Prior feed-forward expansion (inner width = mult * token dim; 4 in the references)."""
    prior_dropout: Optional[float] = None
    """Attention and feed-forward dropout in the prior (0 in the references); null = preset's."""
    prior_timesteps: Optional[int] = None
    """Diffusion training timesteps of the cosine schedule (100 in both references)."""
    prior_cond_drop_prob: Optional[float] = None
    """Classifier-free-guidance dropout of both prior inputs (0.2 in both references)."""
    prior_target_scale: Optional[float] = None
    """Targets are multiplied by this before diffusion and samples divided by it (MindEye1:
    sqrt(768); MindEye2: 1 = none); null = preset's."""
    lowlevel: Optional[Union[bool, Literal["auto"]]] = None
    """Build the low-level (VAE latent) head; auto = only if the dataset has VAE latents;
    null = preset's."""
    lowlevel_shape: Optional[list[int]] = None
    """VAE latent shape [C, H, W] the head predicts; null = preset's, else from meta.json."""
    lowlevel_from: Optional[Literal["voxels", "backbone"]] = None
    """Low-level head input: its own voxel MLP (MindEye1) or the backbone's hidden state (MindEye2)."""
    lowlevel_hidden_dim: Optional[int] = None
    """Width of the low-level head's own voxel MLP (lowlevel_from=voxels only)."""
    lowlevel_n_blocks: Optional[int] = None
    """Residual blocks in the low-level head's own voxel MLP (lowlevel_from=voxels only)."""
    lowlevel_channels: Optional[list[int]] = None
    """Decoder ``block_out_channels`` as diffusers orders them (MindEye1 [64, 128, 256],
    MindEye2 [32, 64, 128]); one up block each, every block but the last upsamples 2x."""
    lowlevel_map_channels: Optional[int] = None
    """Channels of the spatial map fed to the decoder (64 in both references)."""
    lowlevel_feature_dim: Optional[int] = None
    """Channels of the 1x1-conv feature projector for the auxiliary contrastive loss (512)."""
    lowlevel_dropout: Optional[float] = None
    """Low-level dropout (MindEye1: in its residual blocks, 0.25; MindEye2: after the map Linear, 0.3)."""

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "preset", self.preset, "one of " + ", ".join(PRESETS))
        _check(self.backbone_blocks is None or self.backbone_blocks in BACKBONE_BLOCKS, "backbone_blocks",
               self.backbone_blocks, "null, working or released")
        if self.lowlevel_shape is not None:
            self.lowlevel_shape = [int(v) for v in self.lowlevel_shape]
        if self.lowlevel_channels is not None:
            self.lowlevel_channels = [int(v) for v in self.lowlevel_channels]
        for key in ("hidden_dim", "n_voxels", "n_tokens", "token_dim", "output_tiles", "projector_hidden_dim", "prior_depth",
                    "prior_heads", "prior_dim_head", "prior_ff_mult", "prior_timesteps", "lowlevel_hidden_dim",
                    "lowlevel_map_channels", "lowlevel_feature_dim"):
            value = getattr(self, key)
            _check(value is None or (isinstance(value, int) and value > 0), key, value, "null or a positive integer")
        for key in ("n_blocks", "lowlevel_n_blocks", "ridge_skip_rank"):
            value = getattr(self, key)
            _check(value is None or (isinstance(value, int) and value >= 0), key, value, "null or an integer >= 0")
        for key in ("dropout", "input_dropout", "prior_dropout", "lowlevel_dropout"):
            value = getattr(self, key)
            _check(value is None or 0.0 <= value < 1.0, key, value, "null or a probability in [0, 1)")
        _check(self.activation_checkpointing is None or isinstance(self.activation_checkpointing, bool),
               "activation_checkpointing", self.activation_checkpointing, "null, true or false")
        p = self.prior_cond_drop_prob
        _check(p is None or 0.0 <= p <= 1.0, "prior_cond_drop_prob", p, "null or a probability in [0, 1]")
        s = self.prior_target_scale
        _check(s is None or s > 0, "prior_target_scale", s, "null or a number > 0 (1 = no scaling)")
        if self.subjects is not None:
            _check(isinstance(self.subjects, dict) and len(self.subjects) > 0, "subjects", self.subjects,
                   "a non-empty mapping {name: n_voxels}")
            for name, n in self.subjects.items():
                # Names become nn.ModuleDict keys (and state-dict key parts): no dots, not empty.
                _check(isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name) is not None,
                       "subjects", name, "subject names of letters, digits, _ and - (e.g. subj01)")
                _check(isinstance(n, int) and not isinstance(n, bool) and n > 0, f"subjects.{name}", n,
                       "a positive voxel count")
        if self.lowlevel_shape is not None:
            _check(len(self.lowlevel_shape) == 3 and all(v > 0 for v in self.lowlevel_shape), "lowlevel_shape",
                   self.lowlevel_shape, "null or [C, H, W] with positive entries")
        if self.lowlevel_channels is not None:
            _check(len(self.lowlevel_channels) >= 1 and all(v > 0 for v in self.lowlevel_channels),
                   "lowlevel_channels", self.lowlevel_channels, "null or a non-empty list of positive channel counts")

    # ---- derived values (methods, never stored copies) --------------------------------------

    def subject_table(self) -> dict[str, int]:
        """{name: n_voxels} in subject-index order (resolved configs always have one)."""
        if self.subjects is not None:
            return dict(self.subjects)
        _check(self.n_voxels is not None, "n_voxels", self.n_voxels, "a voxel count or a subjects table")
        return {DEFAULT_SUBJECT: self.n_voxels}

    def subject_names(self) -> list[str]:
        """Subject names; a batch's subject ids index this list."""
        return list(self.subject_table())

    def input_voxels(self) -> int:
        """Width of the (zero-padded) voxel input: the largest subject's voxel count."""
        return max(self.subject_table().values())

    def out_dim(self) -> int:
        """Flattened backbone output: n_tokens * token_dim."""
        return self.n_tokens * self.token_dim

    def prior_inner_dim(self) -> int:
        """Query width of the prior's attention: heads * dim_head."""
        return self.prior_heads * self.prior_dim_head

    def lowlevel_upsamplings(self) -> int:
        """2x upsamplings in the decoder: one per block but the last (diffusers' Decoder)."""
        return len(self.lowlevel_channels) - 1

    def lowlevel_map_size(self) -> tuple[int, int]:
        """(h, w) of the map the decoder starts from: latent H, W divided by 2**upsamplings."""
        factor = 2 ** self.lowlevel_upsamplings()
        _, height, width = self.lowlevel_shape
        return height // factor, width // factor

    def lowlevel_norm_groups(self) -> int:
        """GroupNorm groups in the decoder: 32 as in diffusers where the channels allow it."""
        for groups in (32, 16, 8, 4, 2, 1):
            if all(c % groups == 0 for c in self.lowlevel_channels):
                return groups
        return 1
