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
from einops import rearrange, repeat
from torch import nn


def projector(in_dim: int, out_dim: int, h: int) -> nn.Sequential:
    """Both references' retrieval projector: (LN, GELU, Linear) x 3."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.GELU(), nn.Linear(in_dim, h), nn.LayerNorm(h), nn.GELU(),
                         nn.Linear(h, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, out_dim))


def maps_projector(in_channels: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), nn.GroupNorm(1, dim), nn.ReLU(True),
                         nn.Conv2d(dim, dim, 1, bias=False), nn.GroupNorm(1, dim), nn.ReLU(True),
                         nn.Conv2d(dim, dim, 1, bias=True))


def decoder(in_channels: int, channels: list[int], out_channels: int = 4) -> Decoder:
    return Decoder(in_channels=in_channels, out_channels=out_channels,
                   up_block_types=["UpDecoderBlock2D"] * len(channels), block_out_channels=channels,
                   layers_per_block=1)


class ME1BrainNetwork(nn.Module):
    """MindEye1 ``BrainNetwork`` (norm_type='ln', act_first=False, use_projector=True)."""

    def __init__(self, in_dim: int, h: int, n_blocks: int, clip_size: int, n_tokens: int, proj_h: int = 2048):
        super().__init__()
        self.lin0 = nn.Sequential(nn.Linear(in_dim, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(0.5))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(h, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(0.15))
                                 for _ in range(n_blocks))
        self.lin1 = nn.Linear(h, clip_size * n_tokens, bias=True)
        self.clip_size = clip_size
        self.projector = projector(clip_size, clip_size, proj_h)

    def forward(self, x):
        x = self.lin0(x)
        residual = x
        for block in self.mlp:
            x = block(x)
            x = x + residual
            residual = x
        x = self.lin1(x)
        return x, self.projector(x.reshape(len(x), -1, self.clip_size))


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


# ---- the prior: dalle2-pytorch 1.14.2 parts, composed as MindEye composes them ----------------


def dalle2_prior_network(dim: int, num_tokens: int, depth: int, dim_head: int, heads: int) -> nn.Module:
    """MindEye's ``VersatileDiffusionPriorNetwork`` / MindEye2's ``PriorNetwork`` with
    ``learned_query_mode="pos_emb"``, ``causal=False``, ``num_timesteps=None`` (continuous time)."""
    from dalle2_pytorch.dalle2_pytorch import MLP, CausalTransformer, Rearrange, SinusoidalPosEmb, prob_mask_like

    class PriorNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            self.dim, self.num_tokens, self.self_cond = dim, num_tokens, False
            self.to_time_embeds = nn.Sequential(nn.Sequential(SinusoidalPosEmb(dim), MLP(dim, dim)),
                                                Rearrange("b (n d) -> b n d", n=1))
            self.learned_query = nn.Parameter(torch.randn(num_tokens, dim) * dim ** -0.5)
            # MindEye's FlaggedCausalTransformer is dalle2's CausalTransformer with the attention's
            # causal flag passed through; causal=False is that flag cleared.
            self.causal_transformer = CausalTransformer(dim=dim, depth=depth, dim_head=dim_head, heads=heads)
            for attention, _ in self.causal_transformer.layers:
                attention.causal = False
            self.null_brain_embeds = nn.Parameter(torch.randn(num_tokens, dim))
            self.null_image_embed = nn.Parameter(torch.randn(num_tokens, dim))

        def forward_with_cond_scale(self, *args, cond_scale=1.0, **kwargs):
            logits = self.forward(*args, **kwargs)
            if cond_scale == 1:
                return logits
            null_logits = self.forward(*args, text_cond_drop_prob=1.0, image_cond_drop_prob=1, **kwargs)
            return null_logits + (logits - null_logits) * cond_scale

        def forward(self, image_embed, diffusion_timesteps, *, text_embed, self_cond=None, text_cond_drop_prob=0.0,
                    image_cond_drop_prob=0.0):
            batch, dtype, device = image_embed.shape[0], image_embed.dtype, image_embed.device
            brain_keep = rearrange(prob_mask_like((batch,), 1 - text_cond_drop_prob, device), "b -> b 1 1")
            image_keep = rearrange(prob_mask_like((batch,), 1 - image_cond_drop_prob, device), "b -> b 1 1")
            brain = torch.where(brain_keep, text_embed, self.null_brain_embeds.to(dtype)[None])
            image = torch.where(image_keep, image_embed, self.null_image_embed.to(dtype)[None])
            time = self.to_time_embeds(diffusion_timesteps.type(dtype))
            image = image + repeat(self.learned_query, "n d -> b n d", b=batch)
            tokens = self.causal_transformer(torch.cat((brain, time, image), dim=-2))
            return tokens[..., -self.num_tokens:, :]

    return PriorNetwork()


def dalle2_diffusion_prior(net: nn.Module, image_embed_scale=None, timesteps: int = 100, cond_drop_prob: float = 0.2):
    """``BrainDiffusionPrior(net, image_embed_dim, condition_on_text_encodings=False, timesteps=100,
    cond_drop_prob=0.2, image_embed_scale=None)``'s base class, dalle2's ``DiffusionPrior``."""
    from dalle2_pytorch import DiffusionPrior

    return DiffusionPrior(net=net, image_embed_dim=net.dim, timesteps=timesteps, cond_drop_prob=cond_drop_prob,
                          condition_on_text_encodings=False, image_embed_scale=image_embed_scale)


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
