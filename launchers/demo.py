"""The end-to-end demo: build the synthetic subject, train on every local accelerator, evaluate.

    make demo                                        # = the next line, inside .venv
    python launchers/demo.py --out demo_out --data-url demo_out/data
    python launchers/demo.py --out demo_out --data-url s3://bucket/demo    # endpoint: AWS_ENDPOINT_URL
    python launchers/demo.py --out demo_out --seed 1 --fresh               # another synthetic subject
    python launchers/demo.py --out demo_out train.max_steps=200            # key=value overrides the YAML

What it runs, step by step (each is also a command of its own):

1. ``python launchers/prepare_data.py synthetic --preset demo --out DATA_URL`` if DATA_URL has no
   meta.json yet; then counts, shapes, the synthetic ceiling and a streaming read-back (samples/s
   of the training loader over the train split).
2. ``deepspeed --num_accelerators N launchers/train.py --ds_config ds_configs/zero2.json
   --config launchers/configs/demo.yaml data.url=DATA_URL run.dir=OUT/run`` on every local
   accelerator (N = CUDA devices; on a CPU host, 2 CPU ranks). Validation retrieval runs on the
   val split during training; the test split is only touched in step 3.
3. ``python launchers/evaluate.py --run OUT/run --split test --baseline ridge``: 300-way top-1
   retrieval over 30 random subsets, next to chance, the ridge baseline and the ceiling.
4. ``python launchers/reconstruct.py --run OUT/run --generator synthetic --sampler ddim --best-of 8
   --limit 100 --out OUT/recon/model`` (and ``--shuffle-brain``, ``--brain ridge``): the first
   ``--recon-n`` test stimuli reconstructed by the same code path as on NSD (prior samples ->
   the synthetic subject's renderer, img2img 0.85 from the low-level head's blurry image,
   best-of-k), next to two floors: a shuffled-brain control and the ridge baseline; then the
   eight metrics of ``evaluate.py --recon`` for each. Without ``--metrics-weights`` the feature
   networks are randomly initialised (AlexNet; on a GPU all five) and CLIP is the synthetic
   subject's own target map: those columns rank the rows of this table, nothing more.

The tables go to stdout and to OUT/demo_results.json; OUT/recon/report.md shows the grid.
Running the demo again with the same ``--out`` resumes (or, if finished, just re-evaluates) the
run in OUT/run and reuses finished reconstructions; ``--fresh`` restarts both.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindeye_dist.config import ConfigError, load_config  # noqa: E402
from mindeye_dist.distributed import deepspeed_cmd, free_port, local_ranks  # noqa: E402




def prepare(data_url: str, seed: int, s3_endpoint: str | None, micro_batch_size: int, num_workers: int) -> dict:
    """Build the dataset if missing; print counts, shapes, ceiling and a read-back rate."""
    from mindeye_dist.config import DataConfig
    from mindeye_dist.data import build_synthetic_dataset, build_train_loader, read_meta
    from mindeye_dist.data.meta import META_NAME
    from mindeye_dist.data.storage import Storage

    t0 = time.perf_counter()
    built = not Storage(data_url, s3_endpoint).exists(META_NAME)
    if built:
        print(f"== building the synthetic demo subject (seed {seed}) at {data_url}", flush=True)
        cmd = f"python launchers/prepare_data.py synthetic --preset demo --out {data_url} --seed {seed}"
        build_synthetic_dataset("demo", data_url, seed, s3_endpoint=s3_endpoint, command=cmd, progress=False)
    else:
        print(f"== using the dataset already at {data_url} (delete it to rebuild)", flush=True)
    meta = read_meta(data_url, s3_endpoint=s3_endpoint)
    build_s = time.perf_counter() - t0
    source = meta.raw.get("source", {})
    if built is False and source.get("kind") == "synthetic" and source.get("seed") != seed:
        print(f"   note: that dataset was built with seed {source.get('seed')}, not --seed {seed}")
    counts = ", ".join(f"{name} {s.count}" for name, s in meta.splits.items())
    reps = meta.splits["train"].reps if "train" in meta.splits else None  # voxels are (reps, V)
    shapes = ", ".join(f"{name} {tuple(reps if d is None else d for d in spec['shape'])} {spec['dtype']}"
                       for name, spec in meta.raw.get("fields", {}).items() if "shape" in spec)
    print(f"   samples: {counts}; {meta.n_voxels} voxels, targets {meta.n_tokens}x{meta.token_dim}")
    print(f"   fields per sample: {shapes}")

    # Streaming read-back through the real training loader: z-scoring, repetitions, batching.
    cfg = DataConfig(url=data_url, s3_endpoint=s3_endpoint or "", num_workers=num_workers)
    loader = build_train_loader(cfg, micro_batch_size, seed=0, rank=0, world_size=1)
    t = time.perf_counter()
    n = 0
    for batch in loader.epoch_batches(0):
        n += len(batch)
    read_s = time.perf_counter() - t
    rate = n / read_s
    print(f"   read-back: one train epoch, {n} samples in {read_s:.1f} s = {rate:.0f} samples/s "
          f"(batch {micro_batch_size}, {num_workers} worker(s)); batches of voxels {tuple(batch.voxels.shape)}, "
          f"targets {tuple(batch.targets.shape)}")
    ceiling = meta.raw.get("retrieval_ceiling")
    if ceiling:
        print(f"   ceiling ({ceiling['way']}-way, {ceiling['split']}): image top-1 {ceiling['image_top1']:.3f}, "
              f"brain top-1 {ceiling['brain_top1']:.3f}")
    return {"built": built, "build_s": build_s, "readback_samples_per_s": rate, "counts": {k: s.count for k, s in meta.splits.items()},
            "readback_s": read_s}


def train(args, run_dir: Path, overrides: list[str]) -> tuple[int, list[str], float]:
    """Run the deepspeed launcher on every local accelerator; (return code, command, seconds)."""
    n, kind = local_ranks()
    cmd = [*deepspeed_cmd(), "--num_accelerators", str(n), "--master_port", str(free_port()),
           "launchers/train.py", "--ds_config", args.ds_config, "--config", args.config,
           f"data.url={args.data_url}", f"run.dir={run_dir}", f"run.seed={args.seed}", *overrides]
    print(f"== training on {n} {kind} rank(s)\n   {shlex.join(cmd)}", flush=True)
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO)  # launchers/train.py splits the cores between the ranks
    return rc, cmd, time.perf_counter() - t


def table(res: dict) -> tuple[str, dict]:
    """The results table (text) and its JSON form."""
    ours, ridge = res["retrieval"], res["baselines"]["ridge"]
    ceiling = res.get("ceiling")
    rows = {"chance": {"image_top1": res["chance"], "brain_top1": res["chance"]},
            "ridge baseline": {k: ridge[k] for k in ("image_top1", "brain_top1")},
            "mindeye_dist (ours)": {k: ours[k] for k in ("image_top1", "brain_top1")}}
    if ceiling:
        rows["ceiling (best possible)"] = {k: ceiling[k] for k in ("image_top1", "brain_top1")}
        rows["ours / ceiling"] = {k: ours[k] / ceiling[k] for k in ("image_top1", "brain_top1")}
        rows["ridge / ceiling"] = {k: ridge[k] / ceiling[k] for k in ("image_top1", "brain_top1")}
    lines = [f"{'':24s}{'image top-1':>12s}{'brain top-1':>14s}"]
    for name, r in rows.items():
        digits = 2 if "/" in name else 3  # ratios to 2 places, accuracies to 3
        lines.append(f"{name:24s}{r['image_top1']:>12.{digits}f}{r['brain_top1']:>14.{digits}f}")
    return "\n".join(lines), rows


def reconstruct_step(args, out: Path, run_dir: Path, split: str) -> dict:
    """Step 4: reconstructions of ours, the shuffled-brain control and the ridge floor; the metrics."""
    import torch

    from mindeye_dist.reconstruct import ReconstructConfig, build_feature_networks, evaluate_recon_dir, metrics_table, \
        reconstruct, write_report
    from mindeye_dist.reconstruct.report import renderer_for_dir

    common = dict(split=split, generator="synthetic", sampler="ddim", steps=20, best_of=args.recon_best_of,
                  img2img_strength=0.85, limit=args.recon_n, batch_size=25, progress=False)
    rows = {"mindeye_dist (ours)": ReconstructConfig(out=str(out / "recon/model"), run=str(run_dir), **common),
            "shuffled-brain control": ReconstructConfig(out=str(out / "recon/shuffled"), run=str(run_dir),
                                                        shuffle_brain=True, **common),
            "ridge baseline": ReconstructConfig(out=str(out / "recon/ridge"), brain="ridge", data_url=args.data_url, **common)}
    print(f"== reconstructing the first {args.recon_n} test stimuli (prior DDIM 20 -> synthetic renderer, img2img 0.85, "
          f"best of {args.recon_best_of}): ours, a shuffled-brain control, the ridge baseline", flush=True)
    t = time.perf_counter()
    summaries = {name: reconstruct(cfg) for name, cfg in rows.items()}
    recon_s = time.perf_counter() - t
    gpu = torch.cuda.is_available()
    subset = None if args.metrics_weights or gpu else ("alexnet", "clip")
    nets = build_feature_networks(args.metrics_weights or "random", "cuda" if gpu else "cpu", networks=subset,
                                  renderer=renderer_for_dir(out / "recon/model"))
    for name in ("inception", "effnet", "swav"):
        if isinstance(nets[name], str) and subset:  # the reason the table shows
            nets[name] = ("skipped in the CPU demo: random-init InceptionV3 / EfficientNet-B1 / ResNet-50 at MindEye's "
                          "input sizes take minutes on 2 cores; `python launchers/evaluate.py --recon "
                          f"{out / 'recon/model'} --metrics-weights random` (or a weights folder) computes them")
    t = time.perf_counter()
    metrics = {name: evaluate_recon_dir(cfg.out, feature_networks=nets, report=False) for name, cfg in rows.items()}
    metrics_s = time.perf_counter() - t
    report = write_report(out / "recon", metrics, title="Reconstructions of the synthetic demo subject", grid="model/grid.png",
                          extra=["rows: ours = the trained run (prior samples -> synthetic renderer); shuffled-brain = "
                                 "each stimulus reconstructed from another stimulus's voxels; ridge = linear voxels -> tokens "
                                 "and voxels -> VAE latents, same renderer, no prior"])
    print("\n" + metrics_table(metrics) + "\n")
    for line in (out / "recon/report.md").read_text().splitlines():
        if line.startswith("- "):
            print("   " + line[2:])
    timing = summaries["mindeye_dist (ours)"]["timing"]
    return {"metrics": metrics, "report": str(report), "grid": str(out / "recon/model/grid.png"), "recon_s": recon_s,
            "metrics_s": metrics_s, "timing_ours": timing, "dirs": {name: cfg.out for name, cfg in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="demo directory: run/, demo_results.json (local)")
    p.add_argument("--data-url", default=None, help="dataset URL: local path or s3://bucket/prefix (default OUT/data)")
    p.add_argument("--config", default="launchers/configs/demo.yaml", help="experiment YAML")
    p.add_argument("--ds-config", default="ds_configs/zero2.json", help="DeepSpeed JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic subject (if built) and of training")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--fresh", action="store_true", help="delete OUT/run and OUT/recon first instead of resuming them")
    p.add_argument("--recon-n", type=int, default=100, help="test stimuli to reconstruct (0: skip step 4)")
    p.add_argument("--recon-best-of", type=int, default=8, help="candidates per stimulus (MindEye1: 16)")
    p.add_argument("--metrics-weights", help="folder of the metric networks' weights (default: random init, see step 4)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for training, e.g. train.max_steps=200")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    run_dir = out / "run"
    args.data_url = args.data_url or str(out / "data")
    if "://" not in args.data_url:
        args.data_url = str(Path(args.data_url).resolve())  # the launcher runs from the repo root
    overrides = list(args.overrides) + ([f"data.s3_endpoint={args.s3_endpoint}"] if args.s3_endpoint else [])
    try:  # fail on a bad config here, not after building data
        cfg = load_config(REPO / args.config if not Path(args.config).is_absolute() else args.config,
                          [f"data.url={args.data_url}", f"run.dir={run_dir}", *overrides])
    except ConfigError as err:
        print(f"demo: config error: {err}", file=sys.stderr)
        return 2
    if args.fresh:
        for stale in (run_dir, out / "recon"):
            if stale.exists():
                shutil.rmtree(stale)

    data = prepare(args.data_url, args.seed, args.s3_endpoint, cfg.train.micro_batch_size, max(1, cfg.data.num_workers))
    rc, cmd, train_s = train(args, run_dir, overrides)
    if rc != 0:
        print(f"demo: training failed (exit code {rc}); logs in {run_dir / 'logs'}", file=sys.stderr)
        return rc if 0 < rc < 256 else 1

    print("== evaluating the test split (300-way, 30 loops) with the ridge baseline", flush=True)
    from mindeye_dist.evaluate import evaluate_run

    t = time.perf_counter()
    res = evaluate_run(str(run_dir), None, cfg.data.test_split, None, 300, 30, 0, "ridge")  # with meta.json's ceiling
    eval_s = time.perf_counter() - t
    text, rows = table(res)
    print("\n" + text + "\n")
    recon = reconstruct_step(args, out, run_dir, cfg.data.test_split) if args.recon_n > 0 else None
    total_s = time.perf_counter() - t_start

    rel_cfg = os.path.relpath(args.config, REPO) if Path(args.config).is_absolute() else args.config
    commands = {
        "resume": shlex.join(cmd),
        "evaluate": f"python launchers/evaluate.py --run {run_dir} --split test --baseline ridge --out {out / 'metrics.json'}",
        "export": f"python launchers/export.py --run {run_dir} --out {out / 'weights.safetensors'}",
        "tensorboard": f"tensorboard --logdir {run_dir / 'tb'}",
        "reconstruct": f"python launchers/reconstruct.py --run {run_dir} --generator synthetic --sampler ddim "
                       f"--best-of {args.recon_best_of} --limit {args.recon_n} --out {out / 'recon/model'}",
        "recon_metrics": f"python launchers/evaluate.py --recon {out / 'recon/model'} --metrics-weights random",
    }
    times = {"build_s": data["build_s"], "readback_s": data["readback_s"], "train_s": train_s, "eval_s": eval_s,
             "recon_s": recon["recon_s"] if recon else 0.0, "recon_metrics_s": recon["metrics_s"] if recon else 0.0,
             "total_s": total_s}
    result = {"table": rows, "evaluation": res, "reconstruction": recon, "data": data, "times": times,
              "run_dir": str(run_dir), "data_url": args.data_url, "config": rel_cfg, "seed": args.seed,
              "overrides": overrides, "tensorboard": str(run_dir / "tb"), "commands": commands}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wall time: build {data['build_s']:.0f} s, read-back {data['readback_s']:.0f} s, train {train_s:.0f} s, "
          f"eval {eval_s:.0f} s, reconstruct {times['recon_s']:.0f} s, recon metrics {times['recon_metrics_s']:.0f} s, "
          f"total {total_s:.0f} s")
    print(f"results:     {out / 'demo_results.json'}")
    print(f"TensorBoard: {commands['tensorboard']}")
    print(f"resume:      {commands['resume']}   (same run.dir resumes from checkpoints/latest)")
    print(f"evaluate:    {commands['evaluate']}")
    print(f"export:      {commands['export']}")
    if recon:
        print(f"reconstructions: {recon['report']} (grid {recon['grid']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
