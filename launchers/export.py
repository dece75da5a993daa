"""Export consolidated fp32 weights from any ZeRO stage, loadable without DeepSpeed.

    python launchers/export.py --run RUN_DIR [--checkpoint best|latest|step_0001000] --out weights.safetensors

The default checkpoint is ``best`` (the step validation selected, RUN_DIR/checkpoints/best) when
the run has one, else ``latest``. Checkpoint files are read weights-only: a pickle that would
construct anything else is refused. Load the result with
``mindeye_dist.export.load_exported("weights.safetensors")``.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory written by launchers/train.py")
    p.add_argument("--checkpoint", help="checkpoint tag, 'best' or 'latest' (default: best if the run has it, else latest)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    args = p.parse_args(argv)
    from mindeye_dist.export import export_run

    try:
        print(json.dumps(export_run(args.run, args.out, args.checkpoint), indent=2))
    except (OSError, ValueError) as err:  # ValueError: ConfigError, CheckpointError, DataError
        print(f"export: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
