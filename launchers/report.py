"""Scaling-law report of a finished (or partly finished) sweep.

    python launchers/report.py SWEEP_DIR --out REPORT_DIR
    python launchers/report.py SWEEP_DIR --out REPORT_DIR --bootstrap 4000 --seed 1

Reads ``SWEEP_DIR/results.jsonl`` (one row per finished trial, written by ``launchers/sweep.py``)
and ``SWEEP_DIR/sweep.json`` when present, and writes into REPORT_DIR (default SWEEP_DIR/report):

- ``report.json``: every fit under ``fits`` (``loss_vs_params``, ``loss_vs_data``, ``loss_joint``,
  ``image_error_vs_params``, ``brain_error_vs_params``) with estimates, 95% bootstrap CIs, the
  leave-largest-out extrapolation error and warnings; ``compute_frontier``, ``trials``,
  ``below_ridge``, ``lr_search``.
- ``report.md``: summary, fit tables, what the data can and cannot support, trials and LR-search
  tables, the figures.
- ``loss_vs_params.png``, ``loss_vs_data.png`` (when data varies), ``loss_vs_compute.png``,
  ``retrieval_vs_params.png``, ``residuals.png``.

Fits follow Chinchilla approach 3 as re-examined by Besiroglu et al. 2024; see
``mindeye_dist/scaling/fit.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# L-BFGS-B on 3-5 parameters is slowed ~20x by multi-threaded BLAS; the library also limits it per
# fit (threadpoolctl), this keeps BLAS from starting its threads at all.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindeye_dist.scaling import ResultsError, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="sweep directory holding results.jsonl")
    parser.add_argument("--out", help="report directory (default: SWEEP_DIR/report)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples of runs per fit (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    out = Path(args.out) if args.out else Path(args.sweep_dir) / "report"
    try:
        report = write_report(args.sweep_dir, out, n_bootstrap=args.bootstrap, seed=args.seed)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fit = report["fits"]["loss_vs_params"]
    if fit.get("status") == "ok":
        lo, hi = fit["alpha_ci95"]
        ci = "no CI" if lo is None else f"95% CI {lo:.4g} to {hi:.4g}"
        print(f"loss vs parameters: alpha = {fit['alpha']:.4g} ({ci}), {fit['n_runs']} runs, "
              f"{'supported' if fit['supported'] else 'not supported'}, {len(fit['warnings'])} warning(s)")
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {len(report['figures'])} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
