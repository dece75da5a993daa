"""The recipe for a new dataset, measured on synthetic subjects nobody tuned it on.

For each family member (default: the held-out ones, ``heldout-a`` ... ``heldout-h``): build its
dataset, train ``launchers/configs/default.yaml`` (``recipe: auto``) through the real
``deepspeed`` launcher on the local ranks, evaluate the best validation checkpoint on the test
split with ``evaluate.py``'s ridge baseline, and print one row: world settings, ridge, ours,
a reference decoder that knows the member's target map (``mindeye_dist/recipe_reference.py``),
the Bayes ceiling, ours / ceiling, minutes. ::

    python launchers/recipe_table.py --out recipe_out                   # every held-out member
    python launchers/recipe_table.py --out recipe_out --members heldout-a heldout-g
    python launchers/recipe_table.py --out recipe_out --members tune-a train.max_steps=300
    python launchers/recipe_table.py --out recipe_out --reference-only   # the knows-maps reference only

Rows go to OUT/table.jsonl as each member finishes, the table to OUT/table.md; running the same
command again skips members already in table.jsonl (and resumes an interrupted training run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindeye_dist.distributed import deepspeed_cmd, free_port, local_ranks  # noqa: E402

COLUMNS = ("member", "voxels", "informative", "tokens", "noise", "voxel_nl", "target_nl", "sessions", "clusters")


def run_member(name: str, out: Path, args, overrides: list[str]) -> dict:
    from mindeye_dist.data.family import build_family_dataset, get_member
    from mindeye_dist.data.meta import META_NAME
    from mindeye_dist.evaluate import evaluate_run

    member = get_member(name)
    data = out / "data" / name
    t0 = time.perf_counter()
    if not (data / META_NAME).exists():
        print(f"== {name}: building the dataset at {data}", flush=True)
        build_family_dataset(member, str(data), progress=False, overwrite=True,
                             command=f"python launchers/prepare_data.py synthetic --member {name} --out {data}")
    build_s = time.perf_counter() - t0
    run_dir = out / "runs" / name
    cmd = [*deepspeed_cmd(), "--num_accelerators", str(args.ranks), "--master_port", str(free_port()),
           "launchers/train.py", "--ds_config", args.ds_config, "--config", args.config,
           f"data.url={data}", f"run.dir={run_dir}", *overrides]
    print(f"== {name}: training\n   {shlex.join(cmd)}", flush=True)
    log_path = out / "runs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log_path, "ab") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    train_s = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"{name}: training exited {rc}; see {log_path}")
    t = time.perf_counter()
    res = evaluate_run(str(run_dir), None, "test", None, 300, 30, 0, "ridge")
    eval_s = time.perf_counter() - t
    reference = member_reference(name)
    ours, ridge, ceiling = res["retrieval"], res["baselines"]["ridge"], res.get("ceiling") or {}
    settings = member.settings()
    cfg_text = (run_dir / "config.yaml").read_text()
    row = {"member": name, "role": member.role, "blend": _blend(run_dir, res.get("checkpoint")), **{k: settings[k] for k in settings if k != "n_train"},
           "n_train": settings["n_train"], "checkpoint": res.get("checkpoint"),
           "ridge": [ridge["image_top1"], ridge["brain_top1"]], "ours": [ours["image_top1"], ours["brain_top1"]],
           "ceiling": [ceiling.get("image_top1"), ceiling.get("brain_top1")],
           "reference": [reference["image_top1"], reference["brain_top1"]], "reference_latent_r2": reference["latent_r2"],
           "train_min": train_s / 60, "total_min": (build_s + train_s + eval_s) / 60,
           "command": shlex.join(cmd), "config_sha": hashlib.sha256(cfg_text.encode()).hexdigest()[:12]}
    return row


def _blend(run_dir: Path, tag) -> float | None:
    """β of the evaluated checkpoint's ridge skip (model.ridge_skip_rank; None without one)."""
    from mindeye_dist.checkpoint import model_states_file, safe_torch_load

    if not tag:
        return None
    states = safe_torch_load(model_states_file(run_dir / "checkpoints" / str(tag)), mmap=True)["module"]
    value = states.get("model.ridge_skip.blend")
    return None if value is None else float(value)


def member_reference(name: str) -> dict:
    """The decoder that knows the member's target map (mindeye_dist.recipe_reference), on the test split."""
    from mindeye_dist.data.family import get_member
    from mindeye_dist.recipe_reference import latent_ridge_reference

    return latent_ridge_reference(get_member(name))


def references(members: list[str], out: Path) -> int:
    """Only the knows-maps reference (seconds to minutes per member, no training), to OUT/references.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "references.jsonl", "a") as f:
        for name in members:
            t = time.perf_counter()
            ref = member_reference(name)
            f.write(json.dumps({"member": name, **ref}) + "\n")
            print(f"== {name}: knows-maps reference {ref['image_top1']:.3f} / {ref['brain_top1']:.3f} "
                  f"(latent R2 {ref['latent_r2']:.3f}, {time.perf_counter() - t:.0f} s)", flush=True)
    return 0


def _pair(values) -> str:
    return f"{values[0]:.3f} / {values[1]:.3f}" if values else "-"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def markdown(rows: list[dict]) -> str:
    head = ("| member | voxels | informative | tokens | noise | voxel / target nonlin. | sessions | clusters | "
            "ridge img / brain | ours img / brain | knows-maps ref. img / brain | ceiling img / brain | ours ÷ ceiling | "
            "beats ridge | ridge blend β | train min |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        beats = all(o >= g for o, g in zip(r["ours"], r["ridge"]))
        lines.append(
            f"| {r['member']} | {r['voxels']} | {r['informative']:.2f} | {r['tokens']} | {r['noise']} | "
            f"{r['voxel_nl']} / {r['target_nl']} | {r['sessions']} | {r['clusters']} | "
            f"{r['ridge'][0]:.3f} / {r['ridge'][1]:.3f} | {r['ours'][0]:.3f} / {r['ours'][1]:.3f} | "
            f"{_pair(r.get('reference'))} | "
            f"{r['ceiling'][0]:.3f} / {r['ceiling'][1]:.3f} | "
            f"{_ratio(r['ours'][0], r['ceiling'][0])} / {_ratio(r['ours'][1], r['ceiling'][1])} | "
            f"{'yes' if beats else 'NO'} | {'-' if r.get('blend') is None else format(r['blend'], '.1f')} | "
            f"{r['train_min']:.1f} |")
    if rows:
        import statistics

        img = statistics.median(r["ours"][0] / r["ceiling"][0] for r in rows if r["ceiling"][0])
        brain = statistics.median(r["ours"][1] / r["ceiling"][1] for r in rows if r["ceiling"][1])
        wins = sum(all(o >= g for o, g in zip(r["ours"], r["ridge"])) for r in rows)
        lines.append("")
        lines.append(f"Median ours ÷ ceiling: image {img:.2f}, brain {brain:.2f}; at or above ridge in both "
                     f"directions on {wins} of {len(rows)} members. 300-way top-1 on the test split (1,000 stimuli, "
                     f"30 random subsets), best validation checkpoint. The knows-maps reference is ridge from the "
                     f"averaged voxels to the true latents, put through the member's own target map "
                     f"(mindeye_dist/recipe_reference.py): what a decoder given the world's structure gets from "
                     f"these trials.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mindeye_dist.data.family import HELD_OUT

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (datasets, runs, table)")
    parser.add_argument("--members", nargs="+", default=list(HELD_OUT), help="family members (default: held-out)")
    parser.add_argument("--config", default="launchers/configs/default.yaml")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", default="ds_configs/zero2.json")
    parser.add_argument("--ranks", type=int, default=None, help="ranks per run (default: CUDA devices, else 2)")
    parser.add_argument("--reference-only", action="store_true",
                        help="no training: print the knows-maps reference of each member (OUT/references.jsonl)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args(argv)
    if args.reference_only:
        return references(args.members, Path(args.out))
    args.ranks = args.ranks or local_ranks()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "table.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()] if table.exists() else []
    done = {r["member"] for r in rows}
    for name in args.members:
        if name in done:
            print(f"== {name}: already in {table}", flush=True)
            continue
        try:
            row = run_member(name, out, args, list(args.overrides))
        except Exception as err:  # noqa: BLE001 - one member failing must not lose the others
            print(f"== {name}: FAILED: {err}", flush=True)
            continue
        rows.append(row)
        with open(table, "a") as f:
            f.write(json.dumps(row) + "\n")
        (out / "table.md").write_text(markdown(rows))
        print(f"== {name}: ridge {row['ridge'][0]:.3f} / {row['ridge'][1]:.3f}, ours {row['ours'][0]:.3f} / "
              f"{row['ours'][1]:.3f}, ceiling {row['ceiling'][0]:.3f} / {row['ceiling'][1]:.3f}, "
              f"train {row['train_min']:.1f} min", flush=True)
    order = {n: i for i, n in enumerate(args.members)}
    shown = sorted((r for r in rows if r["member"] in order), key=lambda r: order[r["member"]])
    text = markdown(shown)
    (out / "table.md").write_text(text)
    print(text)
    return 0 if len(shown) == len(args.members) else 1


if __name__ == "__main__":
    sys.exit(main())
