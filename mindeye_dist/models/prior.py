"""Diffusion prior: brain tokens -> samples of the CLIP image-token distribution.

A small network (:class:`PriorNetwork`) plus a wrapper (:class:`DiffusionPrior`) that owns the
noise schedule, the x0-prediction MSE loss and sampling (STYLE #8).

The network computes what MindEye's prior computes: MindEye1's ``VersatileDiffusionPriorNetwork``
/ MindEye2's ``PriorNetwork`` over ``FlaggedCausalTransformer(causal=False)``, built from
DALLE2-pytorch 1.14.2 components (``SinusoidalPosEmb``, ``MLP``, ``RelPosBias``, ``Attention``,
``FeedForward``, ``LayerNorm``, rotary-embedding-torch 0.2.3's ``RotaryEmbedding``).
``tests/test_prior_dalle2.py`` loads identical weights into that reference and this network and
compares outputs, gradients, the loss and both samplers. Written from the reference's behaviour:

* sequence ``[brain tokens (T) | time token (1) | noisy image tokens (T) + learned pos_emb]``,
  non-causal; the last T outputs are the x0 prediction;
* classifier-free guidance: with probability p each, the brain tokens are replaced by learned
  ``null_brain_embeds`` and the noisy image tokens by learned ``null_image_embed`` (a sample is
  kept when ``u < 1 - p`` for a uniform u, DALLE2's ``prob_mask_like``);
* attention: multi-query (one shared K/V head), rotary embedding on the first min(32, dim_head)
  features of q and k (interleaved pairs, positions 0..n-1, the null key is not rotated), a
  learned null K/V in front, cosine-similarity logits with scale 16, DALLE2's one-directional
  T5 relative-position bias (see :class:`RelativePositionBias`); output Linear then LayerNorm;
* feed-forward: LN -> Linear(dim -> 2 * mult * dim) -> SwiGLU -> Linear(mult * dim -> dim), no biases;
* DALLE2 LayerNorms have a gain and no bias, eps 1e-5 in fp32 and 1e-3 in lower precision; the
  final one is the "stable" variant (divides by the row max first);
* time: sinusoidal features of the continuous timestep -> MLP dim -> 2dim -> 2dim -> dim (SiLU).

The wrapper trains on DALLE2's cosine schedule and samples with DALLE2's DDPM and DDIM loops.
Its schedule tables and both sampling loops are computed here rather than by diffusers'
schedulers, for reasons given where they are (:func:`schedule_tables`, :meth:`DiffusionPrior._sample_ddim`).

Deliberate differences, none of which changes an fp32 result: the sinusoidal time features are
computed in fp32 and the time MLP runs in the model's dtype (DALLE2 computes the features in the
input dtype and the MLP in fp32, which fails with bf16 weights), and attention is
``scaled_dot_product_attention``, on a CPU :func:`multi_query_attention` (the same function,
blockwise, with a hand-written backward).

Parameter count (MindEye1: dim 768, depth 6, 12 heads x 64, 257 tokens) = 56,055,168:

    time MLP 768->1536->1536->768 (with biases)            4,722,432
    learned queries + null brain + null image (3 x 257x768)    592,128
    relative position bias Embedding(32, 12)                       384
    6 x attention (LN 768, null_kv 2x64, to_q 768x768,
        to_kv 768x128, to_out 768x768 + LN 768)            6 x 1,279,616
    6 x feed-forward (LN 768, 768x6144, 3072x768)           6 x 7,078,656
    final LN 768 + Linear 768x768                               590,592

The reference's 56,055,184 has 16 more: rotary-embedding-torch stores its 16 inverse
frequencies as a frozen ``nn.Parameter``; here they are computed on the fly
(:func:`rotary_inverse_frequencies`). The same breakdown gives 259,865,200 for MindEye2
(reference 259,865,216).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.autograd.function import once_differentiable

from mindeye_dist.models.layers import mark_checkpoint_unit, run_checkpointed

ROTARY_DIM = 32  # DALLE2: RotaryEmbedding(dim=min(32, dim_head))
ROTARY_THETA = 10000.0
REL_POS_BUCKETS = 32
REL_POS_MAX_DISTANCE = 128
COSINE_SIM_SCALE = 16.0  # DALLE2's cosine_sim_scale for the prior's attention
LOW_PRECISION_LN_EPS = 1e-3  # DALLE2 LayerNorm's fp16_eps, used for every non-fp32 input


def _rand(shape, generator: Optional[torch.Generator], device: torch.device, kind: str = "rand", high: int = 0):
    """Random draws from ``generator`` (on its own device) moved to ``device``; meta-safe.

    With a CPU generator seeded like torch's global one, the draws equal DALLE2's
    (``torch.rand``/``uniform_``, ``randn``/``randn_like`` and ``randint`` share one stream).
    """
    where = generator.device if generator is not None else device
    if kind == "randn":
        out = torch.randn(shape, generator=generator, device=where)
    elif kind == "randint":
        out = torch.randint(0, high, shape, generator=generator, device=where)
    else:
        out = torch.rand(shape, generator=generator, device=where)
    return out.to(device)


class LayerNorm(nn.Module):
    """Gain-only LayerNorm; ``stable`` divides by the row max first (DALLE2, for fp16 safety).

    eps is 1e-5 for fp32 inputs and 1e-3 otherwise, as DALLE2's ``LayerNorm(fp16_eps=1e-3)``.
    """

    def __init__(self, dim: int, eps: float = 1e-5, stable: bool = False):
        super().__init__()
        self.eps, self.stable = eps, stable
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if x.dtype == torch.float32 else LOW_PRECISION_LN_EPS
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        return F.layer_norm(x, x.shape[-1:], self.weight, None, eps)


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


def rotary_inverse_frequencies(rot_dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(rot_dim / 2,) inverse frequencies theta^(-2i/rot_dim): rotary-embedding-torch's ``freqs``."""
    return 1.0 / (ROTARY_THETA ** (torch.arange(0, rot_dim, 2, device=device)[: rot_dim // 2].float() / rot_dim))


def rotate(x: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """Rotary position embedding on the first ``rot_dim`` features, interleaved pairs, theta 10^4.

    x: (..., n, d) with positions 0..n-1 along dim -2.
    """
    n = x.shape[-2]
    inv_freq = rotary_inverse_frequencies(rot_dim, x.device)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (n, rot/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (n, rot): each angle for one (even, odd) pair
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = rearrange(x_rot, "... (d r) -> ... d r", r=2)
    rotated_half = rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... d r -> ... (d r)")
    return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)


class RelativePositionBias(nn.Module):
    """DALLE2's ``RelPosBias``: a learned bias per head and T5-style log-spaced distance bucket.

    One-directional, as in DALLE2-pytorch 1.14.2: the distance from query i to key j is
    ``max(i - j, 0)``, so every key at or after the query shares bucket 0 (DALLE2 wrote it for its
    causal prior; MindEye runs it non-causally and keeps it). Queries are numbered 0..n-1 and keys
    0..n with key 0 the null key, so token m's key sits at j = m + 1: query i sees its own token
    and every later one at distance 0 and token m < i at distance i - m - 1.
    Distances below 16 get their own bucket; 16..127 share 16 log-spaced buckets; 128 and more
    fall in the last one.
    """

    def __init__(self, heads: int, num_buckets: int = REL_POS_BUCKETS, max_distance: int = REL_POS_MAX_DISTANCE):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, heads)

    def _bucket(self, distance: torch.Tensor) -> torch.Tensor:
        """(...) long distances >= 0 -> bucket ids, with DALLE2's float32 arithmetic and truncation."""
        exact = self.num_buckets // 2
        # clamp(min=1): log(0) would be -inf; those distances take the exact branch anyway.
        scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
        far = (exact + (scaled * (self.num_buckets - exact)).long()).clamp(max=self.num_buckets - 1)
        return torch.where(distance < exact, distance, far)

    def forward(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """(heads, n_queries, n_keys) bias; DALLE2 calls it with (n, n + 1) for the null key."""
        q_pos = torch.arange(n_queries, device=device)
        k_pos = torch.arange(n_keys, device=device)
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0)  # (n_queries, n_keys)
        return rearrange(self.embedding(self._bucket(distance)), "i j h -> h i j")


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
        dropout = self.dropout if self.training else 0.0
        if _use_cpu_attention(x, dropout):
            out = multi_query_attention(q, k, v, bias, COSINE_SIM_SCALE)
        else:
            k, v = (t[:, None].expand(-1, self.heads, -1, -1) for t in (k, v))  # (B, h, N+1, d)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=COSINE_SIM_SCALE,
                                                 dropout_p=dropout)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _use_cpu_attention(x: torch.Tensor, dropout: float) -> bool:
    """The prior's attention takes :func:`multi_query_attention` on a CPU without attention dropout
    (every preset: the config has no prior dropout), SDPA elsewhere. On a CPU with dropout, SDPA's
    math path keeps three (B, h, N, N+1) tensors per layer that :mod:`mindeye_dist.estimate`
    does not count."""
    return x.device.type == "cpu" and dropout == 0.0


CPU_ATTENTION_BLOCK_BYTES = 4 << 20  # one block's fp32 scores; 1-8 MiB measured alike at MindEye1's shape


class _BlockedMultiQueryAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with one K/V head shared by every query head, computed a
    block of queries of one sample at a time (FlashAttention's recurrence in torch ops).

    Why not SDPA on a CPU: the relative-position bias is a float mask that needs a gradient, which
    torch's fused CPU kernel does not return, so SDPA falls back to its math path: it expands K/V to
    every head, runs h small (N x d) x (d x N+1) products per sample and keeps two (B, h, N, N+1)
    tensors for the backward (0.8 GB per layer at MindEye1's prior and micro-batch 32). Here each
    block is (queries x heads) rows against the shared keys, one matmul, small enough for the
    caches; only the output and each row's log-sum-exp are kept, and the backward recomputes each
    block's probabilities (one more QK^T product) and returns the bias gradient.
    ``python -m mindeye_dist.bench.attention`` measures both.

    Inputs q (B, h, N, d), k and v (B, S, d), bias (h, N, S); half and bf16 are computed in fp32,
    as SDPA's math path does, under autocast too. Output (B, h, N, d), a view of (B, N, h, d)
    memory, so the caller's ``b h n d -> b n (h d)`` costs no copy.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        with torch.autocast("cpu", enabled=False):  # the work dtype below, not autocast's
            return _BlockedMultiQueryAttention._forward(ctx, q, k, v, bias, scale)

    @staticmethod
    def _forward(ctx, q, k, v, bias, scale: float):
        dtype = q.dtype
        ctx.dtypes = (dtype, k.dtype, v.dtype, bias.dtype)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        q = q.transpose(1, 2).to(work).contiguous()  # (B, N, h, d)
        k, v = k.to(work), v.to(work)
        rows_bias = bias.to(work).permute(1, 0, 2).contiguous()  # (N, h, S)
        b, n, h, d = q.shape
        s_len = k.shape[1]
        block = max(1, min(n, CPU_ATTENTION_BLOCK_BYTES // (h * s_len * 4)))
        out = torch.empty_like(q)
        lse = q.new_empty(b, n, h)
        for i in range(b):
            k_t, v_i = k[i].T, v[i]
            for j in range(0, n, block):
                c = min(block, n - j)
                scores = torch.addmm(rows_bias[j:j + c].view(c * h, s_len), q[i, j:j + c].view(c * h, d), k_t,
                                     alpha=scale)
                top = scores.amax(-1, keepdim=True)
                probs = scores.sub_(top).exp_()
                total = probs.sum(-1, keepdim=True)
                torch.mm(probs, v_i, out=out[i, j:j + c].view(c * h, d)).div_(total)
                lse[i, j:j + c].view(c * h, 1).copy_(top.add_(total.log_()))
        ctx.save_for_backward(q, k, v, rows_bias, out, lse)
        ctx.scale, ctx.block = scale, block
        return out.to(dtype).transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        with torch.autocast("cpu", enabled=False):
            return _BlockedMultiQueryAttention._backward(ctx, d_out)

    @staticmethod
    def _backward(ctx, d_out):
        q, k, v, rows_bias, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        b, n, h, d = q.shape
        s_len = k.shape[1]
        d_out = d_out.transpose(1, 2).to(q.dtype).contiguous()  # (B, N, h, d)
        delta = (d_out * out).sum(-1)  # (B, N, h): rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dbias = torch.zeros_like(rows_bias) if ctx.needs_input_grad[3] else None
        for i in range(b):
            k_i, v_i, dk_i, dv_i = k[i], v[i], dk[i], dv[i]
            for j in range(0, n, block):
                c = min(block, n - j)
                q_ij, do_ij = q[i, j:j + c].view(c * h, d), d_out[i, j:j + c].view(c * h, d)
                scores = torch.addmm(rows_bias[j:j + c].view(c * h, s_len), q_ij, k_i.T, alpha=scale)
                probs = scores.sub_(lse[i, j:j + c].view(c * h, 1)).exp_()
                dv_i.addmm_(probs.T, do_ij)
                d_scores = torch.mm(do_ij, v_i.T).sub_(delta[i, j:j + c].view(c * h, 1)).mul_(probs)
                if dbias is not None:
                    dbias[j:j + c].view(c * h, s_len).add_(d_scores)
                torch.mm(d_scores, k_i, out=dq[i, j:j + c].view(c * h, d)).mul_(scale)
                dk_i.addmm_(d_scores.T, q_ij, alpha=scale)
        q_dtype, k_dtype, v_dtype, bias_dtype = ctx.dtypes
        return (dq.transpose(1, 2).to(q_dtype), dk.to(k_dtype), dv.to(v_dtype),
                None if dbias is None else dbias.permute(1, 0, 2).to(bias_dtype), None)


def multi_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v: q (B, h, N, d); k, v (B, S, d), shared by the h heads;
    bias (h, N, S) -> (B, h, N, d). The prior's attention on a CPU
    (see :class:`_BlockedMultiQueryAttention`)."""
    return _BlockedMultiQueryAttention.apply(q, k, v, bias, scale)


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


def feed_forward(dim: int, mult: int, dropout: float) -> nn.Sequential:
    inner = mult * dim
    return nn.Sequential(LayerNorm(dim), nn.Linear(dim, 2 * inner, bias=False), SwiGLU(), nn.Dropout(dropout),
                         nn.Linear(inner, dim, bias=False))


class PriorLayer(nn.ModuleList):
    """``[attention, feed-forward]``, each a pre-norm residual (DALLE2's ``layers.<i>.{0,1}`` keys)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attention, ff = self
        x = x + attention(x, bias)
        return x + ff(x)


class PriorTransformer(nn.Module):
    """Pre-norm, non-causal transformer of attention + feed-forward residual layers.

    With ``activation_checkpointing`` each layer's activations are recomputed in the backward
    (only the layer inputs, (B, 2T+1, D) each, are kept).
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int, dropout: float,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.rel_pos_bias = RelativePositionBias(heads)
        self.layers = nn.ModuleList(
            PriorLayer([Attention(dim, heads, dim_head, dropout), feed_forward(dim, ff_mult, dropout)])
            for _ in range(depth))
        self.norm_out = LayerNorm(dim, stable=True)
        self.project_out = nn.Linear(dim, dim, bias=False)
        self.checkpointing = activation_checkpointing
        if activation_checkpointing:
            for layer in self.layers:
                mark_checkpoint_unit(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        bias = self.rel_pos_bias(n, n + 1, x.device)  # +1: the null key sits before the sequence
        for layer in self.layers:
            x = run_checkpointed(layer, x, bias, enabled=self.checkpointing)  # (B, 2T+1, D)
        return self.project_out(self.norm_out(x))


class PriorNetwork(nn.Module):
    """(noisy image tokens, timesteps, brain tokens) -> predicted clean image tokens."""

    _no_weight_decay = ("learned_queries", "null_brain_embeds", "null_image_embed")

    def __init__(self, n_tokens: int, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4,
                 dropout: float = 0.0, activation_checkpointing: bool = False):
        super().__init__()
        self.n_tokens = n_tokens
        self.time_mlp = nn.Sequential(  # DALLE2 MLP(dim, dim): dim -> 2dim -> 2dim -> dim, SiLU
            SinusoidalEmbedding(dim), nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim), nn.SiLU(),
            nn.Linear(2 * dim, dim))
        self.learned_queries = nn.Parameter(torch.randn(n_tokens, dim) * dim ** -0.5)  # "pos_emb" mode
        self.null_brain_embeds = nn.Parameter(torch.randn(n_tokens, dim))
        self.null_image_embed = nn.Parameter(torch.randn(n_tokens, dim))
        self.transformer = PriorTransformer(dim, depth, heads, dim_head, ff_mult, dropout, activation_checkpointing)

    @staticmethod
    def _keep(batch: int, drop_prob: float, generator, device) -> torch.Tensor:
        """(B, 1, 1) bool: True keeps the input, False swaps in the null embedding.

        ``u < 1 - p`` for a uniform draw u, with no draw at p = 0 or 1 (DALLE2's
        ``prob_mask_like(shape, 1 - p)``), so a seeded generator drops the samples DALLE2 drops.
        """
        if drop_prob <= 0:
            return torch.ones(batch, 1, 1, dtype=torch.bool, device=device)
        if drop_prob >= 1:
            return torch.zeros(batch, 1, 1, dtype=torch.bool, device=device)
        return (_rand((batch,), generator, device) < 1 - drop_prob).view(batch, 1, 1)

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


def dalle2_ddim_timesteps(num_train_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """(t, t_next) pairs of DALLE2's DDIM loop: ``int(linspace(-1, T, steps + 1)[:-1])`` reversed.

    For T = 100 and 20 steps: (94, 89), (89, 84), ..., (4, -1), i.e. 19 network calls, the last
    one returning its x0 prediction as the sample. No diffusers ``timestep_spacing`` gives this
    sequence (``trailing`` starts at 99 and makes 20 calls).
    """
    times = torch.linspace(-1.0, num_train_timesteps, steps=steps + 1)[:-1].int().tolist()
    times = times[::-1]
    return list(zip(times[:-1], times[1:]))


def schedule_tables(timesteps: int) -> dict[str, torch.Tensor]:
    """DALLE2's ``NoiseScheduler`` tables for the cosine schedule: float64 arithmetic, fp32 CPU tensors.

    The improved-DDPM cosine schedule (s = 0.008, betas capped at 0.999), diffusers'
    ``squaredcos_cap_v2`` (``tests/test_prior.py`` checks the betas against diffusers'). The
    tables are built here because diffusers keeps them in fp32 and its ``DDPMScheduler.step``
    forms ``1 - abar_t / abar_{t-1}`` and ``1 - abar_{t-1}`` in fp32: at t = 1 that cancels to a
    1e-3 relative error of the posterior, and at t = 99 (beta = 0.999) rounding beta before
    ``1 - beta`` costs 6e-5 of alpha. DALLE2 computes every table in float64 and casts last;
    these equal its buffers bit for bit (``tests/test_prior_dalle2.py``).
    """
    x = torch.arange(timesteps + 1, dtype=torch.float64, device="cpu") / timesteps
    f = torch.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
    f = f / f[0]
    betas = (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    abar = torch.cumprod(1 - betas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    posterior_variance = betas * (1 - abar_prev) / (1 - abar)
    tables = {
        "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - abar).log(), "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        "p2_loss_weight": torch.ones_like(betas),  # DALLE2's p2 reweighting, off (gamma 0) in MindEye
    }
    return {name: table.float() for name, table in tables.items()}


class DiffusionPrior(nn.Module):
    """Owns the cosine noise schedule, the x0-prediction MSE loss and DDPM/DDIM sampling."""

    def __init__(self, net: PriorNetwork, *, timesteps: int = 100, cond_drop_prob: float = 0.2,
                 target_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.cond_drop_prob = cond_drop_prob
        self.target_scale = target_scale
        self.timesteps = timesteps
        # CPU fp32 tables, not buffers: derived from `timesteps`, not state; moved on use (meta-safe).
        self.tables = schedule_tables(timesteps)

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        return self.tables[name].to(device)

    def loss(self, brain_tokens: torch.Tensor, target_tokens: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE between predicted and true (scaled) clean tokens at a uniform random timestep.

        Returns (loss, prediction) with the prediction divided back by the target scale.
        Both inputs are dropped to their null embeddings with ``cond_drop_prob`` each. The draws
        (timesteps, noise, brain mask, image mask) come in DALLE2's order.
        """
        x0 = target_tokens * self.target_scale
        b, device = x0.shape[0], x0.device
        t = _rand((b,), generator, device, "randint", high=self.timesteps)
        noise = _rand(x0.shape, generator, device, "randn").to(x0.dtype)
        signal = self._table("sqrt_alphas_cumprod", device)[t].view(b, 1, 1)
        noise_scale = self._table("sqrt_one_minus_alphas_cumprod", device)[t].view(b, 1, 1)
        noisy = (signal * x0 + noise_scale * noise).to(x0.dtype)  # q(x_t | x_0)
        prediction = self.net(noisy, t, brain_tokens, self.cond_drop_prob, self.cond_drop_prob, generator)
        return F.mse_loss(prediction, x0), prediction / self.target_scale

    def forward(self, brain_tokens: torch.Tensor, target_tokens: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`loss`; a forward call lets ZeRO-3 hooks gather the prior's parameters."""
        return self.loss(brain_tokens, target_tokens, generator)

    def _guided(self, noisy, t: int, brain, cond_scale: float) -> torch.Tensor:
        timesteps = torch.full((noisy.shape[0],), t, device=noisy.device, dtype=torch.long)
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

        ``ddpm``: DALLE2's ``p_sample_loop_ddpm`` over all training timesteps (MindEye1: 100).
        ``ddim``: DALLE2's ``p_sample_loop_ddim``, default 20 steps with eta 1 (MindEye2's
        inference: ``p_sample_loop(timesteps=20)``); see :meth:`_sample_ddim`.
        Deterministic for a given ``generator`` state; with a CPU generator seeded like torch's
        global RNG the noise equals DALLE2's draw for draw.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler={sampler!r} is invalid: expected 'ddpm' or 'ddim'")
        if sampler == "ddpm" and steps not in (None, self.timesteps):
            raise ValueError(f"sampler='ddpm' runs all {self.timesteps} training timesteps (steps={steps} given); "
                             "use sampler='ddim' for fewer, as DALLE2's p_sample_loop does")
        x = _rand(brain_tokens.shape, generator, brain_tokens.device, "randn").to(brain_tokens.dtype)
        if sampler == "ddim":
            x = self._sample_ddim(x, brain_tokens, steps or 20, generator, cond_scale, eta)
        else:
            x = self._sample_ddpm(x, brain_tokens, generator, cond_scale)
        return x / self.target_scale

    def _sample_ddpm(self, x: torch.Tensor, brain: torch.Tensor, generator, cond_scale: float) -> torch.Tensor:
        """DALLE2's ancestral loop (``p_sample``), on the float64-built tables (see :func:`schedule_tables`)::

            x_{t-1} = c1[t] x0 + c2[t] x_t + [t > 0] exp(log_var[t] / 2) * noise

        One noise draw per step, also at t = 0 where it is unused, as DALLE2 (and MindEye1's
        generator-seeded copy of it) draws.
        """
        c1, c2 = self._table("posterior_mean_coef1", x.device), self._table("posterior_mean_coef2", x.device)
        std = (0.5 * self._table("posterior_log_variance_clipped", x.device)).exp()
        for t in reversed(range(self.timesteps)):
            x0 = self._guided(x, t, brain, cond_scale)
            noise = _rand(x.shape, generator, x.device, "randn").to(x.dtype)
            x = c1[t] * x0 + c2[t] * x + (std[t] * noise if t > 0 else 0.0)
        return x

    def _sample_ddim(self, x: torch.Tensor, brain: torch.Tensor, steps: int, generator, cond_scale: float,
                     eta: float) -> torch.Tensor:
        """DALLE2 1.14.2's DDIM loop; diffusers' DDIMScheduler cannot express it.

        Besides its timestep sequence (:func:`dalle2_ddim_timesteps`), DALLE2 takes the DDIM
        alphas from ``alphas_cumprod_prev`` (one step earlier than the timestep it conditions the
        network on), while the noise estimate uses ``alphas_cumprod`` at t:

            eps    = (x_t / sqrt(abar_t) - x0) / sqrt(1 / abar_t - 1)
            a, a'  = abar_prev[t], abar_prev[t_next]
            c1     = eta * sqrt((1 - a / a') * (1 - a') / (1 - a));  c2 = sqrt(1 - a' - c1^2)
            x_next = sqrt(a') x0 + c1 * noise + c2 * eps   (noise only when t_next > 0;
                                                            t_next = -1 returns x0)
        """
        abar_prev = self._table("alphas_cumprod_prev", x.device)
        recip, recip_m1 = (self._table(name, x.device) for name in
                           ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))
        for t, t_next in dalle2_ddim_timesteps(self.timesteps, steps):
            x0 = self._guided(x, t, brain, cond_scale)
            eps = (recip[t] * x - x0) / recip_m1[t]
            if t_next < 0:
                x = x0
                continue
            a, a_next = abar_prev[t], abar_prev[t_next]
            c1 = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
            c2 = ((1 - a_next) - c1 ** 2).sqrt()
            noise = _rand(x.shape, generator, x.device, "randn").to(x.dtype) if t_next > 0 else 0.0
            x = x0 * a_next.sqrt() + c1 * noise + c2 * eps
        return x
