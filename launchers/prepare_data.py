"""Build a sharded dataset (webdataset tars + stats.npz + meta.json) locally or on S3.

    # an outside dataset in the arrays contract (README "Data", docs/data.md)
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

    # NSD as published (local folder or s3://), one subject; voxels, images and ids only
    python launchers/prepare_data.py nsd --nsd-root /data/nsd --subject 1 --out data/subj01
    #   MindEye1's split: 37 sessions, the 982 shared images seen in them; HDF5 betas release
    python launchers/prepare_data.py nsd --nsd-root /data/nsd --subject 1 --sessions 1-37 --test shared982 \
        --betas hdf5 --out data/subj01_me1
    #   MindEye2's 1-hour setting: train on session 1, test on the shared images of all 40 sessions
    python launchers/prepare_data.py nsd --nsd-root s3://lab/nsd --subject 1 --sessions 1 --test-sessions 1-40 \
        --zscore session-nonshared --out s3://lab/shards/subj01_1sess
    #   with targets computed right after the import (weights from local files, never a hub)
    python launchers/prepare_data.py nsd --nsd-root /data/nsd --subject 1 --out data/subj01 \
        --targets clip-l14-mindeye1=/weights/ViT-L-14.pt,sd-vae-mindeye1=/weights/sd_image_var_autoenc.pth

    # add target fields to existing shards (resumable; shards split among the ranks of a launch)
    python launchers/prepare_data.py targets --data data/subj01 --encoder clip-l14-mindeye1 --weights /weights/ViT-L-14.pt
    torchrun --nproc_per_node 8 launchers/prepare_data.py targets --data s3://lab/shards/subj01 \
        --encoder bigg14-mindeye2 --weights /weights/open_clip_bigG.safetensors --batch-size 64
    python launchers/prepare_data.py targets --data data/subj01 --encoder teacher --weights /weights/convnext_xl.pt2

    # MindEye1's released webdataset tars (webdataset_avg_split/) -> our shards
    python launchers/prepare_data.py mindeye1-tars --src /data/webdataset_avg_split --subject 1 --out data/subj01_me1tars
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
    _add_importer_parsers(sub, common)
    if "--list-members" in argv:
        return _list_members()
    args = parser.parse_args(argv)
    # synthetic: no --seed means the preset's seed 0 or a member's own seed. (set_defaults on the
    # subparser would change the shared --seed action of every subcommand: parents share actions.)
    if args.source == "synthetic" and not any(a == "--seed" or a.startswith("--seed=") for a in argv):
        args.seed = None
    command = "python launchers/prepare_data.py " + " ".join(shlex.quote(a) for a in argv)
    if args.source in IMPORTERS:
        return _run_importer(args, command)
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


IMPORTERS = ("nsd", "targets", "mindeye1-tars")


def _add_importer_parsers(sub, common) -> None:
    """The nsd, targets and mindeye1-tars subcommands (mindeye_dist/data/nsd.py, targets.py, mindeye_tars.py)."""
    from mindeye_dist.data.nsd import RELEASES, TEST_SETS, ZSCORE_MODES
    from mindeye_dist.data.targets import ENCODERS

    tgt_help = "none, or ENCODER=WEIGHTS[,ENCODER=WEIGHTS...] to add after the import (encoders: " + ", ".join(sorted(ENCODERS)) + ")"
    nsd = sub.add_parser("nsd", parents=[common], help="import NSD files as published (nsddata/, nsddata_betas/, nsddata_stimuli/)")
    nsd.add_argument("--nsd-root", required=True, help="folder (or s3://bucket/prefix) holding nsddata/, nsddata_betas/, nsddata_stimuli/")
    nsd.add_argument("--subject", type=int, required=True, help="NSD subject 1-8")
    nsd.add_argument("--sessions", default=None, help="train/val sessions, e.g. 1-40, 1 or 1,3,5-7 (default: all the subject has)")
    nsd.add_argument("--test-sessions", default=None, help="sessions whose shared-image trials form test (default: --sessions)")
    nsd.add_argument("--betas", choices=RELEASES, default="nifti", help="betas release to read (both give identical shards)")
    nsd.add_argument("--beta-version", default="betas_fithrf_GLMdenoise_RR", help="GLMsingle folder under func1pt8mm/")
    nsd.add_argument("--test", dest="test_set", choices=TEST_SETS, default="shared1000",
                     help="shared1000: all shared images; shared982: those shown in sessions 1-37 (MindEye1)")
    nsd.add_argument("--zscore", choices=ZSCORE_MODES, default="session",
                     help="per voxel within each session over all trials | over non-shared trials (MindEye2 paper) | none")
    nsd.add_argument("--min-reps", type=int, default=1, help="drop images with fewer real repetitions (1-3)")
    nsd.add_argument("--image-size", type=int, default=None, help="resize stimuli (default: NSD's 425)")
    nsd.add_argument("--no-stim-info-check", action="store_true", help="skip the cross-check against nsd_stim_info_merged.csv")
    nsd.add_argument("--work-dir", default=None, help="session cache (default OUT/.nsd-work, or a temp folder for S3 output)")
    nsd.add_argument("--keep-work", action="store_true", help="keep the session cache after success")
    nsd.add_argument("--targets", default="none", help=tgt_help)
    nsd.add_argument("--target-batch-size", type=int, default=32, help="images per encoder batch for --targets")
    tg = sub.add_parser("targets", help="add a target field (CLIP tokens, VAE latents, teacher features) to existing shards")
    tg.add_argument("--data", required=True, help="dataset root (local or s3://)")
    tg.add_argument("--encoder", required=True, choices=sorted(ENCODERS))
    tg.add_argument("--weights", required=True, help="local weights file or folder (no hub downloads)")
    tg.add_argument("--field", default=None, help="field name to write (default: the encoder's, e.g. targets, vae, teacher)")
    tg.add_argument("--batch-size", type=int, default=32)
    tg.add_argument("--arch", default=None, help="open_clip architecture name override (e.g. a config added with --model-config)")
    tg.add_argument("--model-config", default=None, help="open_clip model config JSON file or folder to register first")
    tg.add_argument("--image-size", type=int, default=None, help="teacher input size (default: the encoder's)")
    tg.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda")
    tg.add_argument("--replace", action="store_true", help="recompute a field the dataset already has")
    tg.add_argument("--s3-endpoint", default=None)
    tg.add_argument("--quiet", action="store_true")
    me1 = sub.add_parser("mindeye1-tars", parents=[common], help="convert MindEye1's webdataset_avg_split tars")
    me1.add_argument("--src", required=True, help="the webdataset_avg_split folder (train/, val/, test/)")
    me1.add_argument("--subject", type=int, default=None, help="subject to take when --src holds several")
    me1.add_argument("--val", dest="val_source", choices=("mindeye1", "carve"), default="mindeye1",
                     help="mindeye1: their 300-image val split is our val; carve: fold it into train (MindEye1's 8,859) and carve --val-fraction")
    me1.add_argument("--targets", default="none", help=tgt_help)
    me1.add_argument("--target-batch-size", type=int, default=32)


def _run_importer(args, command: str) -> int:
    from mindeye_dist.compat import MissingDependency
    from mindeye_dist.data.targets import TargetSpec, add_targets, parse_target_specs

    try:
        if args.source == "targets":
            spec = TargetSpec(encoder=args.encoder, weights=args.weights, field=args.field, batch_size=args.batch_size,
                              arch=args.arch, model_config=args.model_config, image_size=args.image_size,
                              device=args.device, replace=args.replace)
            meta = add_targets(args.data, spec, s3_endpoint=args.s3_endpoint, progress=not args.quiet)
        elif args.source == "nsd":
            from mindeye_dist.data.nsd import NsdImportConfig, import_nsd

            meta = import_nsd(NsdImportConfig(
                nsd_root=args.nsd_root, subject=args.subject, out=args.out, sessions=args.sessions,
                test_sessions=args.test_sessions, betas=args.betas, beta_version=args.beta_version, test_set=args.test_set,
                zscore=args.zscore, val_fraction=args.val_fraction, seed=args.seed, min_reps=args.min_reps,
                image_size=args.image_size, check_stim_info=not args.no_stim_info_check, work_dir=args.work_dir,
                keep_work=args.keep_work, shard_size_mb=args.shard_size_mb or DEFAULT_SHARD_SIZE_MB,
                max_samples_per_shard=args.max_samples_per_shard, s3_endpoint=args.s3_endpoint, overwrite=args.overwrite,
                progress=not args.quiet, command=command,
                targets=parse_target_specs(args.targets, batch_size=args.target_batch_size)))
        else:
            from mindeye_dist.data.mindeye_tars import MindEye1TarsConfig, import_mindeye1_tars

            meta = import_mindeye1_tars(MindEye1TarsConfig(
                src=args.src, out=args.out, subject=args.subject, val_source=args.val_source, val_fraction=args.val_fraction,
                seed=args.seed, shard_size_mb=args.shard_size_mb or DEFAULT_SHARD_SIZE_MB,
                max_samples_per_shard=args.max_samples_per_shard, s3_endpoint=args.s3_endpoint, overwrite=args.overwrite,
                progress=not args.quiet, command=command,
                targets=parse_target_specs(args.targets, batch_size=args.target_batch_size)))
    except (DataError, MissingDependency) as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{name} {s.count}" for name, s in meta.splits.items())
    fields = ", ".join(f"{k} {v.get('shape')}" for k, v in meta.raw["fields"].items() if k != "ids")
    print(f"dataset {meta.url}: {counts} samples; fields: {fields}")
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
