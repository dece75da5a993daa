"""Scaling-law report of a sweep: power-law fits with bootstrap CIs, figures, report.md/json.

    report = write_report("sweeps/scaling_cpu", "sweeps/scaling_cpu/report", n_bootstrap=1000, seed=0)
    report["fits"]["loss_vs_params"]["alpha"], report["fits"]["loss_vs_params"]["alpha_ci95"]

Modules: ``results`` reads and checks ``results.jsonl``; ``fit`` is the Chinchilla-approach-3 fitter
(Huber on log values, LSE parameterisation, L-BFGS-B from a grid, bootstrap, leave-largest-out);
``diagnose`` says what a fit can and cannot support; ``frontier`` the compute-optimal frontier;
``build`` assembles report.json's structure; ``plots`` and ``markdown`` draw it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mindeye_dist.scaling.build import build_report
from mindeye_dist.scaling.fit import FitResult, bootstrap_fit, extrapolate_largest, fit_power_law
from mindeye_dist.scaling.markdown import render_markdown
from mindeye_dist.scaling.results import ResultsError, SweepResults, Trial, load_results

__all__ = ["FitResult", "ResultsError", "SweepResults", "Trial", "bootstrap_fit", "build_report",
           "extrapolate_largest", "fit_power_law", "load_results", "render_markdown", "write_report"]


def write_report(sweep_dir: str | Path, out_dir: str | Path, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Fit, plot and write ``report.md``, ``report.json`` and the PNGs into ``out_dir``; returns the
    report structure (what report.json holds)."""
    from mindeye_dist.scaling.plots import write_figures  # matplotlib only when drawing

    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    results = load_results(sweep_dir)
    report = build_report(results, str(sweep_dir), n_bootstrap=n_bootstrap, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["figures"] = write_figures(report, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report
