"""The recipe study of issue #10: ablation grids on tuning members, judged on the validation split.

Each variant trains through the real trainer (``launchers/train.py`` in a child process, one
rank) with key=value overrides on top of a base config, validates on the member's val split
during training, and is compared with ridge (fit on train, alpha chosen on val, scored on val)
and the Bayes ceiling of the same val rows (``retrieval_ceiling_val`` in meta.json). The best
validation step stands in for ``checkpoint.select=best``; the final checkpoint is also scored
on (a 300-way sample of) the train split to see over- or under-fitting.

    python -m mindeye_dist.recipe_study --out /tmp/family/study --members tune-a tune-b \
        --grid base= wide=model.hidden_dim=1024 cold=loss.bimixco_temp=0.05,loss.softclip_temp_start=0.05

Results are appended to OUT/study.jsonl (a variant already there is not run again) and the
table is rewritten to OUT/study.md after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]


def member_data(name: str, root: str | Path) -> str:
    """The dataset of family member ``name`` (or ``demo``) under ``root``, built once."""
    from mindeye_dist.data.meta import META_NAME

    url = str(Path(root) / name)
    if not (Path(url) / META_NAME).exists():
        if name == "demo":
            from mindeye_dist.data import build_synthetic_dataset

            build_synthetic_dataset("demo", url, 0, progress=False, overwrite=True)
            _add_val_ceiling_for_demo(url)
        else:
            from mindeye_dist.data.family import build_family_dataset

            build_family_dataset(name, url, progress=False, overwrite=True)
    return url


def _add_val_ceiling_for_demo(url: str) -> None:
    """The demo preset's builder records only the test ceiling; add the val rows' one for the study."""
    from mindeye_dist.data.synthetic import SyntheticSubject
    from mindeye_dist.data.writer import carve_validation

    path = Path(url) / "meta.json"
    meta = json.loads(path.read_text())
    subject = SyntheticSubject("demo", 0)
    _, val_rows = carve_validation(subject.spec.n_train, meta["val"]["fraction"], meta["val"]["seed"])
    meta["retrieval_ceiling_val"] = dict(subject.retrieval_ceiling("train", rows=val_rows), split="val")
    path.write_text(json.dumps(meta, indent=2))


def ridge_on_val(url: str, cache_dir: Path) -> dict:
    """Ridge fit on train, alpha chosen on val, scored on val (cached per dataset)."""
    cache = cache_dir / f"ridge_val_{Path(url).name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from mindeye_dist.config import DataConfig
    from mindeye_dist.evaluate import ridge_for_data

    res = ridge_for_data(DataConfig(url=url, num_workers=0), "val", way=300, loops=30, seed=0)
    out = {k: res[k] for k in ("image_top1", "brain_top1", "way", "alpha")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def _val_history(run_dir: Path) -> list[dict]:
    rows = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if "val/image_top1" in rec:
                rows.append({"step": rec["step"], "image": rec["val/image_top1"], "brain": rec["val/brain_top1"]})
    return rows


def train_variant(url: str, run_dir: Path, overrides: list[str], config: Optional[str], threads: int = 1) -> float:
    """Train one variant in a child process (one rank); returns wall seconds. Raises on failure."""
    cmd = [sys.executable, "launchers/train.py"] + (["--config", config] if config else [])
    cmd += [f"data.url={url}", f"run.dir={run_dir}", "log.progress=\"off\"", "log.tensorboard=false", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"training failed (exit {rc}); see {run_dir.parent / (run_dir.name + '.log')}")
    return time.perf_counter() - t


def score_variant(url: str, run_dir: Path) -> dict[str, Any]:
    """Best and last val retrieval from the run's log, and the final model's train-split retrieval."""
    from mindeye_dist.evaluate import evaluate_run

    hist = _val_history(run_dir)
    best = max(hist, key=lambda r: (r["image"] + r["brain"]) / 2)
    train = evaluate_run(str(run_dir), url, "train", None, 300, 5, 0)["retrieval"]
    return {"best": best, "last": hist[-1], "history": hist,
            "train_last": {"image": train["image_top1"], "brain": train["brain_top1"]}}


def run_grid(members: list[str], grid: dict[str, list[str]], out: Path, data_root: Path, config: Optional[str],
             common: list[str]) -> list[dict]:
    """Every variant of ``grid`` on every member; results appended to OUT/study.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["member"], r["variant"]) for r in _read(out / "study.jsonl")}
    for member in members:
        url = member_data(member, data_root)
        ridge = ridge_on_val(url, out)
        meta = json.loads((Path(url) / "meta.json").read_text())
        for variant, overrides in grid.items():
            if (member, variant) in done:
                continue
            run_dir = out / "runs" / f"{member}__{variant}"
            seconds = train_variant(url, run_dir, [*common, *overrides], config)
            rec = {"member": member, "variant": variant, "overrides": [*common, *overrides], "minutes": seconds / 60,
                   "ridge": ridge, "ceiling": {k: meta["retrieval_ceiling_val"][k] for k in ("image_top1", "brain_top1")},
                   **score_variant(url, run_dir)}
            with open(out / "study.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            write_table(out)
    return _read(out / "study.jsonl")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_table(out: Path) -> str:
    """OUT/study.md: one row per (member, variant), val top-1 next to ridge and the ceiling."""
    lines = ["| member | variant | ridge img/brain | best val img/brain (step) | last val img/brain | train img/brain "
             "| ceiling img/brain | best ÷ ceiling | min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in _read(out / "study.jsonl"):
        b, last, tr, rg, c = r["best"], r["last"], r["train_last"], r["ridge"], r["ceiling"]
        lines.append(
            f"| {r['member']} | {r['variant']} | {rg['image_top1']:.3f} / {rg['brain_top1']:.3f} | "
            f"{b['image']:.3f} / {b['brain']:.3f} ({b['step']}) | {last['image']:.3f} / {last['brain']:.3f} | "
            f"{tr['image']:.3f} / {tr['brain']:.3f} | {c['image_top1']:.3f} / {c['brain_top1']:.3f} | "
            f"{b['image'] / c['image_top1']:.2f} / {b['brain'] / c['brain_top1']:.2f} | {r['minutes']:.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "study.md").write_text(text)
    return text


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``name=k1=v1,k2=v2`` -> {name: ["k1=v1", "k2=v2"]}; ``name=`` is the base."""
    grid = {}
    for item in items:
        name, _, rest = item.partition("=")
        grid[name] = [kv for kv in rest.split(",") if kv]
    return grid


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default="/tmp/family/data")
    p.add_argument("--members", nargs="+", required=True)
    p.add_argument("--config", default=None, help="base YAML (default: the library defaults)")
    p.add_argument("--common", nargs="*", default=[], help="overrides for every variant")
    p.add_argument("--grid", nargs="+", required=True, help="name=key=value,key=value ...")
    args = p.parse_args(argv)
    run_grid(args.members, parse_grid(args.grid), Path(args.out), Path(args.data_root), args.config, args.common)
    print(write_table(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
