"""Evaluate a run: 300-way top-1 retrieval in both directions over 30 random subsets.

    python launchers/evaluate.py --run RUN_DIR --data URL --split test --out metrics.json \\
        [--checkpoint best|latest|step_0001000] [--save-predictions PRED.npy] [--baseline ridge]
    python launchers/evaluate.py --data URL --baseline ridge --out ridge.json   # no run needed
    python launchers/evaluate.py --run RUN_DIR --recon RECON_DIR --metrics-weights /w/metrics --out m.json
    python launchers/evaluate.py --recon RECON_DIR [--metrics-weights DIR|random]   # reconstruction metrics only

The metrics JSON has ``retrieval.image_top1`` and ``retrieval.brain_top1`` (repetitions averaged
at the input, as MindEye1 does); the predictions file holds the retrieval-submodule outputs for
the split in row order, shape ``[n, tokens, dim]``. Both output paths are checked before the
evaluation runs. The default checkpoint is ``best`` (RUN_DIR/checkpoints/best, the step
validation selected) when the run has one, else ``latest``. A split with fewer samples than
``--way`` is an error that names the largest ``--way`` it allows (results at another way are
not comparable with the published 300-way numbers, so the choice is left to you).

``--recon DIR`` (a ``launchers/reconstruct.py`` output) adds ``recon.{pixcorr, ssim, alexnet2,
alexnet5, inception, clip, effnet, swav}`` as MindEye computes them, and DIR/report.md/.html
(table and grid). The feature networks load from ``--metrics-weights DIR``: alexnet.pth,
inception_v3.pth, efficientnet_b1.pth, swav_resnet50.pth, clip_vit_l14.pt (or the torch hub /
OpenAI file names); without it PixCorr and SSIM are computed and the others are reported under
``recon.not_computed`` with the reason (``random``: random-init networks, for tests only).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", "--run-dir", dest="run",
                   help="run directory written by launchers/train.py (under torchrun spell it --run-dir: torch "
                        "2.13's torchrun rejects --run as an ambiguous abbreviation of its --run-path)")
    p.add_argument("--data", help="dataset URL (defaults to the run's data.url)")
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", help="checkpoint tag, 'best' or 'latest' (default: best if the run has it, else latest)")
    p.add_argument("--out", help="write the metrics JSON here (also printed)")
    p.add_argument("--save-predictions", help="save retrieval-submodule outputs (.npy, [n, tokens, dim])")
    p.add_argument("--baseline", choices=["ridge"], help="also compute a baseline on the same data")
    p.add_argument("--way", type=int, default=300)
    p.add_argument("--loops", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recon", help="reconstruction directory (launchers/reconstruct.py --out) to score")
    p.add_argument("--metrics-weights", help="folder of the metric networks' weights, or 'random' (tests only)")
    p.add_argument("--metrics-networks", help="comma-separated subset of alexnet,inception,clip,effnet,swav")
    p.add_argument("--metrics-clip-arch", help="open_clip architecture of the CLIP metric (default ViT-L-14-quickgelu)")
    p.add_argument("--metrics-clip-config", help="open_clip model-config JSON to register for --metrics-clip-arch")
    args = p.parse_args(argv)
    from mindeye_dist.evaluate import evaluate_run

    recon_options = {"weights": args.metrics_weights, "clip_arch": args.metrics_clip_arch,
                     "clip_model_config": args.metrics_clip_config,
                     "networks": args.metrics_networks.split(",") if args.metrics_networks else None}
    try:
        res = evaluate_run(args.run, args.data, args.split, args.checkpoint, args.way, args.loops, args.seed,
                           args.baseline, args.save_predictions, args.out, args.recon, recon_options)
    except (OSError, ValueError) as err:  # ValueError: ConfigError, CheckpointError, DataError
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
