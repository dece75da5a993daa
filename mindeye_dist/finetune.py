"""Fine-tuning a multi-subject model on a new subject (MindEye2's 1-hour setting).

MindEye2 pretrains on seven subjects, then trains the whole model on the held-out subject's first
session with a fresh "ridge" (input adapter) for it. :func:`finetune_config` turns an experiment
config into that run: the source's architecture (its run directory's ``config.yaml`` or an
export's metadata) with the subject table replaced by the new subject, ``train.init_from`` set to
the source (every weight but the adapters is loaded; see ``trainer.init_weights``), and the new
dataset as the only one. ``launchers/finetune.py`` is the command; the same run can be expressed
with ``train.py`` keys (``train.init_from=... model.subjects={subj01: 15724} ...``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mindeye_dist.config import ExperimentConfig, from_dict
from mindeye_dist.errors import ConfigError
from mindeye_dist.models.config import ModelConfig


def source_model_config(source: str) -> ModelConfig:
    """The model config a run directory or an export was trained with."""
    from mindeye_dist.config import load_config

    path = Path(source)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"--from {source}: a run directory needs config.yaml (was it written by train.py?)")
        return load_config(path / "config.yaml").model
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "model" not in header:
            raise ConfigError(f"--from {source}: not an export of launchers/export.py (no model config in its metadata)")
        return from_dict(ModelConfig, json.loads(header["model"]), prefix="model")
    raise ConfigError(f"--from {source}: no such run directory or export file")


def finetune_config(cfg: ExperimentConfig, source: str, subject: int | str) -> ExperimentConfig:
    """``cfg`` set up to fine-tune ``source`` on ``cfg.data.url``, whose subject must be ``subject``."""
    from mindeye_dist.data import read_meta
    from mindeye_dist.data.multi import subject_name

    if not cfg.data.url:
        raise ConfigError("fine-tuning needs the new subject's dataset: --data URL (or data.url=...)")
    if cfg.data.datasets:
        raise ConfigError("fine-tuning trains one new subject: data.datasets must be empty")
    meta = read_meta(cfg.data.url, s3_endpoint=cfg.data.s3_endpoint or None)
    want = f"subj{int(subject):02d}" if str(subject).isdigit() else str(subject)
    have = subject_name(meta)
    if have != want:
        raise ConfigError(f"--subject {subject}: the dataset {cfg.data.url} holds subject {have} (meta.json); "
                          "name the subject it holds, or point --data at that subject's dataset")
    model = dataclasses.replace(source_model_config(source), subjects={have: meta.n_voxels}, n_voxels=None)
    return dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, init_from=str(source)))
