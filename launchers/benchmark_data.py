"""Measure the data loader: samples/s and MB/s from local disk and from a loopback S3 server.

    python launchers/benchmark_data.py                      # demo dataset in a temp dir
    python launchers/benchmark_data.py --json bench.json --data-dir demo_out/data --workers 2
    make bench-data
"""

from __future__ import annotations

import argparse
import json
import sys

from mindeye_dist.data.benchmark import run_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--data-dir", default=None, help="local dataset to use (built there if missing); default: a temp dir")
    p.add_argument("--preset", default="demo", help="synthetic preset to build")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per source; the median is reported")
    args = p.parse_args(argv)
    r = run_benchmark(args.data_dir, args.preset, args.workers, args.batch_size, args.repeats)
    print(f"{r['preset']}: {r['train_samples']} train samples in {r['train_shards']} shards, {r['bytes_per_sample'] / 1e3:.1f} KB/sample, "
          f"{r['num_workers']} workers, batch {r['batch_size']}, median of {r['repeats']}")
    for src in ("local", "s3"):
        print(f"  {src:5s}: {r[src]['samples_per_s']:8.0f} samples/s  {r[src]['mb_per_s']:7.1f} MB/s")
    print(f"  s3/local: {r['s3_over_local']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
