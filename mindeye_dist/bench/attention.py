"""What-if for the prior's attention: a multi-query attention that keeps no probability matrix.

The shipped ``models.prior.Attention`` calls ``F.scaled_dot_product_attention`` with the
relative-position bias as a float mask that requires grad; torch's CPU flash kernel returns no
mask gradient, so SDPA falls back to its math path, which keeps the (B, heads, N, N + 1)
probabilities (and a boolean mask of the same shape) for backward: at MindEye1's 515 tokens and
micro-batch 32 that is 0.5 GB per layer, 3 GB for six, which ``estimate`` does not count (it sees
leaf-module outputs) and which dominates the step peak's excess over the estimate.

:class:`MultiQueryAttention` computes the same function for one K/V head shared by all heads (the
prior's multi-query layout), a block of queries of one sample at a time, keeping only the output
and each row's log-sum-exp; backward recomputes each block's probabilities (FlashAttention's
recurrence in torch ops, blocks small enough for the CPU's caches) and returns the bias gradient,
which the relative-position embedding needs. It costs one extra QK^T product (about 1% of a
MindEye1 step's FLOPs).

This is measurement code: ``python -m mindeye_dist.bench.attention`` compares it with the shipped
layer at MindEye1's shape (outputs and gradients, time, peak memory). Shipping it means replacing
``Attention.forward``'s SDPA call in ``mindeye_dist/models/prior.py`` with :func:`lean_attention_forward`'s
body (the prior's numerics test against DALLE2, ``tests/test_prior_dalle2.py``, keeps guarding it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange


class MultiQueryAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v; q (B, h, N, d), k and v (B, S, d) shared by the heads,
    bias (h, N, S). Rows are processed ``block`` queries of one sample at a time."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, block: int):
        b, h, n, d = q.shape
        out = torch.empty_like(q)
        lse = q.new_empty(b, h, n)
        for i in range(b):
            k_t, v_i = k[i].T, v[i]  # (d, S), (S, d)
            for j in range(0, n, block):
                s = torch.matmul(q[i, :, j:j + block], k_t).mul_(scale).add_(bias[:, j:j + block])  # (h, c, S)
                m = s.amax(-1, keepdim=True)
                p = s.sub_(m).exp_()
                total = p.sum(-1, keepdim=True)
                out[i, :, j:j + block] = torch.matmul(p, v_i).div_(total)
                lse[i, :, j:j + block] = (m + total.log()).squeeze(-1)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale, ctx.block = scale, block
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, bias, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        b, h, n, d = q.shape
        d_out = d_out.contiguous()
        delta = (d_out * out).sum(-1)  # (B, h, N): rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dbias = torch.zeros_like(bias) if ctx.needs_input_grad[3] else None
        for i in range(b):
            k_i, v_i = k[i], v[i]
            for j in range(0, n, block):
                q_ij, do_ij = q[i, :, j:j + block], d_out[i, :, j:j + block]  # (h, c, d)
                s = torch.matmul(q_ij, k_i.T).mul_(scale).add_(bias[:, j:j + block])
                p = s.sub_(lse[i, :, j:j + block, None]).exp_()  # (h, c, S)
                dv[i] += torch.matmul(rearrange(p, "h c s -> s (h c)"), rearrange(do_ij, "h c d -> (h c) d"))
                ds = torch.matmul(do_ij, v_i.T).sub_(delta[i, :, j:j + block, None]).mul_(p)  # dS = P (dP - delta)
                if dbias is not None:
                    dbias[:, j:j + block] += ds
                dq[i, :, j:j + block] = torch.matmul(ds, k_i).mul_(scale)
                dk[i] += torch.matmul(rearrange(ds, "h c s -> s (h c)"), rearrange(q_ij, "h c d -> (h c) d")).mul_(scale)
        return dq, dk, dv, dbias, None, None


def multi_query_attention(q, k, v, bias, scale: float, block: int = 64):
    return MultiQueryAttention.apply(q, k, v, bias, scale, block)


def lean_attention_forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``models.prior.Attention.forward`` with :func:`multi_query_attention` in place of SDPA
    (attention dropout must be 0, as in every MindEye preset)."""
    from mindeye_dist.models.prior import COSINE_SIM_SCALE, rotate

    if self.training and self.dropout > 0:
        raise NotImplementedError("lean attention has no attention dropout (every MindEye preset uses 0)")
    b = x.shape[0]
    x = self.norm(x)
    q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
    k, v = self.to_kv(x).chunk(2, dim=-1)  # (B, N, d) each: one K/V head for all
    q, k = rotate(q, self.rot_dim), rotate(k, self.rot_dim)
    null_k, null_v = (t.to(x.dtype).expand(b, 1, -1) for t in self.null_kv.unbind(0))
    k, v = torch.cat([null_k, k], dim=1), torch.cat([null_v, v], dim=1)  # (B, N+1, d)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    out = multi_query_attention(q, k.contiguous(), v.contiguous(), bias.to(q.dtype), COSINE_SIM_SCALE)
    return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _measure(layer, x, bias, lean: bool, repeats: int) -> dict[str, Any]:
    from mindeye_dist.bench.common import proc_kib_bytes
    from mindeye_dist.bench.memory import _reset_hwm

    forward = (lambda: lean_attention_forward(layer, x, bias)) if lean else (lambda: layer(x, bias))
    times = []
    for _ in range(repeats):
        _reset_hwm()
        base = proc_kib_bytes("/proc/self/status", "VmRSS") or 0
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        times.append((t1 - t0, time.perf_counter() - t1))
        peak = (proc_kib_bytes("/proc/self/status", "VmHWM") or 0) - base
        del out
    fwd = sorted(t[0] for t in times)[len(times) // 2]
    bwd = sorted(t[1] for t in times)[len(times) // 2]
    return {"forward_s": fwd, "backward_s": bwd, "total_s": fwd + bwd, "peak_rss_delta_bytes": peak}


def compare(batch: int = 32, tokens: int = 515, dim: int = 768, heads: int = 12, dim_head: int = 64, rounds: int = 3,
            seed: int = 0) -> dict[str, Any]:
    """One prior attention layer, shipped vs lean, same weights: max output / gradient differences,
    median forward and backward seconds (interleaved rounds) and the peak RSS above the inputs."""
    from mindeye_dist.models.prior import Attention, RelativePositionBias

    torch.manual_seed(seed)
    layer = Attention(dim, heads, dim_head).train()
    rel = RelativePositionBias(heads)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    cotangent = torch.randn(batch, tokens, dim)  # not uniform: LayerNorm's outputs sum to ~0, so ones give no gradient
    grads = {}
    for lean in (False, True):
        layer.zero_grad(set_to_none=True)
        rel.zero_grad(set_to_none=True)
        x.grad = None
        bias = rel(tokens, tokens + 1, x.device)
        out = lean_attention_forward(layer, x, bias) if lean else layer(x, bias)
        out.backward(cotangent)
        grads[lean] = {"out": out.detach(), "x": x.grad.clone(), "rel": rel.embedding.weight.grad.clone(),
                       **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    diff = {k: float((grads[True][k] - grads[False][k]).abs().max() / grads[False][k].abs().max().clamp_min(1e-30))
            for k in grads[False]}
    x.requires_grad_(False)
    bias = rel(tokens, tokens + 1, x.device).detach()
    runs: dict[str, list] = {"shipped (SDPA math path)": [], "lean multi-query": []}
    for _ in range(rounds):
        for name, lean in (("shipped (SDPA math path)", False), ("lean multi-query", True)):
            runs[name].append(_measure(layer, x, bias, lean, repeats=1))
    med = {name: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]} for name, rs in runs.items()}
    return {"shape": {"batch": batch, "tokens": tokens, "dim": dim, "heads": heads, "dim_head": dim_head},
            "max_relative_difference": diff, "median": med, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=515, help="sequence length (MindEye1: 2 x 257 + 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = compare(a.batch, a.tokens, rounds=a.rounds)
    print(json.dumps({k: r[k] for k in ("shape", "max_relative_difference", "median")}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
