"""MindEye's reference modules composed in tests, with the references' attribute names.

Read from MedARC-AI/fMRI-reconstruction-NSD ``src/models.py`` (MindEye1: ``BrainNetwork``,
``Voxel2StableDiffusionModel``, ``VersatileDiffusionPriorNetwork``, ``FlaggedCausalTransformer``,
``BrainDiffusionPrior``) and MedARC-AI/MindEyeV2 ``src/models.py`` + ``src/Train.ipynb``
(``RidgeRegression``, ``BrainNetwork``, ``PriorNetwork``, ``MindEyeModule``). Built from torch,
diffusers and dalle2-pytorch parts, so their state dicts carry the released checkpoints' key
names and shapes, and their forwards are the computations a converted model must reproduce.
Sizes are parameters so tests can build them small (and at full size on the meta device).
Nothing here is imported by the package.
"""

from __future__ import annotations

import mindeye_dist  # noqa: F401  (makes torchvision importable before diffusers/dalle2 import it)
import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from mindeye_dist.bench.reference_models import (ME1BrainNetwork, dalle2_diffusion_prior,  # noqa: F401  (re-exported)
                                                   dalle2_prior_network, projector)


def maps_projector(in_channels: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), nn.GroupNorm(1, dim), nn.ReLU(True),
                         nn.Conv2d(dim, dim, 1, bias=False), nn.GroupNorm(1, dim), nn.ReLU(True),
                         nn.Conv2d(dim, dim, 1, bias=True))


def decoder(in_channels: int, channels: list[int], out_channels: int = 4) -> Decoder:
    return Decoder(in_channels=in_channels, out_channels=out_channels,
                   up_block_types=["UpDecoderBlock2D"] * len(channels), block_out_channels=channels,
                   layers_per_block=1)


class ME1Voxel2SD(nn.Module):
    """MindEye1 ``Voxel2StableDiffusionModel`` with ups_mode='4x' and use_cont=True."""

    def __init__(self, in_dim: int, h: int, n_blocks: int, side: int, channels: list[int], feat: int = 512):
        super().__init__()
        self.lin0 = nn.Sequential(nn.Linear(in_dim, h, bias=False), nn.LayerNorm(h), nn.SiLU(inplace=True),
                                  nn.Dropout(0.5))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(h, h, bias=False), nn.LayerNorm(h), nn.SiLU(inplace=True),
                                               nn.Dropout(0.25)) for _ in range(n_blocks))
        self.side = side
        self.lin1 = nn.Linear(h, 64 * side * side, bias=False)
        self.norm = nn.GroupNorm(1, 64)
        self.upsampler = decoder(64, channels)
        self.maps_projector = maps_projector(64, feat)

    def forward(self, x):
        x = self.lin0(x)
        residual = x
        for block in self.mlp:
            x = block(x)
            x = x + residual
            residual = x
        x = self.norm(self.lin1(x).reshape(x.shape[0], -1, self.side, self.side).contiguous())
        return self.upsampler(x), self.maps_projector(x).flatten(2).permute(0, 2, 1)


class ME2RidgeRegression(nn.Module):
    def __init__(self, input_sizes: list[int], out_features: int):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(n, out_features) for n in input_sizes)

    def forward(self, x, subj_idx: int):
        return self.linears[subj_idx](x[:, 0]).unsqueeze(1)


class ME2BrainNetwork(nn.Module):
    """MindEye2 ``BrainNetwork`` with seq_len=1 (its default elsewhere is 2; MindEye2 passes 1)."""

    def __init__(self, h: int, n_blocks: int, clip_size: int, n_tokens: int, blurry_recon: bool = True,
                 side: int = 7, channels: tuple[int, ...] = (32, 64, 128), seq_len: int = 1, drop: float = 0.15):
        super().__init__()
        self.clip_size, self.blurry_recon, self.side = clip_size, blurry_recon, side
        mlp = lambda d: nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(drop), nn.Linear(d, d))  # noqa: E731
        self.mixer_blocks1 = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), mlp(h)) for _ in range(n_blocks))
        self.mixer_blocks2 = nn.ModuleList(nn.Sequential(nn.LayerNorm(seq_len), mlp(seq_len)) for _ in range(n_blocks))
        self.backbone_linear = nn.Linear(h * seq_len, clip_size * n_tokens, bias=True)
        self.clip_proj = projector(clip_size, clip_size, clip_size)
        if blurry_recon:
            self.blin1 = nn.Linear(h * seq_len, 64 * side * side, bias=True)
            self.bdropout = nn.Dropout(.3)
            self.bnorm = nn.GroupNorm(1, 64)
            self.bupsampler = decoder(64, list(channels))
            self.b_maps_projector = maps_projector(64, 512)

    def forward(self, x):
        residual1 = x
        residual2 = x.permute(0, 2, 1)
        for block1, block2 in zip(self.mixer_blocks1, self.mixer_blocks2):
            x = block1(x) + residual1
            residual1 = x
            x = x.permute(0, 2, 1)
            x = block2(x) + residual2
            residual2 = x
            x = x.permute(0, 2, 1)
        x = x.reshape(x.size(0), -1)
        backbone = self.backbone_linear(x).reshape(len(x), -1, self.clip_size)
        c = self.clip_proj(backbone)
        b = None
        if self.blurry_recon:
            b = self.bdropout(self.blin1(x))
            b = self.bnorm(b.reshape(b.shape[0], -1, self.side, self.side).contiguous())
            b_aux = self.b_maps_projector(b).flatten(2).permute(0, 2, 1)
            b = (self.bupsampler(b), b_aux)
        return backbone, c, b


class ME2Module(nn.Module):
    """MindEye2's ``MindEyeModule`` holding ``ridge``, ``backbone`` and (optionally) ``diffusion_prior``."""

    def __init__(self, voxels: list[int], h: int, n_blocks: int, clip_size: int, n_tokens: int, **backbone_kwargs):
        super().__init__()
        self.ridge = ME2RidgeRegression(voxels, h)
        self.backbone = ME2BrainNetwork(h, n_blocks, clip_size, n_tokens, **backbone_kwargs)


def perturb_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Move every trainable parameter off its init (LayerNorm gains off 1, biases off 0), so a
    weight that lands in the wrong place changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and not p.is_meta:
                p.add_(scale * torch.randn(p.shape, generator=generator))
    return module


def save_like_reference(state: dict, path):
    """How both references save: ``torch.save({'epoch', 'model_state_dict', 'optimizer_state_dict', ...})``."""
    torch.save({"epoch": 3, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "train_losses": [0.5, 0.4], "lrs": [3e-4]}, path)
    return path
