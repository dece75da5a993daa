"""Convert a released MindEye1 / MindEye2 checkpoint into this package's export format.

    # MindEye1: the high-level model (voxel2clip + diffusion prior), optionally its low-level model
    python launchers/convert_checkpoint.py --format mindeye1 \\
        --src train_logs/prior_257_final_subj01_bimixco_softclip_byol/last.pth \\
        --lowlevel-src train_logs/autoencoder_subj01_4x_locont_no_reconst/epoch120.pth --out me1_subj01.safetensors
    # MindEye2: one file holds ridge, backbone, retrieval and low-level heads and the prior
    python launchers/convert_checkpoint.py --format mindeye2 \\
        --src train_logs/final_subj01_pretrained_40sess_24bs/last.pth --out me2_subj01.safetensors
    # multi-subject pretraining: subjects are named from their voxel counts, or given in ridge order
    python launchers/convert_checkpoint.py --format mindeye2 --src final_multisubject_subj01/last.pth \\
        --out me2_multi.safetensors --subject subj02,subj03,subj04,subj05,subj06,subj07,subj08

Load the result with ``mindeye_dist.export.load_exported(PATH)``. Inputs are read without
running code from them (``weights_only`` loading); see ``mindeye_dist/convert.py`` for the layouts.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--format", required=True, choices=["mindeye1", "mindeye2"], help="which release the file is")
    p.add_argument("--src", required=True, help="checkpoint (.pth/.pt with model_state_dict, or .safetensors)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--subject", help="subject name(s), comma-separated in the checkpoint's order "
                                     "(default: the NSD subject with each input layer's voxel count)")
    p.add_argument("--lowlevel-src", help="mindeye1 only: the Voxel2StableDiffusionModel checkpoint (epoch120.pth)")
    args = p.parse_args(argv)
    from mindeye_dist.convert import ConversionError, convert_checkpoint

    subjects = [s.strip() for s in args.subject.split(",")] if args.subject else None
    try:
        summary = convert_checkpoint(args.format, args.src, args.out, subjects=subjects, lowlevel_src=args.lowlevel_src)
    except (FileNotFoundError, ConversionError) as err:
        print(f"convert_checkpoint: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
