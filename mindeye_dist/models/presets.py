"""Named model presets: data only (the resolution against a config and a dataset is in ``resolve``).

Precedence for every field: preset < explicit ``model.*`` value; then the data dimensions
(voxels, tokens, token dim, VAE latent shape, subject table) from the dataset's ``meta.json``
must agree with whatever the preset or the user fixed (a disagreement is a ConfigError that
names both). Presets that take their dimensions from the data carry *nominal* dimensions that
are used only when no dataset is at hand (``launchers/estimate.py``).

| preset | what it is |
|---|---|
| tiny | seconds on a 2-core CPU; all dims from data |
| demo | synthetic demo data (~2000 voxels, 16x64 tokens, 4x16x16 latents), a few CPU minutes |
| mindeye1 | MindEye1 subject 1: 15,724 voxels, h=4096, 4 blocks, 257x768 CLIP-L targets, 4x64x64 latents |
| mindeye2 | MindEye2 single subject: ridge adapter, h=4096, 256x1664 bigG targets, 4x28x28 latents |
| mindeye2-multisubject | MindEye2 pretraining: 7 ridge adapters (subjects 2-8; 1 is held out) |
| scale-* | backbone width x depth grid for scaling sweeps (MindEye2 layout, no prior/low-level) |

Scale grid (MindEye2 layout; counts at the nominal dims 2,000 voxels and 16x64 tokens; see
``python launchers/estimate.py --preset scale-1b``; on other data the adapter and output
Linear change with voxels and tokens x dim):

| preset | hidden_dim | n_blocks | params (nominal) |
|---|---|---|---|
| scale-10m | 1024 | 3 | ~9.4M |
| scale-50m | 2048 | 5 | ~48M |
| scale-200m | 4096 | 6 | ~214M |
| scale-1b | 8192 | 7 | ~0.97B |
| scale-5b | 16384 | 10 | ~5.4B |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SUBJECT = "subj01"
"""Name of the only subject when the table comes from a plain voxel count."""

# NSD nsdgeneral voxel counts per subject (digest section 1.1).
NSD_VOXELS = {
    "subj01": 15724, "subj02": 14278, "subj03": 15226, "subj04": 13153,
    "subj05": 13039, "subj06": 17907, "subj07": 12682, "subj08": 14386,
}

@dataclass(frozen=True)
class Preset:
    doc: str
    """One line: what the preset is for."""
    fields: dict[str, Any]
    """ModelConfig field values; data keys listed here are fixed (the data must agree)."""
    nominal: dict[str, Any] = field(default_factory=dict)
    """Data dims used only when neither the config nor a dataset gives them (estimates)."""


_MINDEYE1 = dict(
    arch="mindeye1", hidden_dim=4096, n_blocks=4, backbone_blocks="working",
    subjects={"subj01": NSD_VOXELS["subj01"]},
    output_tiles=8,  # 4096 -> 257*768: 808.6M parameters, ~101M per tile (ZeRO-3 gathers one at a time)
    activation_checkpointing=False,
    n_tokens=257, token_dim=768, norm="layernorm", activation="gelu", dropout=0.15, input_dropout=0.5,
    projector_hidden_dim=2048,
    prior=True, prior_depth=6, prior_heads=12, prior_dim_head=64, prior_ff_mult=4, prior_dropout=0.0,
    prior_timesteps=100, prior_cond_drop_prob=0.2,
    prior_target_scale=math.sqrt(768),  # dalle2's image_embed_scale default, kept by MindEye1
    # MindEye1's low-level model (Voxel2StableDiffusionModel, '4x') is its own voxel MLP.
    lowlevel=True, lowlevel_shape=[4, 64, 64], lowlevel_from="voxels", lowlevel_hidden_dim=4096,
    lowlevel_n_blocks=4, lowlevel_channels=[64, 128, 256], lowlevel_map_channels=64,
    lowlevel_feature_dim=512, lowlevel_dropout=0.25,
)

_MINDEYE2 = dict(
    # backbone_blocks="released" reproduces the released code exactly (see models/backbone.py).
    arch="mindeye2", hidden_dim=4096, n_blocks=4, backbone_blocks="working",
    subjects={"subj01": NSD_VOXELS["subj01"]},
    output_tiles=16,  # 4096 -> 256*1664: 1.745B parameters, ~109M per tile
    activation_checkpointing=False,
    n_tokens=256, token_dim=1664, norm="layernorm", activation="gelu", dropout=0.15, input_dropout=0.0,
    projector_hidden_dim=1664,
    prior=True, prior_depth=6, prior_heads=32, prior_dim_head=52, prior_ff_mult=4, prior_dropout=0.0,
    prior_timesteps=100, prior_cond_drop_prob=0.2, prior_target_scale=1.0,
    lowlevel=True, lowlevel_shape=[4, 28, 28], lowlevel_from="backbone", lowlevel_hidden_dim=4096,
    lowlevel_n_blocks=0, lowlevel_channels=[32, 64, 128], lowlevel_map_channels=64,
    lowlevel_feature_dim=512, lowlevel_dropout=0.3,
)

# Small presets share the MindEye2 layout; every data dim comes from the dataset.
_SMALL = dict(
    arch="mindeye2", backbone_blocks="working", norm="layernorm", activation="gelu", dropout=0.15,
    input_dropout=0.0, output_tiles=1, activation_checkpointing=False,
    prior=True, prior_ff_mult=4, prior_dropout=0.0, prior_timesteps=100, prior_cond_drop_prob=0.2,
    # None: DALLE2's default, sqrt(token_dim), filled in once the data gives token_dim (resolve.py)
    prior_target_scale=None, lowlevel="auto", lowlevel_from="backbone", lowlevel_hidden_dim=256,
    lowlevel_n_blocks=0, lowlevel_map_channels=64, lowlevel_dropout=0.3,
)

_SCALE_NOMINAL = dict(n_voxels=2000, n_tokens=16, token_dim=64)
_SCALE_GRID = {"scale-10m": (1024, 3), "scale-50m": (2048, 5), "scale-200m": (4096, 6),
               "scale-1b": (8192, 7), "scale-5b": (16384, 10)}


def _scale(hidden_dim: int, n_blocks: int) -> Preset:
    return Preset(
        doc=f"scaling grid: MindEye2 layout, hidden {hidden_dim}, {n_blocks} blocks; dims from data",
        fields={**_SMALL, "hidden_dim": hidden_dim, "n_blocks": n_blocks, "projector_hidden_dim": None,
                "prior": False, "prior_depth": 2, "prior_heads": 4, "prior_dim_head": 32,
                "lowlevel": False, "lowlevel_channels": [32, 64], "lowlevel_feature_dim": 64},
        nominal=dict(_SCALE_NOMINAL),
    )


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        doc="seconds on a 2-core CPU; dims from data",
        fields={**_SMALL, "hidden_dim": 32, "n_blocks": 1, "projector_hidden_dim": 32, "prior_depth": 1,
                "prior_heads": 2, "prior_dim_head": 8, "lowlevel_channels": [8, 16], "lowlevel_map_channels": 8,
                "lowlevel_hidden_dim": 32, "lowlevel_feature_dim": 16},
        nominal=dict(n_voxels=64, n_tokens=4, token_dim=16, lowlevel_shape=[4, 8, 8]),
    ),
    "demo": Preset(
        doc="synthetic demo dataset (~2000 voxels, 16x64 tokens); a few CPU minutes on 2 ranks",
        fields={**_SMALL, "hidden_dim": 256, "n_blocks": 2, "projector_hidden_dim": 256, "prior_depth": 1,
                "prior_heads": 2, "prior_dim_head": 32, "lowlevel_channels": [8, 16], "lowlevel_map_channels": 8,
                "lowlevel_feature_dim": 32},
        nominal=dict(n_voxels=2000, n_tokens=16, token_dim=64, lowlevel_shape=[4, 16, 16]),
    ),
    "mindeye1": Preset(doc="MindEye1 subject 1 (257x768 CLIP-L, 940M backbone)", fields=_MINDEYE1),
    "mindeye2": Preset(doc="MindEye2 single subject (256x1664 bigG, 2.23B total)", fields=_MINDEYE2),
    "mindeye2-multisubject": Preset(
        doc="MindEye2 multi-subject pretraining: 7 ridge adapters (subjects 2-8)",
        fields={**_MINDEYE2, "subjects": {k: v for k, v in NSD_VOXELS.items() if k != "subj01"}},
    ),
    **{name: _scale(h, n) for name, (h, n) in _SCALE_GRID.items()},
}
