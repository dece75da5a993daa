"""The compute-optimal frontier: the empirical lower envelope, and the fitted N_opt(C) when the
joint law ``L = E + A N^-alpha + B D^-beta`` exists.

The fitted frontier needs training compute as a function of N and D. With matched schedules
(a fixed number of epochs over D stimuli) training FLOPs are close to ``kappa * N * D``; kappa is
measured from the runs (FLOPs / (N D)) rather than assumed (6 x epochs for a dense model), and the
fitted frontier is only drawn when kappa is nearly the same for every run. Minimising L at fixed
C = kappa N D gives (Hoffmann et al. 2022, eq. 4)::

    N_opt(C) = G (C / kappa)^(beta / (alpha + beta)),   G = (alpha A / (beta B))^(1 / (alpha + beta))
    D_opt(C) = C / (kappa N_opt(C))
"""

from __future__ import annotations

import numpy as np

from mindeye_dist.scaling.diagnose import FLAT_EXPONENT
from mindeye_dist.scaling.results import Trial

# kappa = FLOPs / (N D) may vary by this factor across runs before C = kappa N D is rejected.
KAPPA_SPREAD = 1.5
# The fitted frontier is drawn up to this multiple of the largest compute spent.
EXTRAPOLATE_COMPUTE = 10.0
CURVE_POINTS = 60


def lower_envelope(trials: list[Trial]) -> list[Trial]:
    """Runs no cheaper run beats: sorted by FLOPs, each strictly lower in loss than all before it."""
    best, out = np.inf, []
    for t in sorted((t for t in trials if t.flops > 0), key=lambda t: (t.flops, t.val_loss)):
        if t.val_loss < best:
            out.append(t)
            best = t.val_loss
    return out


def fitted_frontier(trials: list[Trial], joint: dict) -> tuple[dict | None, str | None]:
    """N_opt(C), D_opt(C) and the loss along them from the joint fit; (None, reason) when not possible."""
    alpha, beta = joint["alpha"], joint["beta"]
    if min(alpha, beta) < FLAT_EXPONENT:
        return None, (f"the joint fit has an exponent ≈ 0 (alpha = {alpha:.3g}, beta = {beta:.3g}): "
                      "no finite compute-optimal size")
    kappa_runs = np.array([t.flops / (t.params * t.data_size) for t in trials if t.flops > 0])
    if len(kappa_runs) == 0:
        return None, "no run records training FLOPs"
    spread = kappa_runs.max() / kappa_runs.min()
    if spread > KAPPA_SPREAD:
        return None, (f"training FLOPs are not proportional to N·D in this sweep (FLOPs/(N·D) varies "
                      f"{spread:.2f}x across runs), so the joint fit does not give N_opt(C); the "
                      "frontier shown is the runs' envelope only")
    kappa = float(np.median(kappa_runs))
    A, B, E = joint["A"], joint["B"], joint["E"]
    flops = np.array([t.flops for t in trials if t.flops > 0])
    compute = np.geomspace(flops.min(), flops.max() * EXTRAPOLATE_COMPUTE, CURVE_POINTS)
    g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    n_opt = g * (compute / kappa) ** (beta / (alpha + beta))
    d_opt = compute / (kappa * n_opt)
    loss = E + A * n_opt ** -alpha + B * d_opt ** -beta
    # The same optimum restricted to the sweep's box of N and D: along an iso-FLOP line the loss is
    # unimodal in log N, so the constrained optimum is N_opt clipped to the N that keep both N and
    # D = C / (kappa N) inside the box. Outside the box the unconstrained curve is an extrapolation
    # (and with a fixed dataset such as NSD, D cannot grow past what exists at all).
    n_lo = np.maximum(min(t.params for t in trials), compute / (kappa * max(t.data_size for t in trials)))
    n_hi = np.minimum(max(t.params for t in trials), compute / (kappa * min(t.data_size for t in trials)))
    feasible = n_lo <= n_hi
    n_box = np.clip(n_opt, n_lo, n_hi)
    d_box = compute / (kappa * n_box)
    loss_box = E + A * n_box ** -alpha + B * d_box ** -beta
    inside = feasible & np.isclose(n_box, n_opt, rtol=1e-9)

    def masked(v):
        return [float(x) if ok else None for x, ok in zip(v, feasible)]

    return {"kappa": kappa, "kappa_range": [float(kappa_runs.min()), float(kappa_runs.max())],
            "n_opt_exponent": beta / (alpha + beta), "d_opt_exponent": alpha / (alpha + beta),
            "max_observed_flops": float(flops.max()),
            "curve": {"flops": compute.tolist(), "n_opt": n_opt.tolist(), "d_opt": d_opt.tolist(),
                      "loss": loss.tolist(), "within_sweep": inside.tolist(),
                      "n_opt_in_sweep": masked(n_box), "d_opt_in_sweep": masked(d_box),
                      "loss_in_sweep": masked(loss_box)},
            "within_sweep_fraction": float(inside.mean()),
            "assumption": "training FLOPs C = kappa·N·D with kappa measured from the runs; N_opt(C) is "
                          "the unconstrained optimum of the joint law, *_in_sweep the optimum within the "
                          "sweep's N and D range"}, None


def compute_frontier(trials: list[Trial], joint: dict | None) -> dict:
    """``compute_frontier`` of report.json: envelope runs and, with a joint fit, the fitted N_opt(C)."""
    envelope = lower_envelope(trials)
    out = {"trial_ids": [t.trial_id for t in envelope],
           "points": [{"trial_id": t.trial_id, "flops": t.flops, "val_loss": t.val_loss, "params": t.params,
                       "data_size": t.data_size} for t in envelope],
           "fitted": None, "fitted_reason": None}
    if joint is None or joint.get("status") != "ok":
        out["fitted_reason"] = "no joint fit (the sweep must vary both parameters and data)"
    else:
        out["fitted"], out["fitted_reason"] = fitted_frontier(trials, joint)
    return out
