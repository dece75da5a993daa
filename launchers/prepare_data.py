"""Build a sharded dataset (webdataset tars + stats.npz + meta.json) locally or on S3.

    # an outside dataset in the arrays contract (DESIGN.md)
    python launchers/prepare_data.py arrays --src DIR --out data/subj01 [--val-fraction 0.1]
    # the embedded synthetic subject
    python launchers/prepare_data.py synthetic --preset demo --out demo_out/data [--seed 0]
    # a member of the synthetic family (mindeye_dist/data/family.py), a random draw, or a variant
    python launchers/prepare_data.py synthetic --list-members
    python launchers/prepare_data.py synthetic --member tune-a --out /tmp/data/tune-a
    python launchers/prepare_data.py synthetic --member random-7 --out /tmp/data/random-7
    python launchers/prepare_data.py synthetic --member tune-a --spec noise=8 n_voxels=3000 --out /tmp/data/v
    # to S3 (credentials from the standard AWS sources; endpoint from AWS_ENDPOINT_URL or the flag)
    python launchers/prepare_data.py synthetic --preset demo --out s3://bucket/demo --s3-endpoint http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from mindeye_dist.data import DataError, build_synthetic_dataset, import_arrays
from mindeye_dist.data.synthetic import PRESETS
from mindeye_dist.data.writer import DEFAULT_SHARD_SIZE_MB


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="dataset root: local path, file://PATH or s3://bucket/prefix")
    common.add_argument("--val-fraction", type=float, default=0.1, help="share of train carved out as the val split (0 allowed)")
    common.add_argument("--seed", type=int, default=0, help="seed of the val carve-out (and of the synthetic subject)")
    common.add_argument("--shard-size-mb", type=float, default=None, help=f"max shard size (default {DEFAULT_SHARD_SIZE_MB:g} for arrays, the preset's for synthetic)")
    common.add_argument("--max-samples-per-shard", type=int, default=None, help="also cap samples per shard (tests)")
    common.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    common.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    common.add_argument("--quiet", action="store_true", help="no progress lines")
    arrays = sub.add_parser("arrays", parents=[common], help="import {train,test}_{voxels,clip}[_images,_vae].npy")
    arrays.add_argument("--src", required=True, help="directory with the .npy files")
    arrays.add_argument("--subject", type=int, default=1, help="subject id stored with every sample")
    synthetic = sub.add_parser("synthetic", parents=[common], help="the synthetic subject with a known encoding model")
    synthetic.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    synthetic.add_argument("--member", default=None, help="a family member (see --list-members) or random-<seed>; replaces --preset")
    synthetic.add_argument("--spec", nargs="+", default=[], metavar="KEY=VALUE",
                           help="override generator settings of the preset or member, e.g. noise=8 n_voxels=3000")
    synthetic.add_argument("--list-members", action="store_true", help="print the family's members and exit")
    synthetic.set_defaults(seed=None)  # synthetic: the preset's seed 0, or the member's own seed
    if "--list-members" in argv:
        return _list_members()
    args = parser.parse_args(argv)
    command = "python launchers/prepare_data.py " + " ".join(shlex.quote(a) for a in argv)
    common_kw = dict(
        val_fraction=args.val_fraction, max_samples_per_shard=args.max_samples_per_shard, s3_endpoint=args.s3_endpoint,
        overwrite=args.overwrite, command=command, progress=not args.quiet,
    )
    try:
        if args.source == "arrays":
            meta = import_arrays(args.src, args.out, seed=args.seed, subject=args.subject,
                                 shard_size_mb=args.shard_size_mb or DEFAULT_SHARD_SIZE_MB, **common_kw)
        elif args.member is not None:
            from mindeye_dist.data.family import build_family_dataset, get_member

            member = get_member(args.member, **_spec_overrides(args.spec))
            if args.seed is not None:
                member = dataclasses.replace(member, seed=args.seed)
            meta = build_family_dataset(member, args.out, shard_size_mb=args.shard_size_mb, **common_kw)
        else:
            seed = 0 if args.seed is None else args.seed
            meta = build_synthetic_dataset(args.preset, args.out, seed, shard_size_mb=args.shard_size_mb,
                                           **_spec_overrides(args.spec), **common_kw)
    except (DataError, TypeError) as err:  # TypeError: an unknown --spec key
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{name} {s.count}" for name, s in meta.splits.items())
    print(f"dataset {meta.url}: {counts} samples; {meta.n_voxels} voxels, targets {meta.n_tokens}x{meta.token_dim}")
    if "retrieval_ceiling" in meta.raw:
        c = meta.raw["retrieval_ceiling"]
        print(f"retrieval ceiling ({c['way']}-way, {c['loops']} loops, {c['split']}): image top-1 {c['image_top1']:.3f}, brain top-1 {c['brain_top1']:.3f}")
    return 0


def _spec_overrides(items: list[str]) -> dict:
    """``["noise=8", "n_voxels=3000"]`` -> {"noise": 8.0, "n_voxels": 3000} (values read as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DataError(f"--spec {item!r} is not KEY=VALUE (e.g. noise=8)")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _list_members() -> int:
    from mindeye_dist.data.family import MEMBERS

    for m in MEMBERS.values():
        settings = ", ".join(f"{k} {v}" for k, v in m.settings().items())
        print(f"{m.name:11s} {m.role:9s} seed {m.seed:5d} {'cpu' if m.cpu else 'big'}  {settings}\n{'':12s}{m.doc}")
    print("random-<seed>: a random draw from the CPU ranges (random-full-<seed>: the whole family)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
