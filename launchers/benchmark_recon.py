"""Reconstruction throughput per generator configuration, and the share of prior sampling vs generation.

    python launchers/benchmark_recon.py                                  # every case, 8 stimuli (~1-2 min on 2 CPU cores)
    python launchers/benchmark_recon.py --case synthetic-ddim20 --case vd-tiny --stimuli 16 --json recon_bench.json
    flock /tmp/mindeye_heavy.lock python launchers/benchmark_recon.py --real-size   # + MindEye1 at real size (minutes, ~6 GB)

Cases (``mindeye_dist/bench/recon.py``): synthetic-ddim20, synthetic-ddpm100, vd-tiny, unclip-tiny.
Random voxels through randomly initialised models: the numbers are compute, not quality.
Results: a markdown table on stdout (``--markdown`` to a file as well), rows as JSON with ``--json``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    import mindeye_dist  # noqa: F401  (torchvision shim first)
    from mindeye_dist.bench.recon import CASES, bench_reconstruction, format_markdown, real_size_estimate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", choices=sorted(CASES), help="repeat for several (default: all)")
    p.add_argument("--stimuli", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--real-size", action="store_true", help="also estimate MindEye1's recipe at real size")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    rows = bench_reconstruction(args.case, args.stimuli, args.batch_size, args.device)
    real = real_size_estimate(args.device) if args.real_size else None
    text = format_markdown(rows, real)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "real_size": real}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
