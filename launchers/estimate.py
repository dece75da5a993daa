"""Parameter counts, training FLOPs per sample and memory per rank of a model preset, on the meta device.

    python launchers/estimate.py --preset mindeye1
    python launchers/estimate.py --preset mindeye2 --json
    python launchers/estimate.py --preset scale-1b n_voxels=15724 n_tokens=257 token_dim=768
    python launchers/estimate.py --preset demo hidden_dim=1024 n_blocks=4 --json
    python launchers/estimate.py --preset mindeye2 --world-size 8 --micro-batch-size 32 --precision bf16
    python launchers/estimate.py --preset scale-5b --world-size 16 --gpus-per-node 8 --ds-config ds_configs/zero3_offload.json

Trailing ``key=value`` pairs override model fields (``model.`` prefix optional). Data dims
(n_voxels, n_tokens, token_dim, lowlevel_shape) default to the preset's fixed or nominal dims.

With ``--world-size`` (or ``--ds-config``) the output gains memory per rank: model states
(params, grads, optimizer states by the ZeRO paper's formulas, ZeRO-3's gathered largest
layer), activations of one micro-batch (leaf-module outputs measured on the meta device; an
upper-bound-ish figure without activation checkpointing), host memory of offload variants and
DeepSpeed's own estimator numbers. Without ``--ds-config`` every stage 0-3 is shown; with one,
its stage and its offload variants. See ``mindeye_dist/estimate.py`` for the formulas and keys.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindeye_dist  # noqa: E402,F401  (torchvision shim before diffusers)
from mindeye_dist.config import ConfigError, apply_overrides, from_dict  # noqa: E402
from mindeye_dist.ds_config import DSConfigError, load_ds_config  # noqa: E402
from mindeye_dist.estimate import STATE_BYTES, estimate, format_table  # noqa: E402
from mindeye_dist.models.config import ModelConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="model preset (tiny, demo, mindeye1, mindeye2, ...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-flops", action="store_true", help="no FLOP counts")
    parser.add_argument("--ds-config", help="DeepSpeed JSON (ds_configs/*.json): report its ZeRO stage and "
                                            "offload variants instead of stages 0-3")
    parser.add_argument("--world-size", type=int, help="number of ranks (data-parallel degree); adds memory "
                                                       "per rank (default 1 when only --ds-config is given)")
    parser.add_argument("--gpus-per-node", type=int, help="for DeepSpeed's estimators (default: world size up to 8)")
    parser.add_argument("--micro-batch-size", type=int,
                        help="samples per rank per step (default: the DeepSpeed config's number, else 32)")
    parser.add_argument("--precision", choices=sorted(STATE_BYTES),
                        help="training precision (default: the DeepSpeed config's, else bf16)")
    parser.add_argument("overrides", nargs="*", help="model key=value overrides, e.g. hidden_dim=1024")
    args = parser.parse_args(argv)
    memory_flags = {"--gpus-per-node": args.gpus_per_node, "--micro-batch-size": args.micro_batch_size,
                    "--precision": args.precision}
    wants_memory = args.world_size is not None or args.ds_config is not None
    stray = [flag for flag, value in memory_flags.items() if value is not None]
    if stray and not wants_memory:
        parser.error(f"{', '.join(stray)} only apply to memory estimates: add --world-size (or --ds-config)")
    try:
        overrides = [o[len("model."):] if o.startswith("model.") else o for o in args.overrides]
        data = apply_overrides({"preset": args.preset}, overrides)
        cfg = from_dict(ModelConfig, data, prefix="model")
        ds_config = load_ds_config(args.ds_config) if args.ds_config else None
        # DeepSpeed's logger writes to stdout when its estimators are imported; keep stdout for
        # the result (JSON must stay parseable).
        with contextlib.redirect_stdout(sys.stderr):
            result = estimate(cfg, flops=not args.no_flops, ds_config=ds_config, world_size=args.world_size,
                              gpus_per_node=args.gpus_per_node, micro_batch_size=args.micro_batch_size,
                              precision=args.precision)
    except (ConfigError, DSConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
