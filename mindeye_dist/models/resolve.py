"""Resolution of a user's ModelConfig against its preset and the dataset's dimensions.

Precedence for every field: preset < explicit ``model.*`` value; then the data dimensions
(voxels, tokens, token dim, VAE latent shape, subject table) from the dataset's ``meta.json``
must agree with whatever the preset or the user fixed (a disagreement is a ConfigError that
names both). Import order is one-way: ``errors`` <- ``presets`` (data only) <- ``config`` <-
this module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from mindeye_dist.errors import ConfigError
from mindeye_dist.models.config import ModelConfig, _check
from mindeye_dist.models.presets import DEFAULT_SUBJECT, PRESETS, Preset

DATA_KEYS = ("n_tokens", "token_dim", "lowlevel_shape")
"""Data dims resolved generically; the subject table and n_voxels are resolved together."""


def _error(message: str) -> Exception:
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
    if values["prior"] and values["prior_target_scale"] is None:
        # DALLE2's image_embed_scale default (MindEye1 ran with it: sqrt(768)): unit-norm tokens get
        # unit per-element variance, the scale the noise schedule assumes. With 1 the demo's prior
        # learned to predict ~0 (samples 12x smaller than targets, alike for every stimulus;
        # reconstruction PixCorr 0.092 -> 0.310 and AlexNet(2) 56% -> 82% with sqrt(64), retrieval unchanged).
        values["prior_target_scale"] = math.sqrt(values["token_dim"])
    if cfg.output_tiles is None and values["output_tiles"] is not None:
        # a preset's tile count fits its own output width; on smaller data dims use at most one row per tile
        values["output_tiles"] = min(values["output_tiles"], values["n_tokens"] * values["token_dim"])
    if values["ridge_skip_rank"] is None:
        values["ridge_skip_rank"] = 0
    if values["ridge_skip_rank"] and len(values["subjects"]) > 1:
        raise _error(f"model.ridge_skip_rank={values['ridge_skip_rank']} needs a single-subject model, this one has "
                     f"{len(values['subjects'])} subjects; set model.ridge_skip_rank=0")
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
        # The model's table keeps its order (adapter indices); datasets are routed to adapters by
        # name (mindeye_dist.data.multi.subject_name), so every data subject must be in it with its
        # voxel count. A one-subject model takes a one-subject dataset of the same width whatever
        # its name (the preset's name keeps the state-dict keys stable).
        if table is None:
            table = dict(data_subjects)
        elif len(table) == 1 and len(data_subjects) == 1:
            (name, n), (data_name, data_n) = next(iter(table.items())), next(iter(data_subjects.items()))
            if n != data_n:
                raise _error(f"model.n_voxels disagrees with the data: {source}, but the dataset {data_name} "
                             f"(meta.json) has n_voxels={data_n}; set model.subjects or model.n_voxels to match")
        else:
            missing = [k for k in data_subjects if k not in table]
            wrong = [f"{k} ({data_subjects[k]} voxels vs {table[k]})" for k in data_subjects
                     if k in table and table[k] != data_subjects[k]]
            if missing or wrong:
                raise _error(f"model.subjects disagrees with the data: {source}; the datasets hold subjects "
                             f"{data_subjects!r}" + (f"; not in the model: {missing}" if missing else "")
                             + (f"; other voxel counts: {wrong}" if wrong else ""))
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
    for key in ("arch", "hidden_dim", "n_blocks", "backbone_blocks", "norm", "activation", "dropout",
                "input_dropout", "projector_hidden_dim", "prior", "lowlevel", "output_tiles", "activation_checkpointing"):
        _check(getattr(cfg, key) is not None, key, None, "a value (the preset gives none)")
    _check(cfg.output_tiles <= cfg.out_dim(), "output_tiles", cfg.output_tiles,
           f"at most the output width n_tokens x token_dim = {cfg.out_dim()} (1 = untiled)")
    # MindEye1's released blocks are the working ones; only MindEye2's release differs.
    _check(cfg.backbone_blocks == "working" or cfg.arch == "mindeye2", "backbone_blocks", cfg.backbone_blocks,
           "working with arch=mindeye1 (MindEye1's released blocks already work as described)")
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
