"""Training on part of a split: the first N rows, for data-scaling sweeps and the 1-session setting.

Rows are in the order the dataset was written (NSD imports: session order, so the first N rows
are the first sessions; synthetic subjects: i.i.d. draws, so any prefix is a random subset). The
view keeps the shards that hold those rows, the last one cut short; loaders read a shard's first
``count`` samples, so nothing else changes. Voxel z-score statistics stay those of the whole
train split (computed when the shards were built): a small leak of the held-back rows' first two
moments, none of their targets.
"""

from __future__ import annotations

import dataclasses

from mindeye_dist.data.errors import DataError
from mindeye_dist.data.meta import DatasetMeta


def limit_split(meta: DatasetMeta, split: str, n: int) -> DatasetMeta:
    """A copy of ``meta`` whose ``split`` holds only its first ``n`` rows."""
    info = meta.split(split)
    if not 1 <= n <= info.count:
        raise DataError(f"data.train_subset={n} is invalid: split {split!r} of {meta.url} has {info.count} rows "
                        f"(choose 1..{info.count}, or null for all)")
    shards, left = [], n
    for shard in info.shards:
        if left == 0:
            break
        take = min(shard.count, left)
        shards.append(shard if take == shard.count else dataclasses.replace(shard, count=take))
        left -= take
    splits = dict(meta.splits)
    splits[split] = dataclasses.replace(info, count=n, shards=tuple(shards))
    return dataclasses.replace(meta, splits=splits)
