"""Figures of the report, drawn from the report structure (so they show report.json's numbers).

matplotlib's object API (``Figure``) with the Agg canvas: no pyplot global state, no display
needed. Sized 7 x 4.4 in at 150 dpi (1050 px), with 11-12 pt text, so they stay legible when the
README scales them to ~700 px.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colors, rc_context, ticker
from matplotlib.figure import Figure

from mindeye_dist.scaling.build import AXIS_LABEL, AXIS_SYMBOL

DPI = 150
SIZE = (7.0, 4.4)
STYLE = {"font.size": 11, "axes.titlesize": 11.5, "axes.labelsize": 11, "legend.fontsize": 9.5,
         "xtick.labelsize": 10, "ytick.labelsize": 10}
LOSS_UNITS = "validation contrastive loss (nats)"


def _ci_text(entry: dict, name: str) -> str:
    lo, hi = entry[f"{name}_ci95"]
    symbol = {"alpha": "α", "beta": "β"}.get(name, name)
    ci = "no CI" if lo is None else f"95% CI {lo:.3g}–{hi:.3g}"
    return f"{symbol} = {entry[name]:.3g} ({ci})"


def _new_figure(ncols: int = 1, width: float = SIZE[0]) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, SIZE[1]), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
    return fig, list(axes)


def _draw_fit(ax, entry: dict, exponent: str, color: str = "C0") -> None:
    """Points, fitted curve, its bootstrap band and the leave-largest-out curve of a 1-D fit."""
    pts = entry["points"]
    x = [p["sizes"][0] for p in pts]
    ax.scatter(x, [p["observed"] for p in pts], color=color, zorder=3, s=28, label=f"runs ({len(pts)})")
    if entry.get("status") != "ok":
        return
    c = entry["curve"]
    ax.plot(c["x"], c["fit"], color=color, lw=2, label=f"fit: E + A·N$^{{-{exponent}}}$".replace(
        "A·N", "B·D" if exponent == "β" else "A·N"))
    if "band_low" in c:
        ax.fill_between(c["x"], c["band_low"], c["band_high"], color=color, alpha=0.2, lw=0,
                        label="95% bootstrap band")
    if "holdout_fit" in c:
        ex = entry["extrapolation"]
        ax.plot(c["x"], c["holdout_fit"], color="0.35", lw=1.2, ls="--",
                label=f"fit without largest ({100 * ex['rel_error']:+.1f}% there)")
    lowest = min(p["observed"] for p in pts)
    if entry["E"] >= lowest / 10:  # an asymptote far below the data would squash the data into a line
        ax.axhline(entry["E"], color="0.5", lw=0.8, ls=":", label=f"E = {entry['E']:.3g}")
    else:
        ax.plot([], [], " ", label=f"E = {entry['E']:.3g} (below the axis)")


def _plain_log_labels(axis) -> None:
    """Label a log axis as 4, 6, 10 rather than 4x10^0 (minor ticks only when it spans little)."""
    axis.set_major_formatter(ticker.LogFormatter())
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))


def _sparse_minor_labels(axis) -> None:
    """On a log axis, label the minor ticks at 2 and 5 times a power of ten only (matplotlib labels
    every one when the axis spans under two decades, and 3x10^5 ran into 4x10^5 at README size)."""
    sci = ticker.LogFormatterSciNotation(labelOnlyBase=False)

    def label(x: float, pos=None) -> str:
        if x <= 0:
            return ""
        mantissa = x / 10 ** math.floor(math.log10(x) + 1e-9)
        return sci(x, pos) if any(abs(mantissa - m) < 1e-6 for m in (2, 5)) else ""

    axis.set_minor_formatter(ticker.FuncFormatter(label))


def plot_loss_vs_axis(report: dict, name: str, path: Path) -> bool:
    """Loss vs N (``loss_vs_params``) or vs D (``loss_vs_data``); False when nothing to draw."""
    entry = report["fits"][name]
    if not entry.get("points"):
        return False
    axis = entry["axes"][0]
    exponent = "alpha" if axis == "params" else "beta"
    fig, (ax,) = _new_figure()
    _draw_fit(ax, entry, "α" if exponent == "alpha" else "β")
    ax.set(xscale="log", yscale="log", xlabel=f"{AXIS_LABEL[axis]} {AXIS_SYMBOL[axis]}", ylabel=LOSS_UNITS)
    _plain_log_labels(ax.yaxis)
    _sparse_minor_labels(ax.xaxis)
    fixed = {k: v for k, v in (entry.get("slice") or {}).items() if v is not None}
    where = "".join(f", runs at {AXIS_SYMBOL[k]} = {v:.3g}" for k, v in fixed.items())
    title = f"Loss vs {AXIS_LABEL[axis]}: L = E + {'A·N^-α' if exponent == 'alpha' else 'B·D^-β'}{where}"
    detail = _ci_text(entry, exponent) if entry.get("status") == "ok" else "not fitted (too few sizes)"
    ax.set_title(f"{title}\n{detail}")
    ax.legend(loc="best")
    fig.savefig(path)
    return True


def _plot_optimum(ax, curve: dict, key: str, boxed_label: str, free_label: str) -> None:
    """The joint fit's optimum along C: within the sweep's N, D range (dashed) and unconstrained
    where that leaves the range (dotted, an extrapolation)."""
    x = np.asarray(curve["flops"])
    boxed = np.array([np.nan if v is None else v for v in curve[f"{key}_in_sweep"]])
    ax.plot(x, boxed, color="k", ls="--", lw=1.5, label=boxed_label)
    free = np.asarray(curve[key], dtype=float)
    if not all(curve["within_sweep"]):
        ax.plot(x, free, color="0.3", ls=":", lw=1.3, label=free_label)


def plot_loss_vs_compute(report: dict, path: Path) -> bool:
    """Every run's loss against its training FLOPs, coloured by N, with the frontier; False when no
    run records FLOPs."""
    runs = [r for r in report["trials"] if r["flops"] > 0 and not any(f.startswith("status") for f in r["flags"])]
    if not runs:
        return False
    frontier = report["compute_frontier"]
    fitted = frontier["fitted"]
    fig, axes = _new_figure(2 if fitted else 1, width=10.0 if fitted else SIZE[0])
    ax = axes[0]
    params = np.array([r["params"] for r in runs])
    norm = colors.LogNorm(params.min(), params.max() * (1.0001 if params.min() == params.max() else 1))
    sc = ax.scatter([r["flops"] for r in runs], [r["val_loss"] for r in runs], c=params, norm=norm,
                    cmap="viridis", s=32, zorder=3, edgecolors="k", linewidths=0.4)
    fig.colorbar(sc, ax=ax, label="model size N (colour)")
    pts = frontier["points"]
    ax.step([p["flops"] for p in pts], [p["val_loss"] for p in pts], where="post", color="C3", lw=1.8,
            label="compute frontier (lower envelope of runs)")
    if fitted:
        _plot_optimum(ax, fitted["curve"], "loss", "joint fit, best N and D within the sweep",
                      "joint fit, unconstrained optimum (extrapolated)")
        ax2 = axes[1]
        _plot_optimum(ax2, fitted["curve"], "n_opt", "best N within the sweep's N, D",
                      f"N$_{{opt}}$ ∝ C$^{{{fitted['n_opt_exponent']:.2f}}}$, unconstrained")
        ax2.scatter([p["flops"] for p in pts], [p["params"] for p in pts], color="C3", zorder=3,
                    label="runs on the frontier")
        ax2.axvline(fitted["max_observed_flops"], color="0.5", lw=0.8, ls=":", label="largest run")
        ax2.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)",
                ylabel="compute-optimal parameters N$_{opt}$", title="Compute-optimal model size (joint fit)")
        _sparse_minor_labels(ax2.xaxis)
        ax2.legend(loc="lower right")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel=LOSS_UNITS,
           title="Loss vs training compute, coloured by model size")
    _sparse_minor_labels(ax.xaxis)
    _plain_log_labels(ax.yaxis)
    ax.legend(loc="lower left")
    fig.savefig(path)
    return True


def plot_retrieval_vs_params(report: dict, path: Path) -> None:
    """Image and brain top-1 vs N with the error-rate fits (as 1 - error), ridge and chance lines."""
    fig, axes = _new_figure(2, width=10.0)
    runs = {r["trial_id"]: r for r in report["trials"]}
    for ax, which, color in zip(axes, ("image", "brain"), ("C0", "C1")):
        entry = report["fits"][f"{which}_error_vs_params"]
        pts = entry.get("points") or []
        ax.scatter([p["sizes"][0] for p in pts], [1 - p["observed"] for p in pts], color=color, s=28,
                   zorder=3, label="runs")
        title = f"{which.capitalize()} retrieval top-1 vs parameters"
        if entry.get("status") == "ok":
            c = entry["curve"]
            ax.plot(c["x"], 1 - np.array(c["fit"]), color=color, lw=2, label="fit on error 1 − top-1")
            if "band_low" in c:
                ax.fill_between(c["x"], 1 - np.array(c["band_high"]), 1 - np.array(c["band_low"]),
                                color=color, alpha=0.2, lw=0, label="95% bootstrap band")
            title += f"\nerror ∝ N^-α: {_ci_text(entry, 'alpha')}"
        ridge = [runs[p["trial_id"]][f"ridge_{which}_top1"] for p in pts]
        ridge = [r for r in ridge if r is not None]
        if ridge:
            ax.axhline(float(np.median(ridge)), color="k", ls="--", lw=1.2, label="ridge baseline")
        ways = {runs[p["trial_id"]]["way"] for p in pts} - {None}
        if len(ways) == 1:
            ax.axhline(1 / ways.pop(), color="0.5", ls=":", lw=1, label="chance")
        # Top-1 is a fraction: keep the axis in [0, 1] even where a wild bootstrap band leaves it.
        shown = [1 - p["observed"] for p in pts] + ridge
        ax.set_ylim(0, min(1.0, 1.15 * max(shown, default=1.0)) or 1.0)
        ax.set(xscale="log", xlabel="trainable parameters N", ylabel=f"{which} retrieval top-1 (fraction)",
               title=title)
        _sparse_minor_labels(ax.xaxis)
        ax.legend(loc="best")
    fig.savefig(path)


def plot_residuals(report: dict, path: Path) -> bool:
    """Log residuals (observed vs fitted) of every fit that ran, one panel each."""
    fitted = [(n, e) for n, e in report["fits"].items() if e.get("status") == "ok"]
    if not fitted:
        return False
    cols = min(3, len(fitted))
    rows = (len(fitted) + cols - 1) // cols
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows + 0.4), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, entry) in zip(axes, fitted):
        pts = entry["points"]
        x = np.array([p["sizes"][0] for p in pts])
        res = 100 * np.array([p["residual_log"] for p in pts])
        if len(entry["axes"]) == 2:
            ax.scatter(x, res, c=[p["sizes"][1] for p in pts], s=22, cmap="viridis", norm=colors.LogNorm())
        else:
            ax.scatter(x, res, color="C0", s=22)
        ax.axhline(0, color="k", lw=0.8)
        axis = entry["axes"][0]
        ax.set(xscale="log", xlabel=f"{AXIS_SYMBOL[axis]} ({AXIS_LABEL[axis]})", ylabel="residual (% of value)",
               title=name.replace("_", " ") + (" (colour: D)" if len(entry["axes"]) == 2 else ""))
        _sparse_minor_labels(ax.xaxis)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(fitted):]:
        ax.set_visible(False)
    fig.suptitle("Residuals: log(observed) − log(fitted), ×100 ≈ % error")
    fig.savefig(path)
    return True


def write_figures(report: dict, out_dir: Path) -> dict[str, str]:
    """Draw every figure that has data; returns {figure name: file name relative to out_dir}."""
    with rc_context(STYLE):  # text sizes are read when artists are made, so the whole drawing
        return _write_all(report, out_dir)


def _write_all(report: dict, out_dir: Path) -> dict[str, str]:
    written = {}
    for name in ("loss_vs_params", "loss_vs_data"):
        if plot_loss_vs_axis(report, name, out_dir / f"{name}.png"):
            written[name] = f"{name}.png"
    if plot_loss_vs_compute(report, out_dir / "loss_vs_compute.png"):
        written["loss_vs_compute"] = "loss_vs_compute.png"
    plot_retrieval_vs_params(report, out_dir / "retrieval_vs_params.png")
    written["retrieval_vs_params"] = "retrieval_vs_params.png"
    if plot_residuals(report, out_dir / "residuals.png"):
        written["residuals"] = "residuals.png"
    return written
