"""Named model presets and the resolution of a user's ModelConfig against a preset and the data.

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

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from mindeye_dist.models.config import DEFAULT_SUBJECT, ModelConfig

# NSD nsdgeneral voxel counts per subject (digest section 1.1).
NSD_VOXELS = {
    "subj01": 15724, "subj02": 14278, "subj03": 15226, "subj04": 13153,
    "subj05": 13039, "subj06": 17907, "subj07": 12682, "subj08": 14386,
}

DATA_KEYS = ("n_tokens", "token_dim", "lowlevel_shape")
"""Data dims resolved generically; the subject table and n_voxels are resolved together."""


@dataclass(frozen=True)
class Preset:
    doc: str
    """One line: what the preset is for."""
    fields: dict[str, Any]
    """ModelConfig field values; data keys listed here are fixed (the data must agree)."""
    nominal: dict[str, Any] = field(default_factory=dict)
    """Data dims used only when neither the config nor a dataset gives them (estimates)."""


_MINDEYE1 = dict(
    arch="mindeye1", hidden_dim=4096, n_blocks=4, subjects={"subj01": NSD_VOXELS["subj01"]},
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
    arch="mindeye2", hidden_dim=4096, n_blocks=4, subjects={"subj01": NSD_VOXELS["subj01"]},
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
    arch="mindeye2", norm="layernorm", activation="gelu", dropout=0.15, input_dropout=0.0,
    prior=True, prior_ff_mult=4, prior_dropout=0.0, prior_timesteps=100, prior_cond_drop_prob=0.2,
    prior_target_scale=1.0, lowlevel="auto", lowlevel_from="backbone", lowlevel_hidden_dim=256,
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


def _error(message: str) -> Exception:
    from mindeye_dist.config import ConfigError

    return ConfigError(message)


def _resolve_dim(key: str, explicit: Any, preset_name: str, preset_value: Any, data_value: Any) -> Any:
    """Explicit > preset; the dataset's value must agree with either (or fills the gap)."""
    chosen, source = (explicit, f"model.{key}={explicit!r}") if explicit is not None else (
        preset_value, f"preset {preset_name!r} fixes {key}={preset_value!r}")
    if data_value is None:
        return chosen
    if chosen is not None and chosen != data_value:
        hint = "set model.preset to one that takes dims from data (tiny, demo, scale-*)" if explicit is None \
            else f"drop model.{key} or fix it"
        raise _error(f"model.{key} disagrees with the data: {source}, but the dataset (meta.json) has "
                     f"{key}={data_value!r}; {hint}")
    return data_value


def resolve_model_config(
    cfg: ModelConfig,
    *,
    n_voxels: Optional[int] = None,
    n_tokens: Optional[int] = None,
    token_dim: Optional[int] = None,
    lowlevel_shape: Optional[list[int] | tuple[int, ...]] = None,
    subjects: Optional[dict[str, int]] = None,
    nominal: bool = False,
) -> ModelConfig:
    """Preset < explicit fields; data dims must agree. Returns a resolved copy (nothing null
    that the enabled components need). ``nominal=True`` fills unknown data dims from the
    preset's nominal dims (for estimates without a dataset)."""
    preset = PRESETS[cfg.preset]
    data = dict(n_tokens=n_tokens, token_dim=token_dim,
                lowlevel_shape=list(lowlevel_shape) if lowlevel_shape is not None else None)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ModelConfig):
        explicit = getattr(cfg, f.name)
        if f.name in DATA_KEYS:
            values[f.name] = _resolve_dim(f.name, explicit, cfg.preset, preset.fields.get(f.name), data[f.name])
        elif f.name not in ("preset", "subjects", "n_voxels"):
            values[f.name] = explicit if explicit is not None else preset.fields.get(f.name)
    if nominal:
        for key, value in preset.nominal.items():
            if key in DATA_KEYS and values[key] is None:
                values[key] = value
    nominal_voxels = preset.nominal.get("n_voxels") if nominal else None
    values["subjects"] = _resolve_subjects(cfg, preset, n_voxels, subjects, nominal_voxels)
    # A single subject's count is also shown as n_voxels; several subjects have no single count.
    values["n_voxels"] = next(iter(values["subjects"].values())) if len(values["subjects"]) == 1 else None
    if values["projector_hidden_dim"] is None and values["token_dim"] is not None:
        values["projector_hidden_dim"] = values["token_dim"]  # MindEye2: projector width = token dim
    for key in ("n_tokens", "token_dim"):
        if values[key] is None:
            raise _error(f"model.{key} is unknown: preset {cfg.preset!r} takes it from the dataset's meta.json; "
                         f"pass the dataset or set model.{key}")
    if values["lowlevel"] == "auto":
        values["lowlevel"] = values["lowlevel_shape"] is not None
    if values["lowlevel"] and values["lowlevel_shape"] is None:
        raise _error(f"model.lowlevel=true but model.lowlevel_shape is unknown: the dataset has no VAE latents "
                     f"(meta.json) and preset {cfg.preset!r} fixes none; set model.lowlevel=false or add latents")
    resolved = ModelConfig(preset=cfg.preset, **values)
    check_resolved(resolved)
    return resolved


def _resolve_subjects(cfg: ModelConfig, preset: Preset, data_voxels: Optional[int],
                      data_subjects: Optional[dict[str, int]], nominal_voxels: Optional[int]) -> dict[str, int]:
    """The subject table: explicit subjects > explicit n_voxels > preset table; the data must agree."""
    preset_table = preset.fields.get("subjects")
    if cfg.subjects is not None:
        table, source = dict(cfg.subjects), f"model.subjects={cfg.subjects!r}"
    elif cfg.n_voxels is not None:
        name = next(iter(preset_table)) if preset_table and len(preset_table) == 1 else DEFAULT_SUBJECT
        table, source = {name: cfg.n_voxels}, f"model.n_voxels={cfg.n_voxels}"
    elif preset_table is not None:
        table, source = dict(preset_table), f"preset {cfg.preset!r} fixes subjects={preset_table!r}"
    else:
        table, source = None, ""
    if data_subjects is not None:
        # Order matters: a batch's subject ids index the table.
        if table is not None and list(table.items()) != list(data_subjects.items()):
            raise _error(f"model.subjects disagrees with the data: {source}, but the dataset (meta.json) has "
                         f"subjects={data_subjects!r} (same names, counts and order needed)")
        table = dict(data_subjects)
    if data_voxels is not None:
        if table is None:
            table = {DEFAULT_SUBJECT: data_voxels}
        elif data_voxels not in table.values() or (len(table) == 1 and data_voxels != next(iter(table.values()))):
            hint = "set model.preset to one that takes dims from data (tiny, demo, scale-*)" \
                if cfg.subjects is None and cfg.n_voxels is None else "drop the explicit value or fix it"
            raise _error(f"model.n_voxels disagrees with the data: {source}, but the dataset (meta.json) has "
                         f"n_voxels={data_voxels}; {hint}")
    if table is None and nominal_voxels is not None:
        table = {DEFAULT_SUBJECT: nominal_voxels}
    if table is None:
        raise _error(f"model.n_voxels is unknown: preset {cfg.preset!r} takes it from the dataset's meta.json; "
                     "pass the dataset or set model.n_voxels (or model.subjects)")
    return table


def check_resolved(cfg: ModelConfig) -> None:
    """Cross-field invariants of a resolved config (each error names the key)."""
    from mindeye_dist.models.config import _check

    for key in ("arch", "hidden_dim", "n_blocks", "norm", "activation", "dropout", "input_dropout",
                "projector_hidden_dim", "prior", "lowlevel"):
        _check(getattr(cfg, key) is not None, key, None, "a value (the preset gives none)")
    if cfg.prior:
        for key in ("prior_depth", "prior_heads", "prior_dim_head", "prior_ff_mult", "prior_dropout",
                    "prior_timesteps", "prior_cond_drop_prob", "prior_target_scale"):
            _check(getattr(cfg, key) is not None, key, None, "a value when model.prior=true")
    if cfg.lowlevel:
        for key in ("lowlevel_from", "lowlevel_channels", "lowlevel_map_channels", "lowlevel_feature_dim",
                    "lowlevel_dropout"):
            _check(getattr(cfg, key) is not None, key, None, "a value when model.lowlevel=true")
        if cfg.lowlevel_from == "voxels":
            for key in ("lowlevel_hidden_dim", "lowlevel_n_blocks"):
                _check(getattr(cfg, key) is not None, key, None, "a value when model.lowlevel_from=voxels")
        factor = 2 ** cfg.lowlevel_upsamplings()
        _, height, width = cfg.lowlevel_shape
        _check(height % factor == 0 and width % factor == 0, "lowlevel_shape", cfg.lowlevel_shape,
               f"H and W divisible by {factor} (2 ** (len(model.lowlevel_channels) - 1) with "
               f"lowlevel_channels={cfg.lowlevel_channels}); use fewer decoder blocks")
