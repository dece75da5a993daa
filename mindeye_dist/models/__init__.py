"""MindEye models: single-device nn.Modules configured by :class:`ModelConfig` (never distributed).

Heavy names (torch, diffusers) load on first use so that ``mindeye_dist.config`` can import
``ModelConfig`` cheaply and without import cycles.
"""

from __future__ import annotations

import importlib

from mindeye_dist.models.config import ModelConfig

_LAZY = {
    "MindEye": "mindeye", "MindEyeOutput": "mindeye", "build_model": "mindeye", "build_prior": "mindeye",
    "load_with_new_subjects": "mindeye", "no_weight_decay_names": "mindeye", "component_parameters": "mindeye",
    "COMPONENTS": "mindeye", "Backbone": "backbone", "Projector": "projector", "DiffusionPrior": "prior",
    "PriorNetwork": "prior", "LowLevelHead": "lowlevel", "SubjectAdapters": "subjects",
    "PRESETS": "presets", "resolve_model_config": "resolve",
}

__all__ = ["ModelConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mindeye_dist.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mindeye_dist.models' has no attribute {name!r}")
