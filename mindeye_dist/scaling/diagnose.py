"""What a fit can and cannot support, as plain sentences.

Each warning starts with a short tag (``few sizes:``, ``narrow range:``, ``CI spans zero:``,
``wide CI:``, ``saturation:``, ``at bound:``, ``not converged:``, ``bootstrap:``,
``extrapolation:``, ``exact fit:``, ``error floor:``) so tools and tests can pick them out. The
thresholds follow the usual advice for scaling-law fits: at least 5 sizes over at least 1.5
decades, a CI narrower than the estimate, and an extrapolation to the largest size that holds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mindeye_dist.scaling.fit import EXPONENT_BOUNDS

if TYPE_CHECKING:
    from mindeye_dist.scaling.build import FitSpec

MIN_SIZES = 5
MIN_DECADES = 1.5
# An exponent below this is "no scaling" for any practical purpose.
FLAT_EXPONENT = 0.02
# At the largest size, a power term under this share of the fitted value means the curve is at E.
FLOOR_SHARE = 0.02
EXTRAPOLATION_TOLERANCE = 0.10
# Error rates of exactly 0 (top-1 = 1) are floored here so their logarithm exists.
ERROR_FLOOR = 1e-4


def _per_axis(value, k: int) -> list:
    return list(value) if isinstance(value, list) else [value] * k


def _coverage(spec: FitSpec, entry: dict) -> list[str]:
    out = []
    k = len(spec.axes)
    for axis, n, dec in zip(spec.axes, _per_axis(entry["n_sizes"], k), _per_axis(entry["decades"], k)):
        sym = "N" if axis == "params" else "D"
        if n < MIN_SIZES:
            out.append(f"few sizes: only {n} distinct {sym} values (a credible exponent needs at least "
                       f"{MIN_SIZES} sizes over at least {MIN_DECADES} decades)")
        if dec < MIN_DECADES:
            out.append(f"narrow range: {sym} spans {dec:.2f} decades (< {MIN_DECADES}); over so short a "
                       "range a power law is hard to tell from other curves")
    if k == 1 and entry["n_sizes"] == 3:
        out.append("exact fit: 3 sizes for a 3-parameter law: the curve can pass through every size, so "
                   "its residuals, CIs and extrapolation say little")
    return out


def _intervals(spec: FitSpec, entry: dict, y: np.ndarray) -> list[str]:
    out = []
    for name in ["E"] + [n for pair in zip(spec.coefficients, spec.exponents) for n in pair]:
        value, (lo, hi) = entry[name], entry[f"{name}_ci95"]
        if lo is None:
            out.append(f"bootstrap: no 95% CI for {name} (no resample gave a converged fit)")
            continue
        if name in spec.exponents and lo <= EXPONENT_BOUNDS[0] + 1e-6:
            out.append(f"CI spans zero: {name}'s 95% CI [{lo:.4g}, {hi:.4g}] reaches 0: the data do not "
                       "rule out no scaling on this axis")
        elif name == "E" and lo < 1e-4 * y.min():
            out.append(f"CI spans zero: E's 95% CI [{lo:.4g}, {hi:.4g}] reaches 0: the floor is not "
                       "identified (a pure power law fits as well)")
        if hi - lo > abs(value):
            out.append(f"wide CI: {name}'s 95% CI [{lo:.4g}, {hi:.4g}] is wider than the estimate "
                       f"{value:.4g}: {name} is not pinned down by these runs")
    return out


def _saturation(spec: FitSpec, entry: dict, x: np.ndarray, y: np.ndarray) -> list[str]:
    out = []
    for j, (axis, exp_name, coef_name) in enumerate(zip(spec.axes, spec.exponents, spec.coefficients)):
        sym = "N" if axis == "params" else "D"
        if entry[exp_name] < FLAT_EXPONENT:
            out.append(f"saturation: {exp_name} = {entry[exp_name]:.4g} ≈ 0: the fitted value does not "
                       f"fall with {sym} over this range (saturated, or not learning)")
        sizes = np.unique(x[:, j])
        if len(spec.axes) == 1 and len(sizes) >= 2:
            top, second = y[x[:, j] == sizes[-1]].mean(), y[x[:, j] == sizes[-2]].mean()
            if top >= second:
                out.append(f"saturation: the mean value at the largest {sym} ({top:.4g}) is not below the "
                           f"one at the next size ({second:.4g}): flat or rising at the top")
        term = entry[coef_name] * sizes[-1] ** -entry[exp_name]
        share = term / (entry["E"] + term) if len(spec.axes) == 1 else None
        if share is not None and share < FLOOR_SHARE:
            out.append(f"saturation: at the largest {sym} the power-law term is {100 * share:.2g}% of the "
                       "fitted value: the curve has reached its floor E")
    return out


def _bounds(spec: FitSpec, entry: dict, x: np.ndarray, y: np.ndarray) -> list[str]:
    out = []
    for name in entry["at_bounds"]:
        if name in spec.exponents:
            which = "lower bound 0" if entry[name] < 1 else f"upper bound {EXPONENT_BOUNDS[1]:g}"
            out.append(f"at bound: {name} ended on its {which}: the fit is degenerate there")
        elif name == "E" and entry["E"] < 0.5 * y.min():
            out.append("at bound: E ended on its lower bound (≈ 0): no floor detected; the exponent "
                       "then describes a pure power law")
        else:
            out.append(f"at bound: {name} ended on a bound of the search range: the fit is degenerate")
    return out


def _reliability(spec: FitSpec, entry: dict) -> list[str]:
    out = []
    if not entry["converged"]:
        out.append(f"not converged: none of the {entry['n_inits']} initialisations converged; the numbers "
                   "shown are the lowest objective found and are unreliable")
    used, requested = entry["bootstrap_used"], entry["bootstrap"]
    if requested and used < 0.9 * requested:
        out.append(f"bootstrap: only {used} of {requested} resamples gave a fit ({entry['bootstrap_degenerate']} "
                   f"had too few distinct sizes, {entry['bootstrap_failed']} did not converge); the CIs rest "
                   "on fewer refits")
    n = entry["n_runs"]
    if n <= 6:
        distinct = math.comb(2 * n - 1, n)
        out.append(f"bootstrap: {n} runs give only {distinct} distinct resamples; the CIs are coarse")
    extrapolations = entry["extrapolation"]
    if len(spec.axes) == 1:
        extrapolations = {"N" if spec.axes[0] == "params" else "D": extrapolations}
    for sym, ex in extrapolations.items():
        if ex is None:
            out.append(f"extrapolation: too few sizes to leave out the largest {sym} and refit")
        elif abs(ex["rel_error"]) > EXTRAPOLATION_TOLERANCE:
            out.append(f"extrapolation: fitting without the largest {sym} ({ex['held_out']:.4g}) predicts "
                       f"{ex['predicted']:.4g} there against {ex['observed']:.4g} observed "
                       f"({100 * ex['rel_error']:+.1f}%): the law does not carry beyond its data")
    return out


def fit_warnings(spec: FitSpec, entry: dict, x: np.ndarray, y: np.ndarray) -> list[str]:
    """Every caveat of one fit (``entry`` holds its estimates, CIs, bounds and extrapolation)."""
    out = _coverage(spec, entry) + _intervals(spec, entry, y) + _saturation(spec, entry, x, y)
    out += _bounds(spec, entry, x, y) + _reliability(spec, entry)
    floored = int(np.sum(y <= ERROR_FLOOR)) if spec.metric != "val_loss" else 0
    if floored:
        out.append(f"error floor: {floored} run(s) had top-1 = 1 (error 0), floored at {ERROR_FLOOR:g} "
                   "for the log fit")
    return out


def exponent_supported(spec: FitSpec, entry: dict) -> tuple[bool, list[str]]:
    """Whether the data support the fitted exponent(s) as a scaling claim, and if not, why.

    Supported means: converged; every axis has at least MIN_SIZES sizes over MIN_DECADES decades;
    each exponent is clearly above 0 (at least FLAT_EXPONENT, off its bounds, CI not reaching 0) and
    its 95% CI is narrower than the estimate; the fit without the largest size predicts it within
    EXTRAPOLATION_TOLERANCE; no saturation warning (``entry["warnings"]`` is read). E and A being
    poorly determined does not count against it.
    """
    reasons = []
    if not entry["converged"]:
        reasons.append("the fit did not converge")
    k = len(spec.axes)
    for axis, n, dec in zip(spec.axes, _per_axis(entry["n_sizes"], k), _per_axis(entry["decades"], k)):
        sym = "N" if axis == "params" else "D"
        if n < MIN_SIZES or dec < MIN_DECADES:
            reasons.append(f"{n} sizes of {sym} over {dec:.2f} decades (needs {MIN_SIZES} over {MIN_DECADES})")
    for name in spec.exponents:
        lo, hi = entry[f"{name}_ci95"]
        if entry[name] < FLAT_EXPONENT or name in entry["at_bounds"]:
            reasons.append(f"{name} = {entry[name]:.3g} is at 0 or on a bound")
        elif lo is None:
            reasons.append(f"no 95% CI for {name} (no bootstrap refit)")
        elif lo <= EXPONENT_BOUNDS[0] + 1e-6:
            reasons.append(f"{name}'s 95% CI reaches 0")
        elif hi - lo > entry[name]:
            reasons.append(f"{name}'s 95% CI is wider than {name}")
    extrapolations = entry["extrapolation"] if k == 2 else {"size": entry["extrapolation"]}
    for where, ex in extrapolations.items():
        if ex is None:
            reasons.append(f"no extrapolation check at the largest {where} (too few sizes)")
        elif abs(ex["rel_error"]) > EXTRAPOLATION_TOLERANCE:
            reasons.append(f"extrapolating to the largest {where} misses by {100 * ex['rel_error']:+.1f}%")
    reasons += [w for w in entry["warnings"] if w.startswith("saturation:")]
    return not reasons, reasons
