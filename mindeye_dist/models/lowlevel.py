"""Low-level head: predicts the VAE latent of a (blurry) stimulus image for img2img.

Two layouts (digest sections 2.4 and 6.2), both ending the same way::

    ... -> Linear -> (C_map, h, w) -> GroupNorm(1, C_map) -> diffusers Decoder -> (C, H, W) latent
                                                        `-> 1x1-conv feature projector -> (h*w, F) tokens

* ``lowlevel_from=voxels`` (MindEye1's separate ``Voxel2StableDiffusionModel``): its own
  per-subject Linear(V_s -> h', no bias) -> LN -> SiLU -> Dropout(0.5), residual blocks
  Linear(no bias) -> LN -> SiLU -> Dropout(0.25), Linear(h' -> 64*16*16, no bias).
* ``lowlevel_from=backbone`` (MindEye2): reads the backbone's hidden state,
  Linear(h -> 64*7*7) -> Dropout(0.3).

The decoder is diffusers' ``Decoder`` with ``UpDecoderBlock2D`` blocks and one resnet layer
per block; every block but the last upsamples 2x, so the map size is the latent's H, W over
2 ** (blocks - 1) (MindEye1 64/4 = 16, MindEye2 28/4 = 7, a tiny 8x8 latent with 2 blocks: 4).
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import Decoder
from einops import rearrange
from torch import nn

from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.layers import Residual
from mindeye_dist.models.subjects import SubjectAdapters, SubjectIds


def feature_projector(in_channels: int, dim: int) -> nn.Sequential:
    """1x1 convs in -> dim -> dim -> dim on the map (tokens for the auxiliary SoftCLIP loss)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, dim, 1, bias=False), nn.GroupNorm(1, dim), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 1, bias=False), nn.GroupNorm(1, dim), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 1, bias=True),
    )


class LowLevelHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        channels, map_channels = cfg.lowlevel_channels, cfg.lowlevel_map_channels
        self.map_size = cfg.lowlevel_map_size()
        map_numel = map_channels * self.map_size[0] * self.map_size[1]
        self.from_voxels = cfg.lowlevel_from == "voxels"
        if self.from_voxels:
            h = cfg.lowlevel_hidden_dim
            self.adapters = SubjectAdapters(cfg.subject_table(), h, bias=False)
            self.trunk = nn.Sequential(
                nn.LayerNorm(h), nn.SiLU(), nn.Dropout(0.5),  # MindEye1's lin0 tail
                *[Residual(nn.Linear(h, h, bias=False), nn.LayerNorm(h), nn.SiLU(), nn.Dropout(cfg.lowlevel_dropout))
                  for _ in range(cfg.lowlevel_n_blocks)])
            self.to_map = nn.Linear(h, map_numel, bias=False)
        else:
            self.to_map = nn.Sequential(nn.Linear(cfg.hidden_dim, map_numel), nn.Dropout(cfg.lowlevel_dropout))
        self.map_norm = nn.GroupNorm(1, map_channels)
        self.decoder = Decoder(
            in_channels=map_channels, out_channels=cfg.lowlevel_shape[0],
            up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=tuple(channels),
            layers_per_block=1, norm_num_groups=cfg.lowlevel_norm_groups())
        self.features = feature_projector(map_channels, cfg.lowlevel_feature_dim)

    def forward(self, x: torch.Tensor, subject: SubjectIds = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: voxels (B, max_voxels) when built from voxels, else the backbone hidden (B, h).

        Returns (latent (B, C, H, W), feature tokens (B, h*w, F)).
        """
        if self.from_voxels:
            x = self.trunk(self.adapters(x, subject))
        grid = rearrange(self.to_map(x), "b (c h w) -> b c h w", h=self.map_size[0], w=self.map_size[1])
        grid = self.map_norm(grid)
        latent = self.decoder(grid)
        tokens = rearrange(self.features(grid), "b c h w -> b (h w) c")
        return latent, tokens
