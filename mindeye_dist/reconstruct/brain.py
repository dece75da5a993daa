"""Brain -> what the generator needs: image tokens to sample from, the retrieval embedding, the
low-level latent. Two decoders share the interface:

* :class:`ModelBrain` -- a trained run: backbone tokens condition the diffusion prior, whose samples
  are the image tokens (MindEye1: DDPM 100; MindEye2: DDIM 20, eta 1); the retrieval projector's
  output picks among candidates; the low-level head predicts the VAE latent;
* :class:`RidgeBrain` -- the linear floor: closed-form ridge maps voxels -> tokens and voxels ->
  VAE latents fitted on the train split (alpha chosen on the validation split), no prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from mindeye_dist.errors import ConfigError


@dataclass
class BrainOutputs:
    condition: torch.Tensor
    """(B, T, D) what :meth:`sample_tokens` starts from (backbone tokens, or tokens directly)."""
    retrieval: torch.Tensor
    """(B, T, D) retrieval embedding (best-of-k reference)."""
    lowlevel: Optional[torch.Tensor]
    """(B, C, h, w) predicted VAE latent, or None without a low-level head."""


class ModelBrain:
    """A run's MindEye model (backbone, projector, prior, low-level head) on ``device``."""

    def __init__(self, model, device: torch.device):
        if model.prior is None:
            raise ConfigError("the run's model has no diffusion prior (model.prior=false); reconstruction samples image "
                              "tokens from it. Train with the prior on, or use --brain ridge for the linear floor")
        self.model = model.to(device).eval()
        self.device = device

    def describe(self) -> dict:
        return {"kind": "model", "lowlevel": self.model.lowlevel is not None}

    @torch.no_grad()
    def decode(self, voxels: torch.Tensor, subject: torch.Tensor) -> BrainOutputs:
        out = self.model(voxels.to(self.device), subject.to(self.device))
        return BrainOutputs(out.backbone, out.projector, out.lowlevel)

    @torch.no_grad()
    def sample_tokens(self, condition: torch.Tensor, generator: torch.Generator, sampler: str, steps: Optional[int],
                      guidance: float) -> torch.Tensor:
        """(N, T, D) prior samples; every row an independent draw (candidates repeat the condition)."""
        return self.model.prior.sample(condition, steps=steps, sampler=sampler, generator=generator, cond_scale=guidance)


class RidgeBrain:
    """Ridge voxels -> tokens (alpha by validation retrieval) and voxels -> VAE latents (by validation MSE)."""

    def __init__(self, tokens_fit, vae_fit, device: torch.device):
        self.tokens_fit, self.vae_fit, self.device = tokens_fit, vae_fit, device

    @classmethod
    def fit(cls, data_cfg, device: torch.device, way: int = 300, loops: int = 30, seed: int = 0) -> "RidgeBrain":
        from mindeye_dist.evaluate import ridge_baseline

        train, val = split_fields(data_cfg, data_cfg.train_split), split_fields(data_cfg, data_cfg.val_split)
        tokens = ridge_baseline(train["voxels"], train["targets"], val["voxels"], val["targets"],
                                way=min(way, len(val["voxels"])), loops=loops, seed=seed)
        vae = None
        if train.get("vae") is not None:
            vae = ridge_baseline(train["voxels"], train["vae"], val["voxels"], val["vae"], select_by="mse",
                                 way=min(way, len(val["voxels"])), loops=1, seed=seed)
        return cls(tokens, vae, device)

    def describe(self) -> dict:
        return {"kind": "ridge", "alpha_tokens": self.tokens_fit.alpha,
                "alpha_vae": None if self.vae_fit is None else self.vae_fit.alpha}

    def decode(self, voxels, subject) -> BrainOutputs:
        x = voxels.cpu().numpy()
        tokens = torch.from_numpy(self.tokens_fit.predict(x)).to(self.device)
        low = None if self.vae_fit is None else torch.from_numpy(self.vae_fit.predict(x)).to(self.device)
        return BrainOutputs(tokens, tokens, low)

    def sample_tokens(self, condition, generator, sampler, steps, guidance):
        return condition  # the ridge prediction is the image embedding; there is no prior to sample


def split_fields(data_cfg, split: str, limit: Optional[int] = None, batch_size: int = 256) -> dict:
    """A split's rows in order: voxels (reps averaged, z-scored), targets, vae, images, subject, index."""
    from mindeye_dist.data import build_eval_loader

    parts: dict[str, list] = {k: [] for k in ("voxels", "targets", "vae", "images", "subject", "index")}
    seen = 0
    for batch in build_eval_loader(data_cfg, split, batch_size=batch_size):
        for key in parts:
            value = getattr(batch, key)
            parts[key].append(None if value is None else value.numpy())
        seen += len(batch)
        if limit is not None and seen >= limit:
            break
    out = {k: (None if not v or v[0] is None else np.concatenate(v)[:limit]) for k, v in parts.items()}
    if out["voxels"] is None:
        raise ConfigError(f"split {split!r} of {data_cfg.url} has no samples")
    return out
