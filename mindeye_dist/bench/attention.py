"""The prior's attention on a CPU: the shipped layer against ``scaled_dot_product_attention``.

The relative-position bias enters attention as a float mask that needs a gradient. torch's fused
CPU kernel returns no mask gradient, so ``F.scaled_dot_product_attention`` falls back to its math
path there: K/V expanded to every head, h separate (N x d) x (d x N+1) products per sample, and
two (B, heads, N, N + 1) tensors kept for the backward.

* **shipped**: ``models.prior.Attention`` on a CPU calls
  :func:`mindeye_dist.models.prior.multi_query_attention`, blockwise with a hand-written backward
  that keeps no probabilities.
* **SDPA math path**: the same layer through ``scaled_dot_product_attention`` (what the layer
  runs on GPUs and with attention dropout, and ran everywhere before).

``python -m mindeye_dist.bench.attention`` compares them at MindEye1's shape (outputs and
gradients, forward and backward seconds, peak memory); the prior's numerics test against DALLE2
(``tests/test_prior_dalle2.py``) guards the shipped one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def sdpa_everywhere():
    """Within: the prior's attention takes ``scaled_dot_product_attention`` on a CPU too."""
    from mindeye_dist.models import prior

    chooser = prior._use_cpu_attention
    prior._use_cpu_attention = lambda x, dropout: False
    try:
        yield
    finally:
        prior._use_cpu_attention = chooser


def _sdpa_forward(layer, x, bias):
    with sdpa_everywhere():
        return layer(x, bias)


VARIANTS = {"shipped (blockwise multi-query)": lambda layer, x, bias: layer(x, bias),
            "SDPA math path": _sdpa_forward}


def _measure(forward, repeats: int) -> dict[str, Any]:
    from mindeye_dist.bench.common import proc_kib_bytes
    from mindeye_dist.bench.memory import _reset_hwm

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
    """One prior attention layer, each of :data:`VARIANTS` with the same weights: max output and
    gradient differences from the shipped layer, median forward and backward seconds (interleaved
    rounds) and the peak RSS above the inputs."""
    from mindeye_dist.models.prior import Attention, RelativePositionBias

    torch.manual_seed(seed)
    layer = Attention(dim, heads, dim_head).train()
    rel = RelativePositionBias(heads)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    cotangent = torch.randn(batch, tokens, dim)  # not uniform: LayerNorm's outputs sum to ~0, so ones give no gradient
    grads = {}
    for name, forward in VARIANTS.items():
        layer.zero_grad(set_to_none=True)
        rel.zero_grad(set_to_none=True)
        x.grad = None
        out = forward(layer, x, rel(tokens, tokens + 1, x.device))
        out.backward(cotangent)
        grads[name] = {"out": out.detach(), "x": x.grad.clone(), "rel": rel.embedding.weight.grad.clone(),
                       **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    shipped = grads[next(iter(VARIANTS))]
    diff = {name: {k: float((g[k] - shipped[k]).abs().max() / shipped[k].abs().max().clamp_min(1e-30)) for k in shipped}
            for name, g in grads.items() if g is not shipped}
    x.requires_grad_(False)
    bias = rel(tokens, tokens + 1, x.device).detach()
    runs: dict[str, list] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, forward in VARIANTS.items():
            runs[name].append(_measure(lambda: forward(layer, x, bias), repeats=1))
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
