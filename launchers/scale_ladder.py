"""Scale ladder: the largest MindEye backbone + prior that trains on this machine at 2 ranks, per
ZeRO variant (ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload, ZeRO-3 with NVMe offload), each rung a real
``deepspeed --num_accelerators 2 launchers/train.py`` run; peak RSS per rank, step time and
estimate.py's prediction. Writes OUT/ladder.json and OUT/ladder.md (a markdown table).

    flock /tmp/mindeye_heavy.lock python launchers/scale_ladder.py --out /tmp/ladder
    python launchers/scale_ladder.py --out /tmp/ladder --variants zero3 --widths 2048,1024 --steps 20
    python launchers/scale_ladder.py --out /tmp/ladder --precision fp32      # what this CPU machine can afford
    python launchers/scale_ladder.py --out /tmp/ladder --variants zero3_nvme --widths 8192 \\
        --extra zero3_nvme:4096:model.lowlevel=true      # + MindEye1's full preset (with its low-level head)

A rung starts only when twice its predicted per-rank peak fits in MemAvailable minus --margin-gib,
and is ended if MemAvailable falls below --guard-gib while it runs (a shared machine must not reach
the OOM killer); what was not tried is listed with what it would need. See mindeye_dist/bench/ladder.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindeye_dist  # noqa: E402,F401  (torchvision shim first)
from mindeye_dist.bench.ladder import VARIANTS, WIDTHS, LadderOptions, Rung, run_ladder  # noqa: E402


def _extra(text: str) -> Rung:
    """VARIANT:WIDTH[:override,override...]"""
    parts = text.split(":", 2)
    if len(parts) < 2 or parts[0] not in VARIANTS or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"--extra {text!r}: expected VARIANT:WIDTH[:key=value,...] with VARIANT one of "
                                         f"{', '.join(VARIANTS)}")
    overrides = tuple(o for o in (parts[2].split(",") if len(parts) == 3 else []) if o)
    return Rung(parts[0], int(parts[1]), overrides=overrides or ("model.lowlevel=false",))


def main(argv: list[str] | None = None) -> int:
    d = LadderOptions(out="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for data, runs, ladder.json and ladder.md")
    p.add_argument("--variants", default=",".join(d.variants), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="backbone widths to try, comma-separated")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per rung (>= 20 to call it trained)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--precision", choices=("bf16", "fp32"), default=d.precision,
                   help="bf16 (MindEye's, and what GPUs want) or fp32: the same bytes per parameter of model "
                        "states with Adam, and on a CPU without bf16 matmul units (this 2-core machine: about "
                        "2 GFLOP/s in bf16) many times faster")
    p.add_argument("--no-checkpointing", action="store_true", help="rungs without activation checkpointing")
    p.add_argument("--margin-gib", type=float, default=d.margin_gib, help="MemAvailable left free by a rung's prediction")
    p.add_argument("--guard-gib", type=float, default=d.guard_gib, help="end a rung when MemAvailable falls below this")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per rung")
    p.add_argument("--extra", type=_extra, action="append", default=[], help="VARIANT:WIDTH[:overrides] run after the ladder")
    args = p.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    options = LadderOptions(out=args.out, variants=variants, widths=tuple(int(w) for w in args.widths.split(",") if w),
                            steps=args.steps, micro_batch=args.micro_batch, precision=args.precision,
                            activation_checkpointing=not args.no_checkpointing, margin_gib=args.margin_gib,
                            guard_gib=args.guard_gib, timeout_s=args.timeout, extra_rungs=tuple(args.extra))
    result = run_ladder(options)
    print((Path(args.out) / "ladder.md").read_text())
    return 0 if any(r["trained"] for r in result["rungs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
