"""Stages of the webdataset pipeline and the per-epoch sample plan (see loader.py for the design).

A *segment* is a contiguous run of samples inside one shard (``skip`` samples in, ``take``
samples). An epoch's plan gives each (rank, worker) a list of segments and a batch count, so
shard boundaries never constrain how samples are divided.
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from mindeye_dist.data.batch import Batch
from mindeye_dist.data.errors import CorruptShardError, DataError, StorageError
from mindeye_dist.data.meta import ShardInfo
from mindeye_dist.data.storage import is_s3, open_shard, storage_errors, wait_open

_REQUIRED = {"voxels": "voxels.npy", "targets": "targets.npy", "images": "png", "vae": "vae.npy"}


def seed_for(*parts: int) -> int:
    """A 64-bit seed from integer parts (seed, epoch, rank, worker, purpose)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


# Purposes mixed into seeds so that different random choices never share a stream.
SHARD_ORDER, RESAMPLE, SHUFFLE, REPS = 11, 12, 13, 14


@dataclass(frozen=True)
class Segment:
    url: str
    """Shard URL (local path or s3://)."""
    name: str
    """Shard file name, used in messages."""
    skip: int
    """Samples skipped at the start of the shard."""
    take: int
    """Samples taken after the skip."""
    shard_count: int
    """Samples the shard holds according to meta.json (to detect truncation)."""
    endpoint: Optional[str] = None
    """S3 endpoint for s3:// URLs (None: the process default / AWS_ENDPOINT_URL)."""


@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[Segment, ...]
    """The worker's samples for the epoch, in order."""
    n_batches: int
    """Batches this worker yields in the epoch (before resume skipping)."""
    skip_batches: int
    """Leading batches already consumed (resume): read and shuffled, never decoded."""


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's shard order: one permutation shared by all ranks (seeded by seed, epoch)."""
    if not shuffle:
        return np.arange(n_shards)
    return np.random.default_rng(seed_for(seed, epoch, SHARD_ORDER)).permutation(n_shards)


def range_segments(shards: Sequence[ShardInfo], urls: Sequence[str], start: int, end: int, endpoint: Optional[str] = None) -> list[Segment]:
    """Segments covering samples [start, end) of the concatenation of ``shards``."""
    out, offset = [], 0
    for shard, url in zip(shards, urls):
        lo, hi = max(start, offset), min(end, offset + shard.count)
        if lo < hi:
            out.append(Segment(url, shard.name, lo - offset, hi - lo, shard.count, endpoint))
        offset += shard.count
    return out


def split_batches(n_batches: int, parts: int, part: int) -> tuple[int, int]:
    """(first batch, batch count) of ``part`` when ``n_batches`` are split into ``parts`` runs;
    the first ``n_batches % parts`` parts get one more."""
    q, r = divmod(n_batches, parts)
    return part * q + min(part, r), q + (part < r)


def skipped_local_batches(start_batch: int, num_workers: int, worker: int) -> int:
    """Batches of ``worker`` among the first ``start_batch`` outputs of a round-robin DataLoader
    (output i comes from worker i % K as its (i // K)-th batch)."""
    return max(0, -(-(start_batch - worker) // num_workers))


# --------------------------------------------------------------------------------------------
# Stages


def _group_samples(files: Iterable[dict], url: str) -> Iterator[dict]:
    """Group tar members ``key.ext`` into samples ``{"__key__": key, ext: bytes}`` (webdataset layout)."""
    current = None
    for f in files:
        key, _, ext = f["fname"].partition(".")
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        current[ext.lower()] = f["data"]
    if current is not None:
        yield current


def shard_samples(seg: Segment, fields: Sequence[str], stream: Optional[IO[bytes]] = None) -> Iterator[dict]:
    """Raw samples [skip, skip + take) of one shard, undecoded. Truncation, tar damage, a count
    that disagrees with meta.json or a missing field raise CorruptShardError naming the shard;
    unreachable storage raises StorageError. ``stream``: the shard already opened by
    :func:`open_shard` (a prefetch); it is closed here either way."""
    try:
        with storage_errors(seg.url, "open shard", seg.endpoint):
            if stream is None:
                stream = open_shard(seg.url, seg.endpoint)
            wait_open(stream)
    except BaseException:
        if stream is not None:
            stream.close()
        raise
    seen = 0
    try:
        for sample in _group_samples(wds.tariterators.tar_file_iterator(stream), seg.url):
            missing = [_REQUIRED[f] for f in fields if _REQUIRED[f] not in sample]
            if missing:
                raise CorruptShardError(f"shard {seg.url}: sample {sample['__key__']} lacks {missing}; rebuild the dataset")
            if seen >= seg.skip:
                yield sample
            seen += 1
            if seen >= seg.skip + seg.take and seg.skip + seg.take < seg.shard_count:
                return  # stop early: the rest of the shard belongs to someone else
        if seen != seg.shard_count:
            raise CorruptShardError(
                f"shard {seg.url} holds {seen} samples but meta.json says {seg.shard_count}: it is truncated "
                "or was replaced; rebuild the dataset or set data.on_corrupt=skip"
            )
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - tarfile/IO errors: decide corrupt vs storage
        text = f"{type(err).__name__}: {err}"
        if any(s in text.lower() for s in ("connect", "credential", "accessdenied", "access denied", "invalidaccesskey", "forbidden")):
            raise StorageError(f"reading shard {seg.url} failed: {text}; check the endpoint and credentials") from err
        raise CorruptShardError(
            f"shard {seg.url} is truncated or corrupt ({text}); rebuild it, or set data.on_corrupt=skip to skip and count it"
        ) from err
    finally:
        stream.close()


PREFETCH_SHARDS = int(os.environ.get("MINDEYE_PREFETCH_SHARDS", "1"))
"""Remote shards opened ahead of the one being decoded, per loader worker (each buffers at most
16 MB; see ``storage.PipelinedReader``). One hides a GET's first-byte latency behind a shard's
decoding; on the loopback server (no latency to hide, 2 CPU-bound workers) 0, 1 and 2 measured
within 5% of each other."""


def _open_ahead(seg: Segment) -> Optional[IO[bytes]]:
    try:
        return open_shard(seg.url, seg.endpoint)
    except Exception:  # noqa: BLE001 - shard_samples opens it again and reports the error properly
        return None


def read_segments(
    segments: Sequence[Segment], fields: Sequence[str], quota: Optional[int], on_corrupt: str, corrupt_counter, refill: bool
) -> Iterator[dict]:
    """Raw samples of ``segments`` in order, at most ``quota``. With on_corrupt='skip' a bad
    shard is skipped, counted and warned about; if ``refill``, the worker then reads its good
    segments again until ``quota`` is met, so every rank still yields the same number of batches
    (the price: a few repeated samples in that epoch)."""
    produced, bad = 0, set()
    while True:
        made = 0
        todo = [seg for seg in segments if seg.name not in bad]
        ahead: dict[int, IO[bytes]] = {}  # index in todo -> stream opened early
        try:
            for i, seg in enumerate(todo):
                stream = ahead.pop(i, None)
                for j in range(i + 1, min(i + 1 + PREFETCH_SHARDS, len(todo))):
                    if j not in ahead and is_s3(todo[j].url):
                        opened = _open_ahead(todo[j])  # its bytes arrive while this shard decodes
                        if opened is not None:
                            ahead[j] = opened
                try:
                    for sample in shard_samples(seg, fields, stream):
                        yield sample
                        produced += 1
                        made += 1
                        if quota is not None and produced >= quota:
                            return
                except CorruptShardError as err:
                    if on_corrupt != "skip":
                        raise
                    bad.add(seg.name)
                    if corrupt_counter is not None:
                        with corrupt_counter.get_lock():
                            corrupt_counter.value += 1
                    warnings.warn(f"skipping corrupt shard (data.on_corrupt=skip): {err}", RuntimeWarning, stacklevel=2)
        finally:
            for stream in ahead.values():
                stream.close()
        if quota is None or produced >= quota or not refill:
            return
        if made == 0:
            raise DataError(f"no readable samples in shards {sorted(bad)}: every shard of this worker is corrupt; rebuild the dataset")


def shuffle_buffer(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Sample-level shuffle: fill ``size`` samples, then emit a random one per new sample."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = sample
    rng.shuffle(buf)
    yield from buf


def skip_samples(samples: Iterable[dict], n: int) -> Iterator[dict]:
    """Drop the first ``n`` raw samples (resume: they were consumed before the interruption)."""
    for i, sample in enumerate(samples):
        if i >= n:
            yield sample


def decode_sample(sample: dict) -> dict:
    """Bytes -> arrays: voxels (R, V) float16, targets (T, D) float16, vae, image (H, W, 3) uint8, ids."""
    try:
        out = {
            "voxels": np.load(io.BytesIO(sample["voxels.npy"]), allow_pickle=False),
            "targets": np.load(io.BytesIO(sample["targets.npy"]), allow_pickle=False),
            "ids": json.loads(sample["json"]),
        }
        if "vae.npy" in sample:
            out["vae"] = np.load(io.BytesIO(sample["vae.npy"]), allow_pickle=False)
        if "png" in sample:
            from PIL import Image

            out["image"] = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    except Exception as err:  # noqa: BLE001 - any decode failure is a corrupt sample
        raise CorruptShardError(f"shard {sample.get('__url__')}: sample {sample.get('__key__')} cannot be decoded ({err}); rebuild the dataset") from err
    return out


def batched(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Lists of ``batch_size`` samples (the last one may be short)."""
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def reduce_reps(vox: np.ndarray, mode: str, rng: np.random.Generator, step: int) -> np.ndarray:
    """(B, R, V) -> (B, V). one: a random repetition per sample; convex: random convex weights
    (Dirichlet(1)); mean; cycle: repetition step % R for the whole batch (MindEye1 train loop)."""
    b, r, _ = vox.shape
    if r == 1 or mode == "mean":
        return vox.mean(axis=1)
    if mode == "one":
        return vox[np.arange(b), rng.integers(r, size=b)]
    if mode == "convex":
        w = rng.dirichlet(np.ones(r), size=b).astype(vox.dtype)  # (B, R)
        return np.einsum("br,brv->bv", w, vox)
    if mode == "cycle":
        return vox[:, step % r]
    raise DataError(f"data.train_reps={mode!r} is not one of one, convex, mean, cycle")


def collate(samples: list[dict], mean: np.ndarray, std: np.ndarray, reps: str, rng: np.random.Generator, step: int) -> Batch:
    """Decoded samples -> Batch: z-score voxels with train statistics, reduce repetitions, to torch."""
    vox = np.stack([s["voxels"] for s in samples]).astype(np.float32)  # (B, R, V)
    vox = (vox - mean) / std
    vox = reduce_reps(vox, reps, rng, step)  # (B, V)
    tgt = np.stack([s["targets"] for s in samples]).astype(np.float32)  # (B, T, D)
    vae = np.stack([s["vae"] for s in samples]).astype(np.float32) if "vae" in samples[0] else None
    img = np.stack([s["image"] for s in samples]) if "image" in samples[0] else None  # (B, H, W, 3)
    return Batch(
        voxels=torch.from_numpy(np.ascontiguousarray(vox)),
        targets=torch.from_numpy(tgt),
        vae=None if vae is None else torch.from_numpy(vae),
        images=None if img is None else torch.from_numpy(img),
        subject=torch.tensor([s["ids"]["subject"] for s in samples], dtype=torch.long),
        index=torch.tensor([s["ids"]["index"] for s in samples], dtype=torch.long),
    )
