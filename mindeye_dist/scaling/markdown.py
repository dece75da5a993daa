"""report.md, rendered from the report structure only (so its numbers are report.json's).

Numbers are printed with :func:`num` (4 significant digits) and relative errors with :func:`pct`;
report.json keeps them unrounded (Besiroglu et al. 2024: rounded parameters bias predictions).
"""

from __future__ import annotations

import math
from pathlib import Path

from mindeye_dist.scaling.build import AXIS_SYMBOL, FIT_SPECS

SYMBOL = {"alpha": "α", "beta": "β"}
FIGURE_CAPTIONS = {
    "loss_vs_params": "Validation loss vs trainable parameters: runs, the fit, its 95% bootstrap band, "
                      "and the fit made without the largest size (dashed).",
    "loss_vs_data": "Validation loss vs training stimuli per epoch, same elements.",
    "loss_vs_compute": "Validation loss vs training FLOPs, coloured by model size; the red steps are "
                       "the compute frontier (no cheaper run is better). With a joint fit, the dashed "
                       "line is the fitted loss at the compute-optimal size, and the right panel N_opt(C).",
    "retrieval_vs_params": "Image and brain retrieval top-1 vs parameters, with the error-rate fits, "
                           "the ridge baseline and chance.",
    "residuals": "Residuals of every fit, log(observed) − log(fitted) in percent.",
}


def num(x) -> str:
    """A number as report.md prints it (4 significant digits; '–' for missing)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:.4g}"


def pct(x) -> str:
    """A relative error as report.md prints it (signed percent, 2 decimals)."""
    return "–" if x is None else f"{100 * x:+.2f}%"


def _param_names(name: str) -> list[str]:
    spec = next(s for s in FIT_SPECS if s.name == name)
    return [n for pair in zip(spec.exponents, spec.coefficients) for n in pair] + ["E"]


def _with_ci(entry: dict, p: str) -> str:
    lo, hi = entry[f"{p}_ci95"]
    return f"{SYMBOL.get(p, p)} = {num(entry[p])} (95% CI {num(lo)} to {num(hi)})"


def _extrapolation_sentence(entry: dict) -> str:
    ex = entry["extrapolation"]
    items = ex.items() if len(entry["axes"]) == 2 else [(AXIS_SYMBOL[entry["axes"][0]], ex)]
    out = []
    for sym, e in items:
        if e is None:
            out.append(f"too few sizes to check an extrapolation to the largest {sym}")
        else:
            out.append(f"fitting without the largest {sym} ({num(e['held_out'])}) predicts {num(e['predicted'])} "
                       f"there against {num(e['observed'])} observed ({pct(e['rel_error'])})")
    text = "; ".join(out)
    return text[:1].upper() + text[1:] + "."


def _summary_of_fit(name: str, entry: dict) -> str:
    label = {"loss_vs_params": "Validation loss vs trainable parameters",
             "loss_vs_data": "Validation loss vs training stimuli",
             "loss_joint": "The joint law of loss in parameters and data",
             "image_error_vs_params": "Image retrieval error (1 − top-1) vs parameters",
             "brain_error_vs_params": "Brain retrieval error (1 − top-1) vs parameters"}[name]
    if entry.get("status") != "ok":
        return f"{label} was not fitted: {entry['warnings'][0].removeprefix('not fitted: ')}."
    exps = [p for p in _param_names(name) if p in SYMBOL]
    spread = entry["n_sizes"] if isinstance(entry["n_sizes"], int) else " × ".join(map(str, entry["n_sizes"]))
    decades = entry["decades"] if isinstance(entry["decades"], list) else [entry["decades"]]
    fixed = [f"{AXIS_SYMBOL[k]} = {num(v)}" for k, v in (entry.get("slice") or {}).items() if v is not None]
    # A one-axis fit on a slice of a two-axis sweep: E then holds the other axis's term too.
    where = f" (all at {fixed[0]}, so E includes that axis's term)" if fixed else ""
    verdict = (" The data support this exponent." if entry["supported"] else
               " The data do not support it as a scaling claim (see below).")
    return (f"{label}, `{entry['form']}`: " + ", ".join(_with_ci(entry, p) for p in exps)
            + f", E = {num(entry['E'])}, from {entry['n_runs']} runs at {spread} sizes{where} spanning "
            + " and ".join(f"{d:.2f}" for d in decades) + " decades. " + _extrapolation_sentence(entry) + verdict)


def _summary(report: dict) -> list[str]:
    fits = report["fits"]
    lines = ["## Summary", ""]
    for name in fits:
        lines += [_summary_of_fit(name, fits[name]), ""]
    fitted = report["compute_frontier"]["fitted"]
    if fitted:
        lines += [f"At fixed training compute the joint fit puts the optimal model size at "
                  f"N_opt ∝ C^{num(fitted['n_opt_exponent'])} (and stimuli at D_opt ∝ C^"
                  f"{num(fitted['d_opt_exponent'])}), taking C = κ·N·D with κ = {num(fitted['kappa'])} "
                  "measured from the runs"
                  + ("." if fitted["within_sweep_fraction"] == 1 else
                     f"; {100 * (1 - fitted['within_sweep_fraction']):.0f}% of that curve (dotted in the figure) "
                     "asks for an N or D outside the sweep's range and is an extrapolation."), ""]
    lines += ["Retrieval is bounded (top-1 in [0, 1]), so its fits are on the error rate 1 − top-1; no "
              "standard scaling form exists for retrieval, and fitting the error rate as a power law is "
              "our inference, not an established law.", ""]
    trials = report["trials"]
    has_ridge = any(r["ridge_image_top1"] is not None or r["ridge_brain_top1"] is not None for r in trials)
    if report["below_ridge"]:
        lines += [f"**{len(report['below_ridge'])} of {len(trials)} trial(s) below the ridge baseline** on "
                  f"the same data ({', '.join(report['below_ridge'])}); they are in the fits, but a model that "
                  "loses to ridge regression says little about scale.", ""]
    elif has_ridge:
        lines += ["Every trial beats the ridge baseline on the same data's validation split.", ""]
    else:
        lines += ["No ridge baseline was recorded, so the report cannot check that every trial learns.", ""]
    return lines


def _fit_section(name: str, entry: dict) -> list[str]:
    lines = [f"### {name}: `{entry['form']}`", ""]
    if entry.get("status") != "ok":
        return lines + [f"Not fitted: {entry['warnings'][0].removeprefix('not fitted: ')}.", ""]
    lines += ["| parameter | estimate | 95% CI low | 95% CI high |", "|---|---|---|---|"]
    for p in _param_names(name):
        lo, hi = entry[f"{p}_ci95"]
        lines.append(f"| {p} | {num(entry[p])} | {num(lo)} | {num(hi)} |")
    sl = ", ".join(f"{AXIS_SYMBOL[k]} = {num(v)}" for k, v in (entry.get("slice") or {}).items() if v is not None)
    lines += ["", f"Runs {entry['n_runs']} · sizes {entry['n_sizes']} · decades "
              + (", ".join(f"{d:.2f}" for d in entry["decades"]) if isinstance(entry["decades"], list)
                 else f"{entry['decades']:.2f}")
              + (f" · runs at {sl}" if sl else "")
              + f" · bootstrap {entry['bootstrap']} requested, {entry['bootstrap_used']} used"
              + f" · initialisations {entry['n_inits']} ({entry['n_inits_converged']} converged)"
              + f" · converged {num(entry['converged'])}", ""]
    ex = entry["extrapolation"]
    items = ex.items() if len(entry["axes"]) == 2 else [(AXIS_SYMBOL[entry["axes"][0]], ex)]
    lines += ["| held out (largest) | predicted | observed | relative error |", "|---|---|---|---|"]
    for sym, e in items:
        if e is None:
            lines.append(f"| {sym}: too few sizes | – | – | – |")
        else:
            lines.append(f"| {sym} = {num(e['held_out'])} | {num(e['predicted'])} | {num(e['observed'])} | "
                         f"{pct(e['rel_error'])} |")
    return lines + [""]


def _support(report: dict) -> list[str]:
    lines = ["## What the data can and cannot support", "",
             "A fitted exponent counts as supported when the fit converged, each axis has at least 5 sizes "
             "over at least 1.5 decades, the exponent's 95% CI stays above 0 and is narrower than the "
             "exponent, and the fit without the largest size predicts it within 10%. Each fit's other "
             "caveats follow it.", ""]
    for name, entry in report["fits"].items():
        if entry.get("status") != "ok":
            why = entry["warnings"][0].removeprefix("not fitted: ")
            lines.append(f"- **{name}: not fitted.** {why[:1].upper() + why[1:]}.")
            continue
        exps = [p for p in _param_names(name) if p in SYMBOL]
        if entry["supported"]:
            lines.append(f"- **{name}: supported.** " + "; ".join(_with_ci(entry, p) for p in exps) + ".")
        else:
            lines.append(f"- **{name}: not supported** as a scaling claim: "
                         + "; ".join(entry["not_supported_because"]) + ".")
        lines += [f"  - {w}" for w in entry["warnings"]]
    for note in report["data_notes"]:
        lines.append(f"- **data**: {note}")
    reason = report["compute_frontier"]["fitted_reason"]
    if reason:
        lines.append(f"- **compute frontier**: no fitted N_opt(C): {reason}.")
    return lines + [""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _trials(report: dict) -> list[str]:
    rows = [[r["trial_id"], num(r["params"]), num(r["data_size"]), num(r["samples_seen"]), num(r["flops"]),
             num(r["lr"]), num(r["val_loss"]), num(r["val_image_top1"]), num(r["val_brain_top1"]),
             num(r["ridge_image_top1"]), num(r["ridge_brain_top1"]), num(r["seed"]), "; ".join(r["flags"]) or "–",
             " ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "–"] for r in report["trials"]]
    header = ["trial", "N", "D", "samples seen", "FLOPs", "lr", "val loss", "image top-1", "brain top-1",
              "ridge image", "ridge brain", "seed", "flags", "overrides"]
    return ["## Trials", ""] + _table(header, rows) + [""]


def _lr_search(report: dict) -> list[str]:
    lines = ["## LR search (the search itself)", ""]
    if not report["lr_search"]:
        return lines + ["No LR-search rows in results.jsonl.", ""]
    rows = [[r["trial_id"], num(r["params"]), num(r["data_size"]), num(r["lr"]), num(r["samples_seen"]),
             num(r["rung"]), num(r["val_loss"]), r["status"] or "–", "**yes**" if r["chosen"] else ""]
            for r in report["lr_search"]]
    header = ["trial", "N", "D", "lr", "samples seen", "rung", "val loss", "status", "used by the final run"]
    return lines + _table(header, rows) + [""]


def _frontier(report: dict) -> list[str]:
    cf = report["compute_frontier"]
    rows = [[p["trial_id"], num(p["flops"]), num(p["val_loss"]), num(p["params"]), num(p["data_size"])]
            for p in cf["points"]]
    lines = ["## Compute frontier", ""]
    if not rows:
        return lines + ["No run records training FLOPs, so there is no frontier.", ""]
    lines += ["Runs no cheaper run beats (lower envelope of loss vs FLOPs):", ""]
    lines += _table(["trial", "FLOPs", "val loss", "N", "D"], rows) + [""]
    if cf["fitted"]:
        f = cf["fitted"]
        lines += [f"Fitted: N_opt ∝ C^{num(f['n_opt_exponent'])}, D_opt ∝ C^{num(f['d_opt_exponent'])}, "
                  f"κ = {num(f['kappa'])} (runs span {num(f['kappa_range'][0])} to {num(f['kappa_range'][1])}).", ""]
    return lines


def render_markdown(report: dict) -> str:
    """The whole report.md."""
    name = report["sweep"]["name"] or Path(report["sweep"]["dir"]).name
    s = report["settings"]
    trials = report["trials"]
    intro = (f"{len(trials)} final trials ({len({r['params'] for r in trials})} model sizes × "
             f"{len({r['data_size'] for r in trials})} data sizes) and {len(report['lr_search'])} LR-search rows "
             f"from `{report['sweep']['dir']}/results.jsonl`. Fits: {s['objective']}; {s['optimizer']}. "
             f"95% CIs: {s['ci']}, {s['bootstrap']} resamples (seed {s['seed']}). Every number here is in "
             "report.json, unrounded.")
    lines = [f"# Scaling report: {name}", "", intro, ""] + _summary(report)
    lines += ["## Fits", ""]
    for fit_name, entry in report["fits"].items():
        lines += _fit_section(fit_name, entry)
    lines += _support(report) + _frontier(report) + _trials(report) + _lr_search(report)
    lines += ["## Figures", ""]
    for fig, file in report.get("figures", {}).items():
        lines += [f"![{fig.replace('_', ' ')}]({file})", "", f"*{FIGURE_CAPTIONS[fig]}*", ""]
    return "\n".join(lines)
