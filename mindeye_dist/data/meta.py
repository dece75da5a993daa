"""``meta.json``: what a dataset holds, written last by the shard writer, read first by loaders.

Schema (format_version 1)::

    {
      "format": "mindeye_dist.shards", "format_version": 1,
      "created_at": ISO time, "command": "python launchers/prepare_data.py ...",
      "source": {"kind": "arrays", "src": DIR} | {"kind": "synthetic", "preset": .., "seed": ..},
      "subject": 1,
      "n_voxels": V, "n_tokens": T, "token_dim": D,
      "fields": {"voxels": {"key": "voxels.npy", "dtype": "float16", "shape": [null, V]},
                 "targets": {"key": "targets.npy", "dtype": "float16", "shape": [T, D]},
                 "images": {"key": "png", "dtype": "uint8", "shape": [H, W, 3]} | absent,
                 "vae": {"key": "vae.npy", "dtype": "float16", "shape": [4, h, w]} | absent,
                 "ids": {"key": "json", "content": {"index": "row in the source split", "split": .., "subject": ..}}},
      "splits": {"train": {"count": N, "reps": R, "fields": ["voxels", "targets", ...],
                           "source_split": "train",
                           "shards": [{"name": "train-000000.tar", "count": n, "bytes": b,
                                       "sha256": hex digest of the file}, ...]},
                 "val": {...}, "test": {...}},
      "val": {"fraction": 0.1, "seed": 0, "from_split": "train"},
      "voxel_stats": {"file": "stats.npz", "split": "train", "mean": "mean", "std": "std",
                      "over": "all repetitions of all train samples"},
      "retrieval_ceiling": {...}   # synthetic datasets only, see SyntheticSubject.retrieval_ceiling
    }

Voxel shape is ``[reps, V]`` per sample; ``reps`` may differ between splits. ``sha256`` was
added without a version bump: datasets written before it still load, their shards unverified
(one log line says so), and older readers ignore it.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from mindeye_dist.data.errors import DataError
from mindeye_dist.data.storage import Storage

FORMAT = "mindeye_dist.shards"
FORMAT_VERSION = 1
META_NAME = "meta.json"
STATS_NAME = "stats.npz"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_NOTED_UNVERIFIED: set[str] = set()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name under the dataset root, e.g. ``train-000003.tar``."""
    count: int
    """Samples in the shard."""
    bytes: int
    """Size of the shard file."""
    sha256: Optional[str] = None
    """SHA-256 of the shard file (hex), checked as loaders read it; None in datasets written
    before checksums were recorded (read unverified)."""

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "count": self.count, "bytes": self.bytes}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


@dataclass(frozen=True)
class SplitInfo:
    name: str
    """Split name (train, val, test, ...)."""
    count: int
    """Samples (unique stimuli) in the split."""
    reps: int
    """Voxel repetitions stored per sample."""
    fields: tuple[str, ...]
    """Fields present in every sample of the split (voxels, targets, images, vae)."""
    shards: tuple[ShardInfo, ...]
    """Shards in row order."""

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass
class DatasetMeta:
    """Parsed ``meta.json`` plus where it came from. Use :func:`read_meta` to get one."""

    url: str
    """Dataset root URL as given (local path or s3://...)."""
    s3_endpoint: Optional[str]
    """Endpoint used to reach it (None: AWS default or local)."""
    n_voxels: int
    n_tokens: int
    token_dim: int
    subject: int
    splits: dict[str, SplitInfo]
    raw: dict[str, Any] = field(repr=False)
    """The whole JSON document (command, source, retrieval_ceiling, ...)."""
    _stats: Optional[tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False)

    @property
    def storage(self) -> Storage:
        return Storage(self.url, self.s3_endpoint)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"split {name!r} is not in {self.url}; it has {sorted(self.splits)} (check data.*_split)")
        return self.splits[name]

    def shard_url(self, shard: ShardInfo) -> str:
        return self.storage.child(shard.name)

    def field_shape(self, name: str) -> Optional[tuple[int, ...]]:
        spec = self.raw["fields"].get(name)
        return None if spec is None else tuple(spec["shape"])

    def voxel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float32 arrays of shape (V,), from the train split only."""
        if self._stats is None:
            info = self.raw["voxel_stats"]
            data = self.storage.read_bytes(info["file"])
            with np.load(io.BytesIO(data)) as npz:
                mean = np.asarray(npz[info["mean"]], dtype=np.float32)
                std = np.asarray(npz[info["std"]], dtype=np.float32)
            if mean.shape != (self.n_voxels,) or std.shape != (self.n_voxels,) or not np.all(std > 0):
                raise DataError(f"{info['file']} in {self.url} is inconsistent with meta.json (shape or std <= 0); rebuild the dataset")
            self._stats = (mean, std)
        return self._stats

    def check_config(self, data_cfg: Any) -> None:
        """Config values that are set must agree with the dataset (DESIGN: meta.json is the default)."""
        for key, have in (("n_voxels", self.n_voxels), ("n_tokens", self.n_tokens), ("token_dim", self.token_dim)):
            want = getattr(data_cfg, key, None)
            if want is not None and want != have:
                raise DataError(f"data.{key}={want} disagrees with {self.url}/meta.json ({have}); remove the override or fix it")


def read_meta(url: str, s3_endpoint: Optional[str] = None) -> DatasetMeta:
    """Read and validate ``URL/meta.json``. A dataset without meta.json is incomplete (or absent)."""
    storage = Storage(url, s3_endpoint)
    if not storage.exists(META_NAME):
        raise DataError(
            f"no {META_NAME} at {storage.url}: not a dataset, or its writer did not finish "
            "(meta.json is written last). Run launchers/prepare_data.py to build it."
        )
    try:
        raw = json.loads(storage.read_bytes(META_NAME))
    except json.JSONDecodeError as err:
        raise DataError(f"{storage.child(META_NAME)} is not valid JSON ({err}); rebuild the dataset") from err
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{storage.child(META_NAME)} has format {raw.get('format')!r} version {raw.get('format_version')!r}; "
            f"this code reads {FORMAT!r} version {FORMAT_VERSION}. Rebuild with launchers/prepare_data.py."
        )
    try:
        splits = {
            name: SplitInfo(
                name=name,
                count=int(s["count"]),
                reps=int(s["reps"]),
                fields=tuple(s["fields"]),
                shards=tuple(_shard_info(sh) for sh in s["shards"]),
            )
            for name, s in raw["splits"].items()
        }
        meta = DatasetMeta(
            url=storage.url,
            s3_endpoint=storage.endpoint,
            n_voxels=int(raw["n_voxels"]),
            n_tokens=int(raw["n_tokens"]),
            token_dim=int(raw["token_dim"]),
            subject=int(raw.get("subject", 0)),
            splits=splits,
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{storage.child(META_NAME)} is missing or has a bad field ({err!r}); rebuild the dataset") from err
    for s in splits.values():
        if sum(sh.count for sh in s.shards) != s.count:
            raise DataError(f"{storage.child(META_NAME)}: split {s.name!r} shard counts do not add up to {s.count}; rebuild")
    unverified = sum(sh.sha256 is None for s in splits.values() for sh in s.shards)
    if unverified and storage.url not in _NOTED_UNVERIFIED:
        _NOTED_UNVERIFIED.add(storage.url)
        log.warning("%s: %d shard(s) have no checksum in meta.json (written before checksums were recorded) and are read "
                    "unverified; rebuild with launchers/prepare_data.py to verify them", storage.url, unverified)
    return meta


def _shard_info(entry: dict) -> ShardInfo:
    digest = entry.get("sha256")
    if digest is not None and not (isinstance(digest, str) and _SHA256_HEX.match(digest)):
        raise ValueError(f"shard {entry.get('name')!r} has a malformed sha256 {digest!r}")
    return ShardInfo(str(entry["name"]), int(entry["count"]), int(entry["bytes"]), digest)
