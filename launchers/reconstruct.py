"""Reconstruct what a subject saw: brain -> diffusion prior -> image generator -> picture.

One process (CPU or one GPU):
    python launchers/reconstruct.py --run RUN_DIR --split test --generator synthetic --out recon/
    python launchers/reconstruct.py --run RUN_DIR --generator versatile-diffusion --weights /w/versatile-diffusion \\
        --clip-weights /w/ViT-L-14.pt --best-of 16 --img2img-strength 0.85 --sampler ddpm --out recon_me1/   # MindEye1
    python launchers/reconstruct.py --run RUN_DIR --generator unclip --weights /w/stable-diffusion-2-1-unclip-small \\
        --sampler ddim --steps 20 --img2img-strength 1 --best-of 1 --blurry-blend 0.25 --out recon_me2/       # MindEye2-like
Every GPU of a node (stimuli are split among ranks; the same command resumes an interrupted run):
    torchrun --nproc_per_node 8 launchers/reconstruct.py --run RUN_DIR --generator ... --out recon/
    deepspeed --num_gpus 8 launchers/reconstruct.py --run RUN_DIR --generator ... --out recon/
Controls and floors:
    python launchers/reconstruct.py --run RUN_DIR --shuffle-brain --out recon_shuffled/   # another stimulus's voxels
    python launchers/reconstruct.py --brain ridge --data URL --out recon_ridge/          # linear decoder, no prior
Then the eight metrics: python launchers/evaluate.py --recon recon/ --metrics-weights /w/metrics --out m.json

Output: DIR/images/*.png (seen, blurry, every candidate), DIR/index.jsonl (id, seen, recon, paths
relative to DIR), DIR/grid.png, DIR/timing.json. Weights are read from local folders only.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (the same one resumes)")
    p.add_argument("--run", "--run-dir", dest="run",
                   help="run directory written by launchers/train.py (under torchrun spell it --run-dir: torch "
                        "2.13's torchrun rejects --run as an ambiguous abbreviation of its --run-path)")
    p.add_argument("--data", dest="data_url", help="dataset URL (default: the run's data.url)")
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", help="checkpoint tag (default: checkpoints/best if the run marked one, else latest)")
    p.add_argument("--brain", choices=["model", "ridge"], default="model", help="model: the run; ridge: linear floor")
    p.add_argument("--generator", default="synthetic", help="synthetic | versatile-diffusion | unclip")
    p.add_argument("--weights", help="local diffusers pipeline folder of the generator")
    p.add_argument("--vae", help="VAE decoding the low-level latents (default: the generator's)")
    p.add_argument("--best-of", type=int, default=16, help="candidates per stimulus (MindEye1: 16)")
    p.add_argument("--img2img-strength", type=float, default=0.85, help="MindEye1: 0.85; 1 = no img2img")
    p.add_argument("--img2img-input", choices=["auto", "clip", "standard"], default="auto")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="prior sampler (MindEye1 ddpm, MindEye2 ddim)")
    p.add_argument("--steps", type=int, help="prior steps for ddim (default 20)")
    p.add_argument("--guidance", type=float, default=1.0, help="prior classifier-free guidance (MindEye: 1)")
    p.add_argument("--generator-steps", type=int, default=20)
    p.add_argument("--generator-guidance", type=float, help="default: 3.5 versatile-diffusion, 5 unclip")
    p.add_argument("--noise-level", type=int, default=0, help="unclip image-embedding noise level")
    p.add_argument("--sample-std", type=float, default=0.3, help="synthetic generator's sampling noise")
    p.add_argument("--clip-weights", help="image encoder for best-of-k (the one that made the targets)")
    p.add_argument("--clip-encoder", default="clip-l14-mindeye1")
    p.add_argument("--clip-arch")
    p.add_argument("--clip-model-config")
    p.add_argument("--shuffle-brain", action="store_true", help="control: reconstruct from another stimulus's voxels")
    p.add_argument("--blurry-blend", type=float, default=0.0, help="final blend weight of the blurry image (MindEye2: 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, help="only the first N stimuli")
    p.add_argument("--grid-n", type=int, default=12)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="start over in --out even if its settings differ")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    args = vars(p.parse_args(argv))
    args.pop("local_rank")
    import mindeye_dist  # noqa: F401  (torchvision shim before diffusers/open_clip)
    from mindeye_dist.errors import ConfigError
    from mindeye_dist.reconstruct import ReconstructConfig, reconstruct

    try:
        summary = reconstruct(ReconstructConfig(**args))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"reconstruct: {err}", file=sys.stderr)
        return 2
    if summary:
        t = summary["timing"]
        rate = f"{t['stimuli_per_s']:.3f} stimuli/s" if t["stimuli_per_s"] else "nothing left to do"
        print(json.dumps({k: summary[k] for k in ("out", "n", "finished", "done_before", "grid", "index")}, indent=2))
        print(f"reconstruct: {t['stimuli']} new stimuli on {t['ranks']} rank(s), {rate}; phases "
              + ", ".join(f"{k} {v:.0%}" for k, v in t["phase_share"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
