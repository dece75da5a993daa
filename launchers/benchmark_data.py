"""Measure the data loader: samples/s and MB/s from local disk and from a loopback S3 server.

    python launchers/benchmark_data.py                      # demo dataset in a temp dir
    python launchers/benchmark_data.py --json bench.json --data-dir demo_out/data --workers 2
    python launchers/benchmark_data.py --nsd-samples 2048 --data-dir /tmp/nsd --s3-readers botocore,s3fs --unverified --repeats 7
    make bench-data

Sources are read one epoch each in turn (local, then every S3 reader), ``--repeats`` times, so a
noisy spell on a shared machine hits them alike; medians and the min-max spread are printed.
``--nsd-samples N`` builds (once) a dataset with MindEye1's per-sample sizes (15,724 x 3 voxels,
257 x 768 targets, float16; about 0.5 MB per sample) instead of the demo preset.
"""

from __future__ import annotations

import argparse
import json
import sys

from mindeye_dist.data.benchmark import S3_READERS, run_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--data-dir", default=None, help="local dataset to use (built there if missing); default: a temp dir")
    p.add_argument("--preset", default="demo", help="synthetic preset to build")
    p.add_argument("--nsd-samples", type=int, default=None, help="build an NSD-sized dataset of this many samples (needs --data-dir)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per source; the median is reported")
    p.add_argument("--unverified", action="store_true", help="also read local shards without checksum verification (its cost)")
    p.add_argument("--s3-readers", default=S3_READERS[0],
                   help=f"comma-separated S3 readers to compare, from {','.join(S3_READERS)} (the first is reported as 's3')")
    args = p.parse_args(argv)
    readers = [r for r in args.s3_readers.split(",") if r]
    if any(r not in S3_READERS for r in readers) or not readers:
        p.error(f"--s3-readers {args.s3_readers!r}: choose from {','.join(S3_READERS)}")
    if args.nsd_samples is not None:
        if not args.data_dir:
            p.error("--nsd-samples needs --data-dir (where the dataset is built once and reused)")
        from mindeye_dist.bench.data import build_nsd_sized_dataset

        build_nsd_sized_dataset(args.data_dir, args.nsd_samples)
    r = run_benchmark(args.data_dir, args.preset, args.workers, args.batch_size, args.repeats, s3_readers=readers,
                      unverified=args.unverified)
    print(f"{r['train_samples']} train samples in {r['train_shards']} shards, {r['bytes_per_sample'] / 1e3:.1f} KB/sample, "
          f"{r['num_workers']} workers, batch {r['batch_size']}, median [min-max] of {r['repeats']} interleaved epochs")
    for name, v in r["variants"].items():
        print(f"  {name:12s}: {v['samples_per_s']:7.0f} samples/s [{v['samples_per_s_min']:.0f}-{v['samples_per_s_max']:.0f}]  "
              f"{v['mb_per_s']:7.1f} MB/s  loader CPU {v['client_cpu_s_per_gb']:.2f} s/GB "
              f"[{v['client_cpu_s_per_gb_min']:.2f}-{v['client_cpu_s_per_gb_max']:.2f}]  server CPU {v['server_cpu_s_per_gb']:.2f} s/GB")
    print(f"  s3/local: {r['s3_over_local']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
