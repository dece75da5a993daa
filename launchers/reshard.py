"""Convert a run's checkpoint to DeepSpeed's universal format, ahead of a resume on another number of ranks.

Training does this by itself: a run resumed on a different number of ranks than wrote
``checkpoints/latest`` converts that checkpoint once (rank 0, the others wait) into
``checkpoints/<tag>_universal/`` and loads it. Run this beforehand to keep the conversion off the
accelerators' clock (it needs CPU and about twice the checkpoint's size in RAM, no GPU)::

    python launchers/reshard.py --run runs/me1                 # the checkpoint `latest` names
    python launchers/reshard.py --run runs/me1 --tag step_0004000 --workers 8

then launch with the new number of ranks and the same ``run.dir``, e.g.::

    deepspeed --num_gpus 4 launchers/train.py --ds_config ds_configs/zero2.json \
        --config launchers/configs/mindeye1.yaml run.dir=runs/me1

It calls the same function as training (``mindeye_dist.checkpoint.universal_for``), which runs
DeepSpeed's converter ``python -m deepspeed.checkpoint.ds_to_universal --input_folder
RUN/checkpoints/TAG --output_folder ... --inject_missing_state`` into a scratch directory and
renames the result into place, so a killed conversion never leaves a half copy that training
would load. Checkpoints in fp32 ZeRO-0 need no conversion (one file holds the whole model and
optimizer); this says so and exits 0.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory (holds checkpoints/)")
    parser.add_argument("--tag", help="checkpoint to convert (default: the one checkpoints/latest names)")
    parser.add_argument("--workers", type=int, default=0, help="converter processes (default: min(4, CPUs))")
    args = parser.parse_args(argv)
    from mindeye_dist.checkpoint import convert_run_checkpoint
    from mindeye_dist.errors import ConfigError

    try:
        print(convert_run_checkpoint(Path(args.run), args.tag, args.workers))
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
