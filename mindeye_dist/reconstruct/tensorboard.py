"""A small grid of reconstructions for TensorBoard during training (one call per validation step).

    from mindeye_dist.reconstruct import image_models_for, reconstruction_grid
    generator, decoder = image_models_for(meta)          # once; (None, None) for non-synthetic data
    grid = reconstruction_grid(model, batch, generator, decoder, n=8)   # (H, W, 3) uint8
    writer.add_image("val/reconstructions", grid, step, dataformats="HWC")

Rows: seen | blurry (low-level head, when there is one and a decoder) | reconstruction (prior
samples through ``generator``, when both exist). Cheap settings: DDIM 20 prior steps by default,
one candidate (no best-of-k). Call it on every rank in lock-step when parameters are sharded (ZeRO-3 gathers
them inside forward); only rank 0 needs to log the result.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mindeye_dist.reconstruct.pipeline import cls_normalised, reconstruct_batch


def image_models_for(meta, sample_std: float = 0.3):
    """(generator, low-level decoder) that need no weights: the synthetic subject's own, else (None, None)."""
    source = meta.raw.get("source", {}) if hasattr(meta, "raw") else {}
    if source.get("kind") != "synthetic":
        return None, None
    from mindeye_dist.data.render import SyntheticRenderer
    from mindeye_dist.reconstruct.generators import SyntheticGenerator, SyntheticVAEDecoder

    renderer = SyntheticRenderer.from_meta(meta)
    return SyntheticGenerator(renderer, sample_std), SyntheticVAEDecoder(renderer)


def _row(images: torch.Tensor, cell: int, pad: int) -> np.ndarray:
    """(n, 3, H, W) [0, 1] -> (cell, n * (cell + pad) - pad, 3) uint8."""
    x = F.interpolate(images.float().cpu().clamp(0, 1), (cell, cell), mode="bilinear", align_corners=False, antialias=True)
    x = F.pad(x, (0, pad, 0, 0), value=1.0)  # white gutter right of every cell
    row = torch.cat(list(x), dim=2)[:, :, :-pad] if pad else torch.cat(list(x), dim=2)
    return (row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(model, batch, generator=None, decoder=None, *, n: int = 8, strength: float = 0.85, sampler: str = "ddim", steps: Optional[int] = 20, seed: int = 0,
                        cell: int = 64, pad: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 grid for the first ``n`` stimuli of ``batch`` (a :class:`mindeye_dist.data.Batch`
    with images). ``model`` is the MindEye module (not the engine); its train/eval mode is restored."""
    if batch.images is None:
        raise ValueError("reconstruction_grid needs a batch with images (the dataset has no images field)")
    rows = min(n, len(batch))
    param = next(model.parameters())
    device = param.device
    seen = batch.images[:rows].permute(0, 3, 1, 2).float() / 255.0
    was_training = model.training
    model.eval()
    # A bf16 run's weights meet the float32 voxels, prior noise and renderer here: autocast lets
    # each op run in the weights' dtype (validation in bf16 failed on "mat1 and mat2 must have the
    # same dtype" before).
    low = param.dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(device.type, dtype=param.dtype, enabled=low):
        return _grid(model, batch, generator, decoder, rows, seen, device, strength, sampler, steps, seed, cell, pad,
                     was_training)


def _grid(model, batch, generator, decoder, rows, seen, device, strength, sampler, steps, seed, cell, pad, was_training):
    from mindeye_dist.reconstruct.brain import ModelBrain

    try:
        voxels, subject = batch.voxels[:rows].to(device), batch.subject[:rows].to(device)
        grid_rows = [seen]
        if generator is not None and getattr(model, "prior", None) is not None:
            gen = torch.Generator(device).manual_seed(seed)
            res = reconstruct_batch(ModelBrain(model, device), generator, decoder, None, voxels, subject,
                                    best_of=1, strength=strength if decoder else 1.0,
                                    sampler=sampler, steps=steps if sampler == "ddim" else None, guidance=1.0,
                                    cls_norm=cls_normalised(batch.targets[:rows].float().cpu().numpy()),
                                    torch_generator=gen)
            if res.blurry is not None:
                grid_rows.append(res.blurry)
            grid_rows.append(res.candidates[torch.arange(rows), res.chosen])
        elif decoder is not None and getattr(model, "lowlevel", None) is not None:
            grid_rows.append(decoder.decode(model(voxels, subject).lowlevel.float()).float())
    finally:
        model.train(was_training)
    gutter = np.full((pad, 1, 3), 255, dtype=np.uint8)
    parts = []
    for r in grid_rows:
        parts.append(_row(r.float(), cell, pad))
        parts.append(np.broadcast_to(gutter, (pad, parts[-1].shape[1], 3)))
    return np.ascontiguousarray(np.concatenate(parts[:-1], axis=0))
