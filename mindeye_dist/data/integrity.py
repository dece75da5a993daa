"""Shard integrity: checksums written with each shard and verified while streaming it, a
presence-and-size check of every shard before training, and counts of what was skipped.

Checksum: SHA-256 of the whole shard file. Of hashlib's algorithms it is the fastest here
(OpenSSL uses the CPU's SHA extensions: 1.3 GB/s on this machine, blake2b 0.7, md5 0.45), so
verifying adds about 0.75 CPU seconds per GB read, once per shard read; and anyone can check a
shard by hand with ``sha256sum``.

Verification happens while the loader streams a shard (:class:`HashingReader` under the tar
parser), never as a separate pass: the reader that takes a segment of a shard hashes the bytes as
they pass, reads the rest of the shard after its segment (hashed, not parsed), and compares the
digest *before it releases the segment's last sample* (pipeline.shard_samples). So no shard's
reading completes unverified, and a mismatch stops the stream at that shard, naming it. Samples
released before the comparison may already sit in the shuffle buffer or a batch: under
``data.on_corrupt=fail`` the run then stops within about a shard plus a shuffle buffer of
samples, before the next shard of that worker is read; under ``skip`` the rest of the shard is
dropped and the shard counted. Holding a whole shard back until verified would cost a shard of
memory per worker (256 MB by default), so it is not done.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import IO, Collection, Optional, Sequence, Union

import numpy as np

from mindeye_dist.data.errors import CorruptShardError, DataError
from mindeye_dist.data.meta import DatasetMeta, SplitInfo, read_meta
from mindeye_dist.data.storage import Storage, head_object_size, storage_errors

log = logging.getLogger(__name__)

DIGEST = "sha256"
_DRAIN_CHUNK = 1 << 20
_HEAD_THREADS = 16
_LIST_SHOWN = 20


class HashingWriter(io.RawIOBase):
    """Write-through file wrapper that hashes every byte written (the shard writer's tar sink)."""

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self._f, self._hash, self.n_bytes = f, hashlib.new(DIGEST), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self._f.write(b)
        self._hash.update(memoryview(b)[:n])
        self.n_bytes += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class HashingReader(io.RawIOBase):
    """Read-through stream wrapper that hashes every byte read, in order (under the tar parser)."""

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self._f, self._hash, self.n_bytes = f, hashlib.new(DIGEST), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self._hash.update(data)
        self.n_bytes += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._hash.update(data)
        self.n_bytes += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest of the stream without parsing it."""
        while self.read(_DRAIN_CHUNK):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


# --------------------------------------------------------------------------------------------
# What a loader skipped under data.on_corrupt=skip


@dataclass(frozen=True)
class SkipCounts:
    shards: int
    """Distinct shards skipped (found corrupt while reading, or missing/wrong-size at start)."""
    samples: int
    """Distinct samples skipped one by one (NaN/inf, undecodable or misshapen arrays)."""
    shard_names: tuple[str, ...]
    """Names of the skipped shards."""

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        return {f"{prefix}skipped_shards": self.shards, f"{prefix}skipped_samples": self.samples}


class SkipCounter:
    """Which shards and samples of one split a loader skipped, across its DataLoader workers.

    One flag per shard and per sample in shared memory (created before the workers fork, set by
    whichever process finds the problem; setting a byte to 1 needs no lock), so counts are of
    distinct shards/samples however often an epoch re-reads them. Read with :meth:`counts`.
    """

    def __init__(self, split: SplitInfo, preskipped: Collection[str] = ()) -> None:
        ctx = multiprocessing.get_context()
        self._names = [s.name for s in split.shards]
        self._index = {name: i for i, name in enumerate(self._names)}
        self._first = np.concatenate([[0], np.cumsum([s.count for s in split.shards])[:-1]]).astype(int).tolist()
        self._shard_flags = ctx.RawArray("B", len(self._names))
        self._sample_flags = ctx.RawArray("B", max(1, split.count))
        for name in preskipped:
            if name in self._index:
                self.shard(name)

    def shard(self, name: str) -> None:
        self._shard_flags[self._index[name]] = 1

    def sample(self, shard_name: str, position: int) -> None:
        """Sample ``position`` (0-based, in tar order) of shard ``shard_name``."""
        self._sample_flags[self._first[self._index[shard_name]] + position] = 1

    def flags(self) -> np.ndarray:
        """Shard flags then sample flags, uint8 (a copy)."""
        return np.concatenate([np.frombuffer(self._shard_flags, np.uint8), np.frombuffer(self._sample_flags, np.uint8)])

    def counts(self, across_ranks: bool = False, device=None) -> SkipCounts:
        """What this loader skipped so far. ``across_ranks``: a collective (call it on every rank
        at the same point) that merges every rank's flags, so a shard two ranks both skipped
        counts once; ``device``: where the all-reduce runs (the training device under NCCL)."""
        flags = self.flags()
        if across_ranks:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                t = torch.from_numpy(flags.astype(np.int32)).to(device or "cpu")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                flags = t.cpu().numpy().astype(np.uint8)
        n = len(self._names)
        names = tuple(name for name, f in zip(self._names, flags[:n]) if f)
        return SkipCounts(shards=len(names), samples=int(flags[n:].sum()), shard_names=names)


# --------------------------------------------------------------------------------------------
# Every shard present with the size meta.json records, before training starts


@dataclass(frozen=True)
class ShardProblem:
    split: str
    name: str
    expected_bytes: int
    found_bytes: Optional[int]
    """None: the shard is missing."""

    def describe(self) -> str:
        if self.found_bytes is None:
            return f"{self.name}: missing (expected {self.expected_bytes:,} bytes)"
        what = "truncated" if self.found_bytes < self.expected_bytes else "larger than written"
        return f"{self.name}: {self.found_bytes:,} bytes, expected {self.expected_bytes:,} ({what})"


@dataclass(frozen=True)
class ShardCheck:
    """Result of :func:`check_shards`."""

    url: str
    checked: int
    """Shards looked at."""
    problems: tuple[ShardProblem, ...]
    """Missing or wrong-size shards (only possible with on_corrupt='skip'; 'fail' raises)."""
    unverified: int
    """Shards without a checksum in meta.json (datasets written before checksums)."""

    @property
    def skip_shards(self) -> frozenset[str]:
        """Names to pass to the loaders as ``skip_shards``."""
        return frozenset(p.name for p in self.problems)

    @property
    def warnings(self) -> int:
        return len(self.problems)


def _local_sizes(storage: Storage, names: Sequence[str]) -> dict[str, Optional[int]]:
    out: dict[str, Optional[int]] = {}
    for name in names:
        try:
            out[name] = os.stat(storage.child(name)).st_size
        except FileNotFoundError:
            out[name] = None
        except OSError as err:
            raise DataError(f"cannot stat {storage.child(name)}: {err}; check the path and its permissions") from err
    return out


def _s3_sizes_by_head(storage: Storage, names: Sequence[str]) -> dict[str, Optional[int]]:
    """One HEAD per object, ``_HEAD_THREADS`` at a time (S3 has no batch HEAD)."""
    with concurrent.futures.ThreadPoolExecutor(_HEAD_THREADS) as pool:
        sizes = pool.map(lambda n: head_object_size(storage.child(n), storage.endpoint), names)
        return dict(zip(names, sizes))


def _s3_sizes(storage: Storage, names: Sequence[str]) -> dict[str, Optional[int]]:
    """Sizes from one listing of the prefix (a request per 1,000 objects), or, where listing is
    not allowed (no s3:ListBucket), from one HEAD per object."""
    try:
        listed = storage.list_sizes()
    except PermissionError:
        log.info("listing %s is not allowed; checking its shards with one HEAD each", storage.url)
        return _s3_sizes_by_head(storage, names)
    return {name: listed.get(name) for name in names}


def check_shards(source: Union[DatasetMeta, str], splits: Optional[Sequence[str]] = ("train", "val"), *,
                 s3_endpoint: Optional[str] = None, on_corrupt: str = "fail") -> ShardCheck:
    """Check that every shard of ``splits`` (None: all) exists with the size meta.json records:
    a stat per file locally, one listing (or a HEAD per object) on S3. Split names the dataset
    lacks are ignored (e.g. no val split). Call once before training.

    ``on_corrupt='fail'``: raises CorruptShardError listing every missing or wrong-size shard
    (expected and found bytes) and the fixes. ``'skip'``: logs one warning and returns them in
    ``problems``; pass ``check.skip_shards`` to the loaders so they never open them.
    """
    meta = source if isinstance(source, DatasetMeta) else read_meta(source, s3_endpoint)
    names = list(meta.splits) if splits is None else [s for s in splits if s in meta.splits]
    shards = [(split, sh) for split in names for sh in meta.splits[split].shards]
    storage = meta.storage
    with storage_errors(storage.url, "check the shards of", storage.endpoint):
        sizes = (_s3_sizes if storage.remote else _local_sizes)(storage, [sh.name for _, sh in shards])
    problems = tuple(ShardProblem(split, sh.name, sh.bytes, sizes[sh.name]) for split, sh in shards
                     if sizes[sh.name] != sh.bytes)
    check = ShardCheck(storage.url, len(shards), problems, sum(sh.sha256 is None for _, sh in shards))
    if problems:
        listed = "; ".join(p.describe() for p in problems[:_LIST_SHOWN])
        more = f"; and {len(problems) - _LIST_SHOWN} more" if len(problems) > _LIST_SHOWN else ""
        what = f"{len(problems)} of {len(shards)} shards of {storage.url} ({', '.join(names)}) disagree with meta.json: {listed}{more}"
        if on_corrupt != "skip":
            raise CorruptShardError(f"{what}. Rebuild the dataset (launchers/prepare_data.py ... --overwrite) or restore "
                                    "those files; or set data.on_corrupt=skip to train without them (they are counted)")
        log.warning("%s. data.on_corrupt=skip: training without them (counted in the loader's skipped shards)", what)
    return check
