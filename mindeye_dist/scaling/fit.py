"""Power-law fits the way the careful Chinchilla replications do them (approach 3).

Model, for K scaling axes (K = 1: loss vs parameters or vs data; K = 2: the joint form)::

    y = E + sum_k A_k * x_k ** -alpha_k
    log y = LSE(e, a_1 - alpha_1 * log x_1, ..., a_K - alpha_K * log x_K),   E = e^e, A_k = e^a_k

Objective: Huber loss (delta = 1e-3) between predicted and observed log y, summed over runs and
divided by delta (Hoffmann et al. 2022, approach 3). Besiroglu et al. 2024 found the original fit
stopped early because of the objective's scale: with delta = 1e-3 the objective and its gradient
are ~1e-3 x smaller than the optimiser's default tolerances assume. Dividing by delta makes each
run's term ~|residual| (linear regime) or residual^2 / (2 delta) (quadratic regime), and the
tolerances are set near machine precision on top of that. Everything is float64.

Optimiser: L-BFGS-B with the analytic gradient from a grid of initialisations, keeping the best
converged fit. The grid is placed relative to the data (E as fractions of the smallest y, A so the
curve passes through the median run) rather than Chinchilla's absolute a in 0..25, because our y
are losses or error rates of any scale; the exponents' grid covers 0.05..2 like theirs covers 0..2
(20 starts in 1-D, 36 in the joint form).
Internally log x is centred on the geometric mean of the sizes (a' = a - alpha * c), which makes
(a', alpha) nearly uncorrelated and the optimisation well conditioned; A is converted back.

Uncertainty: bootstrap over runs (resample runs with replacement, refit from the full-data optima,
95% CI from the 2.5/97.5 percentiles). Runs at the same size (seeds) stay separate points.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import ThreadpoolController

HUBER_DELTA = 1e-3
EXPONENT_BOUNDS = (0.0, 5.0)
# Exponent and E inits; a (the coefficient) is solved from each (exponent, E) pair.
EXPONENT_GRID_1D = (0.05, 0.25, 0.5, 1.0, 2.0)
EXPONENT_GRID_JOINT = (0.1, 0.4, 1.0)
FLOOR_FRACTIONS = (0.01, 0.4, 0.8, 0.97)
# How close (in optimiser coordinates) a parameter must be to a bound to count as "at the bound".
BOUND_TOLERANCE = 1e-4
# L-BFGS-B stopping rules near machine precision (see the module docstring for why).
# A fit still moving after 1000 iterations is sliding along a degenerate direction (E and A
# trading off on flat data); the bound and saturation checks report those.
LBFGS_OPTIONS = {"maxiter": 1000, "maxfun": 4000, "ftol": 1e-15, "gtol": 1e-10, "maxcor": 20}


@dataclass(frozen=True)
class FitResult:
    """The best of a multi-start L-BFGS-B fit of ``y = E + sum_k A_k x_k^-alpha_k``."""

    E: float
    """Irreducible floor ``e^e``."""
    A: tuple[float, ...]
    """Coefficient per axis, in the original (uncentred) units of x."""
    alpha: tuple[float, ...]
    """Exponent per axis."""
    objective: float
    """Huber(delta)/delta summed over runs at the optimum."""
    converged: bool
    """L-BFGS-B reported success or stopped with a projected gradient at rounding level."""
    at_bounds: tuple[str, ...]
    """Names of parameters that ended on a bound (``E``, ``A1``, ``alpha1``, ...)."""
    n_inits: int
    """Initialisations tried."""
    n_converged: int
    """Initialisations that converged."""
    theta: np.ndarray = field(repr=False)
    """Optimiser coordinates ``[e, a'_1, alpha_1, ...]`` (a' centred on ``centre``)."""
    centre: np.ndarray = field(repr=False)
    """Log-size centre per axis used for ``theta``."""
    local_optima: tuple[np.ndarray, ...] = field(repr=False, default=())
    """Up to two distinct optima in theta coordinates, best first (the bootstrap's starting points)."""

    def predict(self, sizes: np.ndarray) -> np.ndarray:
        """``E + sum_k A_k x_k^-alpha_k`` evaluated directly; ``sizes`` is (n,) or (n, K)."""
        return predict_direct(self.E, self.A, self.alpha, sizes)

    def natural(self) -> np.ndarray:
        """``[E, A_1, alpha_1, ..., A_K, alpha_K]``."""
        out = [self.E]
        for a, al in zip(self.A, self.alpha):
            out += [a, al]
        return np.array(out, dtype=np.float64)


def as_sizes(sizes) -> np.ndarray:
    """Sizes as float64 (n, K)."""
    x = np.asarray(sizes, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


def predict_direct(E: float, A, alpha, sizes) -> np.ndarray:
    """``E + sum_k A_k x_k^-alpha_k`` by the textbook formula (the check on the LSE form)."""
    x = as_sizes(sizes)
    A, alpha = np.atleast_1d(np.asarray(A, np.float64)), np.atleast_1d(np.asarray(alpha, np.float64))
    return E + (A * x ** -alpha).sum(axis=1)


def predict_log_lse(theta: np.ndarray, log_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log y = LSE(e, a'_k - alpha_k log x_k)`` and the softmax weights of its terms.

    ``log_x`` is (n, K) and already centred the way ``theta``'s a' are. Returns (n,) predictions
    and (n, K + 1) weights: weight 0 is E's share of y, weight k the k-th power term's share
    (they are also the derivatives of the prediction w.r.t. e and a'_k).
    """
    powers = theta[1::2] - log_x * theta[2::2]  # (n, K): a'_k - alpha_k log x_k
    top = np.maximum(powers.max(axis=1), theta[0])  # (n,) for a stable LSE
    w = np.empty((log_x.shape[0], log_x.shape[1] + 1))
    w[:, 0] = np.exp(theta[0] - top)
    w[:, 1:] = np.exp(powers - top[:, None])
    total = w.sum(axis=1)
    w /= total[:, None]
    return top + np.log(total), w


def huber_objective(theta: np.ndarray, log_x: np.ndarray, log_y: np.ndarray,
                    delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Sum over runs of Huber_delta(pred - log y) / delta, and its gradient w.r.t. theta."""
    pred, w = predict_log_lse(theta, log_x)
    r = pred - log_y
    abs_r = np.abs(r)
    value = np.where(abs_r <= delta, 0.5 * r * r / delta, abs_r - 0.5 * delta).sum()
    psi = np.clip(r, -delta, delta) / delta  # d objective / d prediction, per run
    grad = np.empty_like(theta)
    grad[0] = psi @ w[:, 0]
    grad[1::2] = psi @ w[:, 1:]
    grad[2::2] = -(psi[:, None] * w[:, 1:] * log_x).sum(axis=0)
    return float(value), grad


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread while fitting.

    L-BFGS-B calls BLAS/LAPACK on 3x3 to 5x5 problems; multi-threaded OpenBLAS spends ~5 ms per
    iteration waking its threads (measured 20x slower on a loaded 2-core machine than one thread).
    """
    return _blas_controller().limit(limits=1, user_api="blas")


def _bounds(log_y: np.ndarray, k: int) -> list[tuple[float, float]]:
    # e below log(min y) - 15 means E < 3e-7 * min y: indistinguishable from no floor at all.
    lo, hi = float(log_y.min()) - 15.0, float(log_y.max())
    return [(lo, hi + 2.0)] + [(lo, hi + 5.0), EXPONENT_BOUNDS] * k


def _initial_grid(log_x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Data-relative starting points: every exponent combination x every E fraction, with each a'
    solved so the curve passes through the runs' median (the reducible part shared equally among
    the K power terms). Extra offsets of a' by +-1.5 found the same optimum on 40 random problems
    (noiseless, 0.3% and 2% noise, 1-D and joint), so they are not tried."""
    k = log_x.shape[1]
    exps = EXPONENT_GRID_1D if k == 1 else EXPONENT_GRID_JOINT
    exponent_sets = np.array(np.meshgrid(*[exps] * k, indexing="ij")).reshape(k, -1).T
    starts = []
    for frac in FLOOR_FRACTIONS:
        floor = frac * y.min()
        log_reducible = np.log(np.maximum(y - floor, 1e-6 * y) / k)
        for alphas in exponent_sets:
            theta = [np.log(floor)]
            for j, al in enumerate(alphas):
                theta += [np.median(log_reducible + al * log_x[:, j]), al]
            starts.append(np.array(theta, dtype=np.float64))
    return starts


def _projected_gradient_norm(theta, grad, bounds) -> float:
    lo, hi = np.array(bounds).T
    g = grad.copy()
    g[(theta <= lo + 1e-12) & (g > 0)] = 0.0
    g[(theta >= hi - 1e-12) & (g < 0)] = 0.0
    return float(np.abs(g).max())


def _run_lbfgs(theta0, log_x, log_y, bounds) -> tuple[np.ndarray, float, bool]:
    theta0 = np.clip(theta0, [b[0] for b in bounds], [b[1] for b in bounds])
    res = minimize(huber_objective, theta0, args=(log_x, log_y), jac=True, method="L-BFGS-B",
                   bounds=bounds, options=LBFGS_OPTIONS)
    # Near an exact fit the line search can fail at rounding level ("ABNORMAL_TERMINATION"); that
    # is an optimum, not a failure, if the projected gradient is at rounding level too.
    pg = _projected_gradient_norm(res.x, res.jac, bounds)
    converged = bool(res.success) or pg <= 1e-7 * max(1, log_y.size)
    return res.x, float(res.fun), converged and np.all(np.isfinite(res.x))


def fit_power_law(sizes, y, starts: list[np.ndarray] | None = None,
                  centre: np.ndarray | None = None) -> FitResult:
    """Fit ``y = E + sum_k A_k x_k^-alpha_k`` to runs; ``sizes`` (n,) or (n, K), ``y`` (n,) > 0.

    ``starts`` (theta coordinates, for the same ``centre``) replaces the default grid; the
    bootstrap passes the full-data optima. Returns the lowest-objective converged fit (the lowest
    overall, flagged unconverged, when none converged).
    """
    with single_threaded_blas():
        return _fit(sizes, y, starts, centre)


def _fit(sizes, y, starts: list[np.ndarray] | None, centre: np.ndarray | None) -> FitResult:
    x = as_sizes(sizes)
    y = np.asarray(y, dtype=np.float64)
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("power-law fits need sizes > 0 and values > 0 (the fit is on logarithms)")
    k = x.shape[1]
    centre = np.log(x).mean(axis=0) if centre is None else centre
    log_x, log_y = np.log(x) - centre, np.log(y)
    bounds = _bounds(log_y, k)
    starts = _initial_grid(log_x, y) if starts is None else starts
    results = [_run_lbfgs(t0, log_x, log_y, bounds) for t0 in starts]
    converged = [r for r in results if r[2]]
    pool = sorted(converged or results, key=lambda r: r[1])
    theta, value = pool[0][0], pool[0][1]
    optima: list[np.ndarray] = []
    for t, _, _ in pool:
        if all(np.abs(t - o).max() > 1e-3 for o in optima):
            optima.append(t)
    lo, hi = np.array(bounds).T
    names = ["E"] + [f"{p}{j + 1}" for j in range(k) for p in ("A", "alpha")]
    at_bounds = tuple(n for n, t, l, h in zip(names, theta, lo, hi)
                      if t - l <= BOUND_TOLERANCE or h - t <= BOUND_TOLERANCE)
    alphas = theta[2::2]
    return FitResult(
        E=float(np.exp(theta[0])),
        A=tuple(float(v) for v in np.exp(theta[1::2] + alphas * centre)),
        alpha=tuple(float(v) for v in alphas),
        objective=value, converged=bool(converged), at_bounds=at_bounds,
        n_inits=len(starts), n_converged=len(converged), theta=theta, centre=centre,
        local_optima=tuple(optima[:2]))


@dataclass(frozen=True)
class Bootstrap:
    """Refits on resampled runs: natural parameters ``[E, A_1, alpha_1, ...]`` per kept resample."""

    samples: np.ndarray
    """(n_kept, 1 + 2K) natural parameters of each converged refit."""
    requested: int
    """Resamples drawn."""
    degenerate: int
    """Resamples skipped because they held too few distinct sizes to fit."""
    failed: int
    """Refits that did not converge (not kept)."""

    def ci95(self) -> np.ndarray:
        """(1 + 2K, 2) percentile interval [2.5, 97.5] per parameter (NaN when nothing was kept)."""
        if len(self.samples) == 0:
            return np.full((self.samples.shape[1], 2), np.nan)
        return np.percentile(self.samples, [2.5, 97.5], axis=0).T

    def band(self, sizes) -> np.ndarray:
        """(2, n) pointwise 95% band of the fitted curve at ``sizes``."""
        x = as_sizes(sizes)
        if len(self.samples) == 0:
            return np.full((2, x.shape[0]), np.nan)
        preds = np.stack([predict_direct(s[0], s[1::2], s[2::2], x) for s in self.samples])
        return np.percentile(preds, [2.5, 97.5], axis=0)


def min_distinct_sizes(k: int) -> int:
    """Fewest distinct values per axis a fit is attempted with (3 parameters need 3 points in 1-D)."""
    return 3 if k == 1 else 2


def enough_distinct(x: np.ndarray) -> bool:
    """Whether runs ``x`` (n, K) can determine the model: distinct sizes per axis, and in the joint
    form more distinct (N, D) points than its 5 parameters."""
    k = x.shape[1]
    per_axis = all(len(np.unique(x[:, j])) >= min_distinct_sizes(k) for j in range(k))
    return per_axis and (k == 1 or len(np.unique(x, axis=0)) > 1 + 2 * k)


def bootstrap_fit(sizes, y, best: FitResult, n_resamples: int, rng: np.random.Generator) -> Bootstrap:
    """Resample runs with replacement ``n_resamples`` times and refit from ``best``'s optimum
    (from its second-best distinct optimum when that refit does not converge)."""
    x, y = as_sizes(sizes), np.asarray(y, dtype=np.float64)
    starts = list(best.local_optima) or [best.theta]
    kept, degenerate, failed = [], 0, 0
    with single_threaded_blas():
        for _ in range(n_resamples):
            idx = rng.integers(0, len(y), len(y))
            if not enough_distinct(x[idx]):
                degenerate += 1
                continue
            refit = _fit(x[idx], y[idx], starts[:1], best.centre)
            if not refit.converged and len(starts) > 1:
                refit = _fit(x[idx], y[idx], starts[1:], best.centre)
            if refit.converged:
                kept.append(refit.natural())
            else:
                failed += 1
    samples = np.array(kept, dtype=np.float64).reshape(-1, 1 + 2 * x.shape[1])
    return Bootstrap(samples=samples, requested=n_resamples, degenerate=degenerate, failed=failed)


@dataclass(frozen=True)
class Extrapolation:
    """A fit without the runs at the largest size of one axis, checked on those runs."""

    held_out: float
    """The largest size, left out."""
    n_held_out: int
    """Runs at that size."""
    predicted: float
    """Mean prediction over the held-out runs."""
    observed: float
    """Mean observed value over the held-out runs."""
    fit: FitResult
    """The fit on the remaining runs."""

    @property
    def rel_error(self) -> float:
        """(predicted - observed) / observed."""
        return (self.predicted - self.observed) / self.observed


def extrapolate_largest(sizes, y, axis: int = 0) -> Extrapolation | None:
    """Leave out every run at the largest size on ``axis``, fit the rest, predict the held-out runs.

    None when the remaining runs are too few to fit.
    """
    x, y = as_sizes(sizes), np.asarray(y, dtype=np.float64)
    largest = x[:, axis].max()
    held = x[:, axis] == largest
    if not enough_distinct(x[~held]):
        return None
    fit = fit_power_law(x[~held], y[~held])
    return Extrapolation(held_out=float(largest), n_held_out=int(held.sum()),
                         predicted=float(fit.predict(x[held]).mean()), observed=float(y[held].mean()),
                         fit=fit)
