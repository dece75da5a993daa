"""The report as one JSON-able structure: every fit, its diagnostics, the frontier, the tables.

``report.json`` is this structure; ``report.md`` and the figures are drawn from it, so the numbers
in the three agree by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from mindeye_dist.scaling.diagnose import ERROR_FLOOR, exponent_supported, fit_warnings
from mindeye_dist.scaling.fit import (HUBER_DELTA, LBFGS_OPTIONS, bootstrap_fit, enough_distinct,
                                      extrapolate_largest, fit_power_law, min_distinct_sizes)
from mindeye_dist.scaling.frontier import compute_frontier
from mindeye_dist.scaling.results import FITTED_STATUSES, ResultsError, SweepResults, Trial

CURVE_POINTS = 60
BOUNDED_METRIC_NOTE = ("retrieval top-1 is bounded, so the power law is fitted to its error rate 1 - top-1; "
                       "this form is an inference, not a standard scaling law")
OBJECTIVE = f"sum over runs of Huber(delta={HUBER_DELTA:g}) on log(value) residuals, divided by delta"
OPTIMIZER = ("scipy L-BFGS-B, analytic gradient, float64, grid of initialisations, best converged "
             f"fit kept (ftol={LBFGS_OPTIONS['ftol']:g}, gtol={LBFGS_OPTIONS['gtol']:g})")


@dataclass(frozen=True)
class FitSpec:
    """Which quantity is fitted against which axes, and what its parameters are called."""

    name: str
    """Key under ``fits``."""
    metric: str
    """``val_loss``, ``image_error`` or ``brain_error``."""
    axes: tuple[str, ...]
    """Trial fields of the scaling axes (``params``, ``data_size``)."""
    exponents: tuple[str, ...]
    """Exponent name per axis (``alpha`` for N, ``beta`` for D)."""
    coefficients: tuple[str, ...]
    """Coefficient name per axis (``A`` for N, ``B`` for D)."""

    def form(self) -> str:
        """The fitted law in text."""
        y = {"val_loss": "L", "image_error": "err_image", "brain_error": "err_brain"}[self.metric]
        args = ", ".join(AXIS_SYMBOL[a] for a in self.axes)
        terms = " + ".join(f"{c}·{AXIS_SYMBOL[a]}^-{e}" for c, a, e in zip(self.coefficients, self.axes, self.exponents))
        return f"{y}({args}) = E + {terms}"


AXIS_SYMBOL = {"params": "N", "data_size": "D"}
AXIS_LABEL = {"params": "trainable parameters", "data_size": "training stimuli per epoch"}
METRIC_LABEL = {"val_loss": "validation contrastive loss",
                "image_error": "image retrieval error (1 - top-1)",
                "brain_error": "brain retrieval error (1 - top-1)"}
FIT_SPECS = (
    FitSpec("loss_vs_params", "val_loss", ("params",), ("alpha",), ("A",)),
    FitSpec("loss_vs_data", "val_loss", ("data_size",), ("beta",), ("B",)),
    FitSpec("loss_joint", "val_loss", ("params", "data_size"), ("alpha", "beta"), ("A", "B")),
    FitSpec("image_error_vs_params", "image_error", ("params",), ("alpha",), ("A",)),
    FitSpec("brain_error_vs_params", "brain_error", ("params",), ("alpha",), ("A",)),
)


def metric_values(trials: list[Trial], metric: str) -> np.ndarray:
    """The fitted quantity per trial: the loss, or a retrieval error rate floored at ERROR_FLOOR."""
    if metric == "val_loss":
        return np.array([t.val_loss for t in trials], dtype=np.float64)
    top1 = np.array([getattr(t, f"val_{metric.split('_')[0]}_top1") for t in trials], dtype=np.float64)
    return np.maximum(1.0 - top1, ERROR_FLOOR)


def slice_for(trials: list[Trial], vary: str, fixed: str) -> tuple[float | None, list[Trial]]:
    """Runs for a one-axis fit: those at the value of ``fixed`` with the most distinct ``vary``
    values (ties: the largest). (None, all) when ``fixed`` does not vary."""
    groups: dict[float, list[Trial]] = {}
    for t in trials:
        groups.setdefault(getattr(t, fixed), []).append(t)
    if len(groups) == 1:
        return None, list(trials)
    best = max(groups, key=lambda v: (len({getattr(t, vary) for t in groups[v]}), v))
    return best, groups[best]


def _decades(values: np.ndarray) -> float:
    return float(np.log10(values.max() / values.min()))


def _named(spec: FitSpec, natural: np.ndarray) -> dict[str, float]:
    out = {"E": float(natural[0])}
    for j, (c, e) in enumerate(zip(spec.coefficients, spec.exponents)):
        out[c], out[e] = float(natural[1 + 2 * j]), float(natural[2 + 2 * j])
    return out


def _extrapolation_entry(x: np.ndarray, y: np.ndarray, axis: int) -> dict | None:
    ex = extrapolate_largest(x, y, axis=axis)
    if ex is None:
        return None
    return {"held_out": ex.held_out, "n_held_out": ex.n_held_out, "predicted": ex.predicted,
            "observed": ex.observed, "rel_error": ex.rel_error, "fit_E": ex.fit.E,
            "fit_A": list(ex.fit.A), "fit_exponents": list(ex.fit.alpha)}


def _curve(spec: FitSpec, x: np.ndarray, fit, boot, extrapolation: dict | None) -> dict:
    grid = np.geomspace(x[:, 0].min(), x[:, 0].max(), CURVE_POINTS)
    low, high = boot.band(grid)
    curve = {"x": grid.tolist(), "fit": fit.predict(grid).tolist()}
    if np.all(np.isfinite(low)):  # no band without bootstrap refits
        curve["band_low"], curve["band_high"] = low.tolist(), high.tolist()
    if extrapolation is not None:
        e = extrapolation
        curve["holdout_fit"] = (e["fit_E"] + e["fit_A"][0] * grid ** -e["fit_exponents"][0]).tolist()
    return curve


def _points(trials, x, y, fit=None) -> list[dict]:
    pred = fit.predict(x) if fit is not None else np.full(len(y), np.nan)
    return [{"trial_id": t.trial_id, "sizes": row.tolist(), "observed": float(obs),
             "predicted": float(p) if fit is not None else None,
             "residual_log": float(np.log(obs) - np.log(p)) if fit is not None else None}
            for t, row, obs, p in zip(trials, x, y, pred)]


def fit_entry(spec: FitSpec, trials: list[Trial], slice_info: dict, n_bootstrap: int,
              rng: np.random.Generator) -> dict:
    """One entry of ``fits``: estimates, 95% CIs, extrapolation, diagnostics, points and curve."""
    x = np.array([[getattr(t, a) for a in spec.axes] for t in trials], dtype=np.float64).reshape(-1, len(spec.axes))
    y = metric_values(trials, spec.metric)
    n_sizes = [len(np.unique(x[:, j])) for j in range(x.shape[1])] if len(trials) else [0] * len(spec.axes)
    entry = {"form": spec.form(), "metric": spec.metric, "metric_label": METRIC_LABEL[spec.metric],
             "axes": list(spec.axes), "slice": slice_info,
             "n_runs": len(trials), "n_sizes": n_sizes[0] if len(n_sizes) == 1 else n_sizes,
             "decades": (_decades(x[:, 0]) if x.shape[1] == 1 else [_decades(x[:, j]) for j in range(2)])
             if len(trials) else None,
             "huber_delta": HUBER_DELTA, "bootstrap": n_bootstrap}
    if spec.metric != "val_loss":
        entry["note"] = BOUNDED_METRIC_NOTE
    if not len(trials) or not enough_distinct(x):
        need = min_distinct_sizes(len(spec.axes))
        entry.update(status="skipped", warnings=[
            f"not fitted: {len(trials)} run(s) at {' × '.join(map(str, n_sizes))} distinct "
            f"{' × '.join(AXIS_SYMBOL[a] for a in spec.axes)} value(s); a fit needs at least {need} distinct "
            "values per axis"
            + ("" if len(spec.axes) == 1 else " and more than 5 distinct (N, D) points")],
            points=_points(trials, x, y))
        return entry
    fit = fit_power_law(x, y)
    boot = bootstrap_fit(x, y, fit, n_bootstrap, rng)
    ci = boot.ci95()
    # Natural parameters come in the order [E, A_1, alpha_1, A_2, alpha_2], the CI rows too.
    for i, (name, value) in enumerate(_named(spec, fit.natural()).items()):
        entry[name] = value
        # No CI (JSON null) when no resample gave a fit, e.g. --bootstrap 0.
        entry[f"{name}_ci95"] = [None if np.isnan(v) else float(v) for v in ci[i]]
    entry["bootstrap_used"] = int(len(boot.samples))
    entry["bootstrap_degenerate"] = boot.degenerate
    entry["bootstrap_failed"] = boot.failed
    entry["converged"] = fit.converged
    entry["n_inits"], entry["n_inits_converged"] = fit.n_inits, fit.n_converged
    entry["objective"] = fit.objective
    entry["at_bounds"] = [_bound_name(spec, b) for b in fit.at_bounds]
    if len(spec.axes) == 1:
        entry["extrapolation"] = _extrapolation_entry(x, y, 0)
        entry["curve"] = _curve(spec, x, fit, boot, entry["extrapolation"])
    else:
        entry["extrapolation"] = {AXIS_SYMBOL[a]: _extrapolation_entry(x, y, j) for j, a in enumerate(spec.axes)}
    entry["points"] = _points(trials, x, y, fit)
    for name in spec.exponents:  # the bar for a sweep: CI narrower than half the exponent
        lo, hi = entry[f"{name}_ci95"]
        entry[f"{name}_ci95_rel_width"] = float((hi - lo) / entry[name]) if entry[name] > 0 and lo is not None else None
    entry["status"] = "ok"
    entry["warnings"] = fit_warnings(spec, entry, x, y)
    entry["supported"], entry["not_supported_because"] = exponent_supported(spec, entry)
    return entry


def _bound_name(spec: FitSpec, optimiser_name: str) -> str:
    """``A1``/``alpha2`` (optimiser order) -> the spec's names (``A``, ``beta``)."""
    if optimiser_name == "E":
        return "E"
    kind, axis = re.fullmatch(r"([A-Za-z]+)(\d+)", optimiser_name).groups()
    return (spec.coefficients if kind == "A" else spec.exponents)[int(axis) - 1]


def build_fits(trials: list[Trial], n_bootstrap: int, seed: int) -> dict:
    """Every fit in FIT_SPECS on the runs it applies to."""
    fits = {}
    d_slice, n_runs = slice_for(trials, "params", "data_size")
    n_slice, d_runs = slice_for(trials, "data_size", "params")
    for index, spec in enumerate(FIT_SPECS):
        rng = np.random.default_rng([seed, index])  # one stream per fit: fits do not shift each other
        if spec.axes == ("params",):
            runs, info = n_runs, {"data_size": d_slice}
        elif spec.axes == ("data_size",):
            runs, info = d_runs, {"params": n_slice}
        else:
            runs, info = trials, {}
        if spec.axes != ("params",) and len({t.data_size for t in trials}) < 2:
            fits[spec.name] = {"form": spec.form(), "metric": spec.metric, "axes": list(spec.axes),
                               "status": "skipped", "n_runs": len(trials), "bootstrap": n_bootstrap,
                               "warnings": [f"not fitted: every run has the same data size "
                                            f"(D = {trials[0].data_size:g}); the sweep does not vary data"]}
            continue
        fits[spec.name] = fit_entry(spec, runs, info, n_bootstrap, rng)
    return fits


def trial_rows(trials: list[Trial]) -> list[dict]:
    """The trials table, sorted by size then data."""
    rows = []
    for t in sorted(trials, key=lambda t: (t.params, t.data_size, t.trial_id)):
        flags = [f"below ridge ({which})" for which in t.below_ridge()]
        if not t.fitted():
            flags.append(f"status {t.status}: not fitted")
        if t.way is not None and min(t.val_image_top1, t.val_brain_top1) <= 2.0 / t.way:
            flags.append(f"retrieval within 2x chance (1/{t.way})")
        rows.append({"trial_id": t.trial_id, "params": t.params, "data_size": t.data_size,
                     "samples_seen": t.samples_seen, "flops": t.flops, "lr": t.lr, "val_loss": t.val_loss,
                     "val_image_top1": t.val_image_top1, "val_brain_top1": t.val_brain_top1,
                     "ridge_image_top1": t.ridge_image_top1, "ridge_brain_top1": t.ridge_brain_top1,
                     "seed": t.seed, "way": t.way, "status": t.status, "wall_s": t.wall_s,
                     "overrides": t.overrides, "flags": flags})
    return rows


def lr_search_rows(results: SweepResults) -> list[dict]:
    """The LR-search table; ``chosen`` marks the rate the final run of that size used."""
    final_lr = {(t.params, t.data_size): t.lr for t in results.trials}
    rows = []
    for r in sorted(results.search, key=lambda r: (r.params or 0, r.data_size or 0, r.lr, r.samples_seen or 0)):
        chosen = final_lr.get((r.params, r.data_size))
        rows.append({"trial_id": r.trial_id, "params": r.params, "data_size": r.data_size, "lr": r.lr,
                     "samples_seen": r.samples_seen, "rung": r.rung, "val_loss": r.val_loss,
                     "status": r.status, "chosen": chosen is not None and bool(np.isclose(chosen, r.lr, rtol=1e-9))})
    return rows


def build_report(results: SweepResults, sweep_dir: str, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The whole report structure (``report.json``) for ``results``."""
    fitted = results.fitted()
    if not fitted:
        statuses = sorted({str(t.status) for t in results.trials})
        raise ResultsError(f"no final trial has a finished status (found: {', '.join(statuses)}; fitted are "
                           f"rows without a status or with one of {', '.join(FITTED_STATUSES)}): nothing to fit")
    fits = build_fits(fitted, n_bootstrap, seed)
    trials = trial_rows(results.trials)
    notes = list(results.notes)
    excluded = [t.trial_id for t in results.trials if not t.fitted()]
    if excluded:
        notes.append(f"{len(excluded)} trial(s) with an unfinished status are listed but not fitted: "
                     + ", ".join(excluded))
    return {
        "sweep": {"dir": str(sweep_dir), "name": results.sweep.get("name"), "config": results.sweep or None},
        "settings": {"bootstrap": n_bootstrap, "seed": seed, "huber_delta": HUBER_DELTA,
                     "objective": OBJECTIVE, "optimizer": OPTIMIZER, "ci": "2.5/97.5 percentiles of "
                     "bootstrap refits (runs resampled with replacement)", "error_floor": ERROR_FLOOR},
        "fits": fits,
        "compute_frontier": compute_frontier(fitted, fits.get("loss_joint")),
        "trials": trials,
        "below_ridge": [r["trial_id"] for r in trials if any(f.startswith("below ridge") for f in r["flags"])],
        "lr_search": lr_search_rows(results),
        "data_notes": notes,
    }
