"""Parameter counts and training FLOPs per sample of a model preset, computed on the meta device.

    python launchers/estimate.py --preset mindeye1
    python launchers/estimate.py --preset mindeye2 --json
    python launchers/estimate.py --preset scale-1b n_voxels=15724 n_tokens=257 token_dim=768
    python launchers/estimate.py --preset demo hidden_dim=1024 n_blocks=4 --json

Trailing ``key=value`` pairs override model fields (``model.`` prefix optional). Data dims
(n_voxels, n_tokens, token_dim, lowlevel_shape) default to the preset's fixed or nominal dims.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindeye_dist  # noqa: E402,F401  (torchvision shim before diffusers)
from mindeye_dist.config import ConfigError, apply_overrides, from_dict  # noqa: E402
from mindeye_dist.estimate import estimate, format_table  # noqa: E402
from mindeye_dist.models.config import ModelConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="model preset (tiny, demo, mindeye1, mindeye2, ...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-flops", action="store_true", help="parameter counts only")
    parser.add_argument("overrides", nargs="*", help="model key=value overrides, e.g. hidden_dim=1024")
    args = parser.parse_args(argv)
    try:
        overrides = [o[len("model."):] if o.startswith("model.") else o for o in args.overrides]
        data = apply_overrides({"preset": args.preset}, overrides)
        cfg = from_dict(ModelConfig, data, prefix="model")
        result = estimate(cfg, flops=not args.no_flops)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
