"""Diffusion prior: brain tokens -> samples of the CLIP image-token distribution.

A small network (:class:`PriorNetwork`) plus a wrapper (:class:`DiffusionPrior`) that owns the
noise schedule, the x0-prediction MSE loss and sampling (STYLE #8). The schedule and the
sampling steps are diffusers' (``DDPMScheduler``, ``DDIMScheduler``).

The network follows MindEye's ``VersatileDiffusionPriorNetwork`` on top of DALLE2-pytorch's
prior transformer (digest section 2.2), written from that description:

* sequence ``[brain tokens (T) | time token (1) | noisy image tokens (T) + learned queries]``,
  non-causal; the last T outputs are the x0 prediction;
* classifier-free guidance: with probability p each, the brain tokens are replaced by learned
  ``null_brain_embeds`` and the noisy image tokens by learned ``null_image_embed``;
* attention: multi-query (one shared K/V head), cosine-similarity logits with scale 16, a
  learned null K/V in front, rotary embedding on the first 32 dims of q/k, T5 relative
  position bias (32 buckets, max distance 128); output Linear then LayerNorm;
* feed-forward: LN -> Linear(dim -> 2 * mult * dim) -> SwiGLU -> Linear(mult * dim -> dim), no biases;
* DALLE2 LayerNorms have a gain and no bias; the final one is the "stable" variant.

Parameter count (MindEye1: dim 768, depth 6, 12 heads x 64, 257 tokens) = 56,055,168:

    time MLP 768->1536->1536->768 (with biases)            4,722,432
    learned queries + null brain + null image (3 x 257x768)    592,128
    relative position bias Embedding(32, 12)                       384
    6 x attention (LN 768, null_kv 2x64, to_q 768x768,
        to_kv 768x128, to_out 768x768 + LN 768)            6 x 1,279,616
    6 x feed-forward (LN 768, 768x6144, 3072x768)           6 x 7,078,656
    final LN 768 + Linear 768x768                               590,592

The reference's 56,055,184 has 16 more: rotary-embedding-torch stores its 16 inverse
frequencies as a (frozen) ``nn.Parameter``; here they are computed on the fly. The same
breakdown gives 259,865,200 for MindEye2 (reference 259,865,216).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from einops import rearrange
from torch import nn

ROTARY_DIM = 32  # DALLE2: RotaryEmbedding(dim=min(32, dim_head))
REL_POS_BUCKETS = 32
REL_POS_MAX_DISTANCE = 128
COSINE_SIM_SCALE = 16.0  # DALLE2's cosine_sim_scale for the prior's attention


def _rand(shape, generator: Optional[torch.Generator], device: torch.device, kind: str = "rand", high: int = 0):
    """Random draws from ``generator`` (on its own device) moved to ``device``; meta-safe."""
    where = generator.device if generator is not None else device
    if kind == "randn":
        out = torch.randn(shape, generator=generator, device=where)
    elif kind == "randint":
        out = torch.randint(0, high, shape, generator=generator, device=where)
    else:
        out = torch.rand(shape, generator=generator, device=where)
    return out.to(device)


class LayerNorm(nn.Module):
    """Gain-only LayerNorm; ``stable`` divides by the row max first (DALLE2, for fp16 safety)."""

    def __init__(self, dim: int, eps: float = 1e-5, stable: bool = False):
        super().__init__()
        self.eps, self.stable = eps, stable
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        return F.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)


class SinusoidalEmbedding(nn.Module):
    """Continuous timestep -> (B, dim) sin/cos features."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rotate(x: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """Rotary position embedding on the first ``rot_dim`` features, interleaved pairs, theta 10^4.

    x: (..., n, d) with positions 0..n-1 along dim -2.
    """
    n = x.shape[-2]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device=x.device, dtype=torch.float32) / rot_dim))
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (n, rot/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (n, rot): each angle for one (even, odd) pair
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = rearrange(x_rot, "... (d r) -> ... d r", r=2)
    rotated_half = rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... d r -> ... (d r)")
    return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)


class RelativePositionBias(nn.Module):
    """T5-style learned bias per head and log-spaced distance bucket.

    Bidirectional buckets (half per direction) because the prior is non-causal; DALLE2's
    version clamps every key after the query into bucket 0, which only matters for causal use.
    """

    def __init__(self, heads: int, num_buckets: int = REL_POS_BUCKETS, max_distance: int = REL_POS_MAX_DISTANCE):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, heads)

    def _bucket(self, relative: torch.Tensor) -> torch.Tensor:
        per_side = self.num_buckets // 2
        side = (relative > 0).long() * per_side
        distance = relative.abs()
        exact = per_side // 2
        scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
        far = (exact + (scaled * (per_side - exact)).long()).clamp(max=per_side - 1)
        return side + torch.where(distance < exact, distance, far)

    def forward(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """(heads, n_queries, n_keys); queries sit at key positions n_keys-n_queries .. n_keys-1."""
        q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)
        k_pos = torch.arange(n_keys, device=device)
        buckets = self._bucket(k_pos[None, :] - q_pos[:, None])
        return rearrange(self.embedding(buckets), "i j h -> h i j")


class Attention(nn.Module):
    _no_weight_decay = ("null_kv",)

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.rot_dim = min(ROTARY_DIM, dim_head)
        self.norm = LayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)  # multi-query: one K/V head for all
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), LayerNorm(dim))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = self.norm(x)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (B, N, d) each
        q, k = rotate(q, self.rot_dim), rotate(k, self.rot_dim)
        null_k, null_v = (t.to(x.dtype).expand(b, 1, -1) for t in self.null_kv.unbind(0))
        k, v = torch.cat([null_k, k], dim=1), torch.cat([null_v, v], dim=1)  # (B, N+1, d)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # cosine-sim attention
        k, v = (t[:, None].expand(-1, self.heads, -1, -1) for t in (k, v))  # (B, h, N+1, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=COSINE_SIM_SCALE,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


def feed_forward(dim: int, mult: int, dropout: float) -> nn.Sequential:
    inner = mult * dim
    return nn.Sequential(LayerNorm(dim), nn.Linear(dim, 2 * inner, bias=False), SwiGLU(), nn.Dropout(dropout),
                         nn.Linear(inner, dim, bias=False))


class PriorTransformer(nn.Module):
    """Pre-norm, non-causal transformer of attention + feed-forward residual layers."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int, dropout: float):
        super().__init__()
        self.rel_pos_bias = RelativePositionBias(heads)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, dropout), feed_forward(dim, ff_mult, dropout)])
            for _ in range(depth))
        self.norm_out = LayerNorm(dim, stable=True)
        self.project_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        bias = self.rel_pos_bias(n, n + 1, x.device)  # +1: the null key sits before the sequence
        for attention, ff in self.layers:
            x = x + attention(x, bias)
            x = x + ff(x)
        return self.project_out(self.norm_out(x))


class PriorNetwork(nn.Module):
    """(noisy image tokens, timesteps, brain tokens) -> predicted clean image tokens."""

    _no_weight_decay = ("learned_queries", "null_brain_embeds", "null_image_embed")

    def __init__(self, n_tokens: int, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.n_tokens = n_tokens
        self.time_mlp = nn.Sequential(  # DALLE2 MLP(dim, dim): dim -> 2dim -> 2dim -> dim, SiLU
            SinusoidalEmbedding(dim), nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(),
            nn.Linear(2 * dim, dim))
        self.learned_queries = nn.Parameter(torch.randn(n_tokens, dim) * dim ** -0.5)  # "pos_emb" mode
        self.null_brain_embeds = nn.Parameter(torch.randn(n_tokens, dim))
        self.null_image_embed = nn.Parameter(torch.randn(n_tokens, dim))
        self.transformer = PriorTransformer(dim, depth, heads, dim_head, ff_mult, dropout)

    @staticmethod
    def _keep(batch: int, drop_prob: float, generator, device) -> torch.Tensor:
        """(B, 1, 1) bool: True keeps the input, False swaps in the null embedding."""
        if drop_prob <= 0:
            return torch.ones(batch, 1, 1, dtype=torch.bool, device=device)
        if drop_prob >= 1:
            return torch.zeros(batch, 1, 1, dtype=torch.bool, device=device)
        return (_rand((batch,), generator, device) >= drop_prob).view(batch, 1, 1)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, brain: torch.Tensor,
                brain_drop_prob: float = 0.0, image_drop_prob: float = 0.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        b, device = noisy.shape[0], noisy.device
        brain = torch.where(self._keep(b, brain_drop_prob, generator, device), brain,
                            self.null_brain_embeds.to(brain.dtype))
        noisy = torch.where(self._keep(b, image_drop_prob, generator, device), noisy,
                            self.null_image_embed.to(noisy.dtype))
        # The sinusoidal features are computed in fp32; cast before the MLP so bf16 weights work.
        sinusoid = self.time_mlp[0](timesteps).to(noisy.dtype)
        time = rearrange(self.time_mlp[1:](sinusoid), "b d -> b 1 d")
        tokens = torch.cat([brain, time, noisy + self.learned_queries], dim=1)  # (B, 2T+1, D)
        return self.transformer(tokens)[:, -self.n_tokens:]  # (B, T, D)


class DiffusionPrior(nn.Module):
    """Owns the cosine noise schedule, the x0-prediction MSE loss and DDPM/DDIM sampling."""

    def __init__(self, net: PriorNetwork, *, timesteps: int = 100, cond_drop_prob: float = 0.2,
                 target_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.cond_drop_prob = cond_drop_prob
        self.target_scale = target_scale
        # squaredcos_cap_v2 = the improved-DDPM cosine schedule (s = 0.008, betas capped at 0.999)
        # that DALLE2 uses; "sample" = the network predicts x0 (DALLE2's predict_x_start=True).
        self.scheduler = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2",
                                       prediction_type="sample", clip_sample=False)

    def loss(self, brain_tokens: torch.Tensor, target_tokens: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE between predicted and true (scaled) clean tokens at a uniform random timestep.

        Returns (loss, prediction) with the prediction divided back by the target scale.
        Both inputs are dropped to their null embeddings with ``cond_drop_prob`` each.
        """
        x0 = target_tokens * self.target_scale
        b, device = x0.shape[0], x0.device
        t = _rand((b,), generator, device, "randint", high=self.scheduler.config.num_train_timesteps)
        noise = _rand(x0.shape, generator, device, "randn").to(x0.dtype)
        # The scheduler's add_noise moves its own table to the input's device (breaks after a meta
        # call), so the same formula is applied here to a copy of its alphas_cumprod.
        alpha_bar = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[t].view(b, 1, 1)
        noisy = (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise).to(x0.dtype)
        prediction = self.net(noisy, t, brain_tokens, self.cond_drop_prob, self.cond_drop_prob, generator)
        return F.mse_loss(prediction, x0), prediction / self.target_scale

    def forward(self, brain_tokens: torch.Tensor, target_tokens: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`loss`; a forward call lets ZeRO-3 hooks gather the prior's parameters."""
        return self.loss(brain_tokens, target_tokens, generator)

    def _guided(self, noisy, t, brain, cond_scale: float) -> torch.Tensor:
        timesteps = t.expand(noisy.shape[0]).to(noisy.device)
        cond = self.net(noisy, timesteps, brain)
        if cond_scale == 1.0:
            return cond
        null = self.net(noisy, timesteps, brain, brain_drop_prob=1.0, image_drop_prob=1.0)
        return null + (cond - null) * cond_scale

    @torch.no_grad()
    def sample(self, brain_tokens: torch.Tensor, steps: Optional[int] = None,
               sampler: Literal["ddpm", "ddim"] = "ddpm", generator: Optional[torch.Generator] = None,
               cond_scale: float = 1.0, eta: float = 1.0) -> torch.Tensor:
        """Sample clean tokens (unscaled) for brain tokens (B, T, D).

        ``ddpm``: ancestral sampling, default all training timesteps (MindEye1: 100).
        ``ddim``: default 20 steps with eta 1 (DALLE2's default; MindEye2's inference), trailing
        timestep spacing so sampling starts at the last training step as DALLE2's linspace does.
        Deterministic for a given ``generator`` state.
        """
        if sampler == "ddpm":
            scheduler = DDPMScheduler.from_config(self.scheduler.config)
            steps = steps or self.scheduler.config.num_train_timesteps
            step_kwargs = {}
        elif sampler == "ddim":
            scheduler = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
            steps = steps or 20
            step_kwargs = {"eta": eta}
        else:
            raise ValueError(f"sampler={sampler!r} is invalid: expected 'ddpm' or 'ddim'")
        scheduler.set_timesteps(steps)
        x = _rand(brain_tokens.shape, generator, brain_tokens.device, "randn").to(brain_tokens.dtype)
        for t in scheduler.timesteps:
            prediction = self._guided(x, t, brain_tokens, cond_scale)
            x = scheduler.step(prediction, t, x, generator=generator, **step_kwargs).prev_sample
        return x / self.target_scale
