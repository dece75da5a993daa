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
    """Write ``out`` (.safetensors) from one of RUN_DIR's checkpoints; returns a summary.

    ``checkpoint``: a tag, ``best``, ``latest`` or None (``best`` if the run has that marker,
    else ``latest``). ``out`` is checked before anything is read, the checkpoint is verified and
    read weights-only, and the file appears atomically with the umask's mode (0644 under 022).
    """
    from safetensors.torch import save_file

    from mindeye_dist.checkpoint import check_model_matches, consolidated_state_dict, data_dims, resolve_tag, verify_checkpoint_files
    from mindeye_dist.config import to_dict
    from mindeye_dist.data import read_meta
    from mindeye_dist.errors import ConfigError
    from mindeye_dist.evaluate import run_config, strip_training_prefix
    from mindeye_dist.fsutil import atomic_output, check_output_file

    out = check_output_file(out, "--out")
    run = Path(run_dir)
    cfg = run_config(run)
    ckpt_dir = run / "checkpoints"
    tag = resolve_tag(ckpt_dir, checkpoint)
    verify_checkpoint_files(ckpt_dir, tag)
    dims = data_dims(read_meta(cfg.data.url, s3_endpoint=cfg.data.s3_endpoint or None))
    check_model_matches(run, cfg.model, dims, data_url=cfg.data.url, tag=tag)
    state = strip_training_prefix(consolidated_state_dict(ckpt_dir, tag))
    header = {"model": json.dumps(to_dict(cfg.model)), "dims": json.dumps(dims), "checkpoint": tag, "format": "mindeye_dist/1"}
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    try:
        with atomic_output(out) as tmp:
            save_file(tensors, str(tmp), metadata=header)
    except OSError as err:  # e.g. the disk filled up: name --out, not the temporary file
        raise ConfigError(f"--out {str(out)!r} could not be written ({err.strerror or err}); free space or choose "
                          "another place") from err
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
