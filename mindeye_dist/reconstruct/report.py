"""Metrics of a reconstruction directory (``evaluate.py --recon DIR``) and its markdown/HTML report."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Optional

import torch

from mindeye_dist.reconstruct import output as O
from mindeye_dist.reconstruct.metrics import LABELS, LOWER_IS_BETTER, METRICS, build_feature_networks, \
    reconstruction_metrics

REPORT_MD, REPORT_HTML = "report.md", "report.html"


def recon_dataset_source(recon_dir: str | os.PathLike) -> dict:
    """The ``source`` block of the dataset a reconstruction directory was made from ({} if unknown)."""
    path = Path(recon_dir) / O.CONFIG
    if not path.is_file():
        return {}
    return (json.loads(path.read_text()).get("dataset") or {}).get("source") or {}


def renderer_for_dir(recon_dir: str | os.PathLike):
    """The synthetic subject's renderer when the directory reconstructs a synthetic dataset, else None."""
    source = recon_dataset_source(recon_dir)
    if source.get("kind") != "synthetic":
        return None
    from mindeye_dist.data.render import SyntheticRenderer

    return SyntheticRenderer.from_meta(source)


def evaluate_recon_dir(recon_dir: str, weights: Optional[str] = None, *, device: str = "auto", networks=None,
                       clip_arch: Optional[str] = None, clip_model_config: Optional[str] = None, batch_size: int = 32,
                       feature_networks: Optional[dict] = None, report: bool = True) -> dict:
    """The eight metrics of ``recon_dir`` (its index.jsonl pairs), JSON-ready; writes report.md/html.

    ``weights``: see :func:`~mindeye_dist.reconstruct.metrics.build_feature_networks`; pass
    ``feature_networks`` (already built) to reuse them across directories.
    """
    seen, recon, entries = O.load_pairs(recon_dir)
    if feature_networks is None:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        feature_networks = build_feature_networks(weights, dev, networks=networks, renderer=renderer_for_dir(recon_dir),
                                                  clip_arch=clip_arch, clip_model_config=clip_model_config)
    result = reconstruction_metrics(seen, recon, feature_networks, batch_size)
    result["dir"] = str(recon_dir)
    config = Path(recon_dir) / O.CONFIG
    if config.is_file():
        result["settings"] = json.loads(config.read_text()).get("fingerprint")
    if report:
        result["report"] = str(write_report(Path(recon_dir), {"reconstructions": result}, title=f"Reconstructions: {recon_dir}"))
    return result


def _fmt(metric: str, value) -> str:
    if value is None:
        return "n/c"
    return f"{value:.1%}" if metric in ("alexnet2", "alexnet5", "inception", "clip") else f"{value:.3f}"


def metrics_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per named result, the eight columns in MindEye's order."""
    head = "| | " + " | ".join(LABELS[m] + ("↓" if m in LOWER_IS_BETTER else "↑") for m in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for name, res in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m, res.get(m)) for m in METRICS) + " |")
    return "\n".join(lines)


def _notes(rows: dict[str, dict]) -> list[str]:
    first = next(iter(rows.values()))
    notes = [f"N = {first.get('n')} stimuli; 2-way identification uses all N - 1 distractors (chance 50%); "
             "EffNet-B and SwAV are correlation distances (lower is better); n/c = not computed."]
    for net, desc in (first.get("feature_networks") or {}).items():
        notes.append(f"{net}: {desc}")
    for metric, reason in (first.get("not_computed") or {}).items():
        notes.append(f"{LABELS[metric]} not computed: {reason}")
    return notes


def write_report(out: Path, rows: dict[str, dict], title: str = "Reconstructions", grid: str = "grid.png",
                 extra: Optional[list[str]] = None) -> Path:
    """report.md and report.html in ``out``: the metrics table, notes and the grid (relative path)."""
    notes = _notes(rows) + list(extra or [])
    md = [f"# {title}", "", metrics_table(rows), ""] + [f"- {n}" for n in notes]
    if (out / grid).is_file():
        md += ["", f"![seen | blurry | reconstruction]({grid})"]
    (out / REPORT_MD).write_text("\n".join(md) + "\n")
    cells = "".join(f"<th>{html.escape(LABELS[m])}{'↓' if m in LOWER_IS_BETTER else '↑'}</th>" for m in METRICS)
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(m, r.get(m))}</td>" for m in METRICS) + "</tr>"
                   for name, r in rows.items())
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    image = f'<p><img src="{html.escape(grid)}" alt="seen | blurry | reconstruction"></p>' if (out / grid).is_file() else ""
    (out / REPORT_HTML).write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 8px;text-align:right}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><table><tr><th></th>{cells}</tr>{body}</table><ul>{items}</ul>{image}"
        "</body></html>\n")
    return out / REPORT_MD
