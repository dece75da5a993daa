"""Data plane: synthetic subject, shard writer, webdataset loaders, local and S3 storage.

Public API::

    meta = build_synthetic_dataset("demo", "demo_out/data", seed=0)   # or import_arrays(src, url)
    meta = read_meta(url)                                              # DatasetMeta
    check = check_shards(meta, ("train", "val"), on_corrupt=cfg.data.on_corrupt)  # every shard there, right size
    train = build_train_loader(cfg.data, micro_batch_size, seed, rank, world_size,
                               start_epoch=0, start_batch=0, meta=meta,
                               skip_shards=check.skip_shards)          # TrainLoader
    for batch in train: ...                                            # Batch; train.position to checkpoint
    train.skipped.counts()                                             # SkipCounts (data.on_corrupt=skip)
    for batch in build_eval_loader(cfg.data, "val", 300): ...          # row order, reps averaged

See loader.py for how ranks and workers split an epoch and how resume works, writer.py for the
shard layout, meta.py for the meta.json schema, integrity.py for checksums, the start-up shard
check and skip counts, s3.py for S3 reads, and synthetic.py for the synthetic subject.
"""

from mindeye_dist.data.batch import Batch
from mindeye_dist.data.errors import CorruptShardError, DataError, StorageError
from mindeye_dist.data.integrity import ShardCheck, ShardProblem, SkipCounter, SkipCounts, check_shards
from mindeye_dist.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from mindeye_dist.data.meta import DatasetMeta, ShardInfo, SplitInfo, read_meta
from mindeye_dist.data.prepare import build_synthetic_dataset, import_arrays, load_array_splits
from mindeye_dist.data.synthetic import PRESETS, SyntheticSpec, SyntheticSubject, get_spec
from mindeye_dist.data.writer import write_dataset

__all__ = [
    "Batch", "CorruptShardError", "DataError", "DatasetMeta", "EvalLoader", "PRESETS", "ShardCheck", "ShardInfo",
    "ShardProblem", "SkipCounter", "SkipCounts", "SplitInfo", "StorageError", "SyntheticSpec", "SyntheticSubject",
    "TrainLoader", "build_eval_loader", "build_synthetic_dataset", "build_train_loader", "check_shards", "get_spec",
    "import_arrays", "load_array_splits", "read_meta", "write_dataset",
]
