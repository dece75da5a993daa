"""The references' own model code, composed as MindEye composes it (measurement and test code).

MindEye1's ``BrainNetwork`` (MedARC-AI/fMRI-reconstruction-NSD ``src/models.py``, not a package, so
written out here with its attribute names) and its diffusion prior, built from the installable
``dalle2-pytorch==1.14.2`` classes MindEye1 pinned (``CausalTransformer``, ``MLP``,
``SinusoidalPosEmb``, ``DiffusionPrior``; needs the ``reference`` extra plus
``pip install --no-deps dalle2-pytorch==1.14.2``). The benchmark's MindEye1-size reference step
(:mod:`mindeye_dist.bench.reference`) trains these; ``tests/reference_layouts.py`` re-exports
them for the conversion and equivalence tests. Training code never imports this module.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn


def projector(in_dim: int, out_dim: int, h: int) -> nn.Sequential:
    """Both references' retrieval projector: (LN, GELU, Linear) x 3."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.GELU(), nn.Linear(in_dim, h), nn.LayerNorm(h), nn.GELU(),
                         nn.Linear(h, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, out_dim))


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
