"""Export consolidated fp32 weights from any ZeRO stage; load them without DeepSpeed.

The safetensors file carries the model config and the dataset dimensions in its metadata, so
``load_exported(path)`` rebuilds the exact module with nothing but torch and this package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: Optional[str] = None) -> dict:
    """Write ``out`` (.safetensors) from RUN_DIR's latest (or named) checkpoint; returns a summary."""
    from safetensors.torch import save_file

    from mindeye_dist.checkpoint import consolidated_state_dict, read_latest
    from mindeye_dist.config import load_config, to_dict
    from mindeye_dist.data import read_meta
    from mindeye_dist.evaluate import strip_training_prefix

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    tag = checkpoint or read_latest(run / "checkpoints")
    if tag is None:
        raise FileNotFoundError(f"{run / 'checkpoints'} has no complete checkpoint ('latest' is missing)")
    state = strip_training_prefix(consolidated_state_dict(run / "checkpoints", tag))
    meta = read_meta(cfg.data.url, s3_endpoint=cfg.data.s3_endpoint or None)
    dims = {"n_voxels": meta.n_voxels, "n_tokens": meta.n_tokens, "token_dim": meta.token_dim,
            "lowlevel_shape": list(meta.field_shape("vae") or []) or None}
    header = {"model": json.dumps(to_dict(cfg.model)), "dims": json.dumps(dims), "checkpoint": tag, "format": "mindeye_dist/1"}
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, out)
    return {"out": str(out), "checkpoint": tag, "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values()))}


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model from an exported file (no DeepSpeed import) and load its weights strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mindeye_dist.config import from_dict
    from mindeye_dist.models import build_model
    from mindeye_dist.models.config import ModelConfig

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != "mindeye_dist/1":
        raise ValueError(f"{path} was not written by launchers/export.py (metadata format {header.get('format')!r})")
    model_cfg = from_dict(ModelConfig, json.loads(header["model"]), prefix="model")
    dims = json.loads(header["dims"])
    shape = dims.pop("lowlevel_shape")
    model = build_model(model_cfg, lowlevel_shape=tuple(shape) if shape else None, **dims)
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    return model.to(device).eval()
