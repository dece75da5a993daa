"""Best-of-k selection as MindEye1 does it (``utils.reconstruction``, "second-order selection").

Each of the k candidates of a stimulus is embedded with the image encoder that made the training
targets (MindEye1: the 257 x 768 CLIP ViT-L/14 hidden tokens, CLS-normalised), flattened and
L2-normalised; the kept candidate has the highest cosine with the brain's retrieval-submodule
output for that stimulus, also flattened and normalised.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from mindeye_dist.errors import ConfigError


class CandidateEncoder(Protocol):
    description: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) [0, 1] -> (N, T, D) tokens comparable with the retrieval embedding."""


class ClipCandidateEncoder:
    """An encoder of ``data.encoders.ENCODERS`` (default MindEye1's CLIP tokens) from local weights."""

    def __init__(self, cfg, device: torch.device):
        from mindeye_dist.data.encoders import ENCODERS, TargetSpec

        if cfg.clip_encoder not in ENCODERS or ENCODERS[cfg.clip_encoder][0] != "targets":
            names = [k for k, v in ENCODERS.items() if v[0] == "targets"]
            raise ConfigError(f"--clip-encoder {cfg.clip_encoder!r} must be one of {', '.join(names)}")
        spec = TargetSpec(encoder=cfg.clip_encoder, weights=cfg.clip_weights, arch=cfg.clip_arch,
                          model_config=cfg.clip_model_config)
        self.encoder = ENCODERS[cfg.clip_encoder][1](spec, device)
        self.device = device
        self.description = f"{cfg.clip_encoder} ({self.encoder.description}) from {cfg.clip_weights}"

    @torch.no_grad()
    def __call__(self, images):
        return self.encoder.fn(images.to(self.device).float()).float()


class SyntheticCandidateEncoder:
    """The synthetic world's CLIP: its known target map applied to the image's latent."""

    description = "the synthetic subject's target map (image -> latent -> targets)"

    def __init__(self, renderer):
        self.renderer = renderer

    def __call__(self, images):
        return self.renderer.encode(images.float().cpu())


def build_candidate_encoder(cfg, device: torch.device, renderer=None) -> CandidateEncoder | None:
    """None when nothing is selected (``best_of`` 1)."""
    if cfg.best_of == 1:
        return None
    if cfg.clip_weights:
        return ClipCandidateEncoder(cfg, device)
    if renderer is not None:
        return SyntheticCandidateEncoder(renderer)
    raise ConfigError(f"--best-of {cfg.best_of} picks candidates by CLIP similarity and needs the image encoder that "
                      "made the targets: pass --clip-weights (e.g. OpenAI ViT-L-14.pt), or --best-of 1")


def candidate_scores(embeddings: torch.Tensor, retrieval: torch.Tensor) -> torch.Tensor:
    """Cosine of every candidate with its stimulus's retrieval embedding.

    embeddings (B, k, T, D), retrieval (B, T, D) -> (B, k); both flattened per item, L2-normalised.
    """
    b, k = embeddings.shape[:2]
    cand = F.normalize(embeddings.reshape(b, k, -1).float(), dim=-1)
    ref = F.normalize(retrieval.reshape(b, -1).float().to(cand.device), dim=-1)
    if cand.shape[-1] != ref.shape[-1]:
        raise ConfigError(f"candidate embeddings have {cand.shape[-1]} values but the retrieval embedding {ref.shape[-1]}: "
                          "the best-of-k encoder must compute tokens like the training targets (--clip-encoder)")
    return torch.einsum("bkd,bd->bk", cand, ref)
