"""The unit the data plane hands to the training loop."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Batch:
    """One batch of stimuli, all tensors on the same device.

    ``voxels`` are z-scored with the train-split statistics and already reduced over
    repetitions (one / convex / mean / cycle for training, mean for evaluation).
    """

    voxels: torch.Tensor  # (B, V) float32
    targets: torch.Tensor  # (B, T, D) float32, CLIP-like tokens (MindEye1: all divided by ||token 0||)
    vae: Optional[torch.Tensor]  # (B, 4, h, w) float32, or None when the dataset has no VAE latents
    images: Optional[torch.Tensor]  # (B, H, W, 3) uint8, or None when the dataset has no images
    subject: torch.Tensor  # (B,) long, subject id from meta.json
    index: torch.Tensor  # (B,) long, row index of the stimulus in its source split
    teacher: Optional[torch.Tensor] = None  # (B, N, F) float32 low-level teacher feature tokens (SoftCont), or None

    def __len__(self) -> int:
        return int(self.voxels.shape[0])

    def _map(self, fn) -> "Batch":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name))) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)`` for custom batch types."""
        return self._map(lambda t: t.pin_memory())
