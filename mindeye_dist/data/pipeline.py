"""Our stages of the webdataset pipeline and the per-epoch sample plan (see loader.py for the design).

A *segment* is a contiguous run of samples inside one shard (``skip`` samples in, ``take``
samples). An epoch's plan gives each (rank, worker) a list of segments and a batch count, so
shard boundaries never constrain how samples are divided.

Reading a worker's exact share (:func:`read_segments`: checksums, per-sample checks, skip and
refill) is ours; tar parsing, grouping, shuffling, decoding and batching are webdataset's own
(``tar_file_iterator``, ``group_by_keys``, ``wds.shuffle``, ``wds.decode``, ``wds.batched``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import IO, Collection, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from mindeye_dist.data.batch import Batch
from mindeye_dist.data.errors import CorruptShardError, DataError, StorageError
from mindeye_dist.data.integrity import HashingReader, SkipCounter
from mindeye_dist.data.meta import DatasetMeta, ShardInfo, SplitInfo
from mindeye_dist.data.storage import classify_error, describe_error, is_s3, open_shard, wait_open

_REQUIRED = {"voxels": "voxels.npy", "targets": "targets.npy", "images": "png", "vae": "vae.npy",
             "teacher": "teacher.npy"}
_ARRAYS = ("voxels.npy", "targets.npy", "vae.npy", "teacher.npy")
"""Members decoded and checked (shape, NaN/inf) while reading, before the shuffle: a sample
dropped there is replaced from the worker's share, so batch counts stay exact and resume equal."""
_DECODED = ["voxels.npy", "targets.npy", "vae.npy", "teacher.npy", "png", "json"]
"""The only members webdataset's decoder touches (never a stray .pth/.pkl member: no unpickling)."""
FIX_FAIL = "rebuild the dataset (launchers/prepare_data.py), or set data.on_corrupt=skip to skip and count it"
FIX_SKIP = "rebuild the dataset to use it again"
_SAMPLE_WARNINGS = 3


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
    sha256: Optional[str] = None
    """The shard's checksum from meta.json (None: an old dataset, read unverified)."""


@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[Segment, ...]
    """The worker's samples for the epoch, in order."""
    n_batches: int
    """Batches this worker yields in the epoch (before resume skipping)."""
    skip_batches: int
    """Leading batches already consumed (resume): read and shuffled, never decoded."""
    sizes: Optional[tuple[int, ...]] = None
    """Resharded epochs (data/reshard.py): the worker's batch sizes (the last few may be
    smaller); None: ``n_batches`` full micro-batches."""
    wanted: Optional[frozenset] = None
    """Resharded epochs: the ``(shard name, position in shard)`` pairs to keep of what the
    segments read (the rest of the epoch is scattered); None: all of them."""
    leg: int = 0
    """Index of the epoch's leg (seeds of resharded legs differ from the first leg's)."""


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
            out.append(Segment(url, shard.name, lo - offset, hi - lo, shard.count, endpoint, shard.sha256))
        offset += shard.count
    return out


def expected_shapes(meta: DatasetMeta, split: SplitInfo) -> dict[str, tuple[int, ...]]:
    """Shape of each array member of a sample of ``split``, from meta.json."""
    shapes = {"voxels.npy": (split.reps, meta.n_voxels), "targets.npy": (meta.n_tokens, meta.token_dim)}
    for field in ("vae", "teacher"):
        shape = meta.field_shape(field)
        if shape is not None and field in split.fields:
            shapes[f"{field}.npy"] = tuple(shape)
    return shapes


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
# Reading: a worker's exact share of raw samples, verified


def _shard_error(seg: Segment, err: BaseException) -> DataError:
    """A read failure as StorageError (unreachable, access) or CorruptShardError (anything else)."""
    kind = classify_error(err)
    text = describe_error(err)
    if kind == "unreachable":
        return StorageError(f"reading shard {seg.url} failed: the S3 endpoint {seg.endpoint or '(AWS default)'} is unreachable "
                            f"({text}); check data.s3_endpoint / AWS_ENDPOINT_URL and that the server is up")
    if kind == "access":
        return StorageError(f"reading shard {seg.url} failed: access denied or invalid credentials ({text}); "
                            "check the standard AWS credentials and the bucket policy")
    if kind == "not_found":
        return CorruptShardError(f"shard {seg.url} listed in meta.json is missing ({text})")
    return CorruptShardError(f"shard {seg.url} is truncated or corrupt ({text})")


def _tar_samples(stream: IO[bytes], url: str) -> Iterator[dict]:
    """webdataset's tar reader and key grouping: ``{"__key__", "__url__", ext: bytes}`` per sample."""
    files = wds.tariterators.tar_file_iterator(stream)
    return wds.tariterators.group_by_keys(dict(f, __url__=url) for f in files)


def shard_samples(seg: Segment, fields: Sequence[str], stream: Optional[IO[bytes]] = None) -> Iterator[dict]:
    """Raw samples [skip, skip + take) of one shard, undecoded, each with ``__pos__`` (its index
    in the shard). Truncation, tar damage, a missing shard, a count that disagrees with meta.json,
    a missing field or a checksum mismatch raise CorruptShardError naming the shard (without the
    fix: :func:`read_segments` adds it); unreachable storage raises StorageError.

    With a checksum, the bytes are hashed as they pass; after the segment's last sample the rest
    of the shard is read (hashed, not parsed) and the digest compared *before* that last sample is
    yielded. ``stream``: the shard already opened by :func:`open_shard` (a prefetch); closed here."""
    try:
        if stream is None:
            stream = open_shard(seg.url, seg.endpoint)
        wait_open(stream)
    except BaseException as err:
        if stream is not None:
            stream.close()
        if isinstance(err, Exception) and not isinstance(err, DataError):
            raise _shard_error(seg, err) from err
        raise
    hashed = HashingReader(stream) if seg.sha256 else None
    seen, held = 0, None
    try:
        for sample in _tar_samples(hashed or stream, seg.url):
            missing = [_REQUIRED[f] for f in fields if _REQUIRED[f] not in sample]
            if missing:
                raise CorruptShardError(f"shard {seg.url}: sample {sample['__key__']} lacks {missing}")
            if seen >= seg.skip:
                if held is not None:
                    yield held
                held = dict(sample, __pos__=seen)
            seen += 1
            if seen >= seg.skip + seg.take and seg.skip + seg.take < seg.shard_count:
                break  # the rest of the shard belongs to someone else (read below only to hash it)
        else:
            if seen != seg.shard_count:
                raise CorruptShardError(f"shard {seg.url} holds {seen} samples but meta.json says {seg.shard_count}: "
                                        "it is truncated or was replaced")
        if hashed is not None:
            hashed.drain()
            if hashed.hexdigest() != seg.sha256:
                passed = max(0, seen - seg.skip - 1) if held is not None else 0
                raise CorruptShardError(f"shard {seg.url} fails its checksum ({hashed.n_bytes:,} bytes read, SHA-256 differs "
                                        f"from meta.json): its bytes changed after it was written ({passed} of its samples "
                                        "had already been passed on)")
        if held is not None:
            yield held
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - tarfile/IO errors: classified by type and S3 error code
        raise _shard_error(seg, err) from err
    finally:
        (hashed or stream).close()


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


def _load_npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def _nonfinite(a: np.ndarray) -> bool:
    if a.dtype == np.float16:  # isfinite on float16 is ~10x slower than this: exponent bits all ones
        return bool(a.size) and int((a.view(np.uint16) & 0x7FFF).max()) >= 0x7C00
    return a.dtype.kind in "fc" and not np.isfinite(a).all()


def check_sample(sample: dict, shapes: dict[str, tuple[int, ...]]) -> Optional[str]:
    """Decode the array members in place (bytes -> arrays) and check them: what is wrong, or None."""
    for key in _ARRAYS:
        if key not in sample:
            continue
        try:
            a = sample[key] = _load_npy(sample[key])
        except Exception as err:  # noqa: BLE001 - any decode failure is a corrupt sample
            return f"{key} cannot be decoded ({type(err).__name__}: {err})"
        want = shapes.get(key)
        if want is not None and tuple(a.shape) != tuple(want):
            return f"{key} has shape {tuple(a.shape)}, meta.json says {tuple(want)}"
        if _nonfinite(a):
            return f"{key} has NaN or inf values"
    return None


class _SampleSkips:
    """Per-sample problems under on_corrupt=skip: flag, count, warn about the first few."""

    def __init__(self, skips: Optional[SkipCounter]) -> None:
        self.skips, self.warned = skips, 0

    def __call__(self, seg: Segment, sample: dict, problem: str) -> None:
        if self.skips is not None:
            self.skips.sample(seg.name, sample["__pos__"])
        self.warned += 1
        if self.warned <= _SAMPLE_WARNINGS:
            more = "" if self.warned < _SAMPLE_WARNINGS else " (further skipped samples of this worker are only counted)"
            warnings.warn(f"skipping sample {sample['__key__']} of shard {seg.url} (data.on_corrupt=skip): {problem}; "
                          f"fix the source arrays and rebuild the dataset to use it{more}", RuntimeWarning, stacklevel=3)


def _segment_samples(seg: Segment, fields: Sequence[str], stream: Optional[IO[bytes]], on_corrupt: str,
                     shapes: dict[str, tuple[int, ...]], skips: Optional[SkipCounter], skip_sample: _SampleSkips,
                     bad: set) -> Iterator[dict]:
    """The good samples of one segment. A bad shard raises with the fix ('fail') or is added to
    ``bad``, flagged and warned about ('skip'); a bad sample likewise, one by one."""
    with contextlib.closing(shard_samples(seg, fields, stream)) as samples:
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except CorruptShardError as err:
                if on_corrupt != "skip":
                    raise CorruptShardError(f"{err}; {FIX_FAIL}") from err
                bad.add(seg.name)
                if skips is not None:
                    skips.shard(seg.name)
                warnings.warn(f"skipping shard {seg.name} (data.on_corrupt=skip): {err}; {FIX_SKIP}", RuntimeWarning, stacklevel=2)
                return
            problem = check_sample(sample, shapes)
            if problem is None:
                yield sample
            elif on_corrupt != "skip":
                raise CorruptShardError(f"shard {seg.url}: sample {sample['__key__']} {problem}; fix the source arrays and "
                                        "rebuild the dataset, or set data.on_corrupt=skip to skip and count such samples")
            else:
                skip_sample(seg, sample, problem)


def read_segments(segments: Sequence[Segment], fields: Sequence[str], quota: Optional[int], on_corrupt: str,
                  skips: Optional[SkipCounter], refill: bool, shapes: Optional[dict[str, tuple[int, ...]]] = None,
                  preskipped: Collection[str] = ()) -> Iterator[dict]:
    """Checked raw samples of ``segments`` in order, at most ``quota``; array members decoded.

    With on_corrupt='fail' a bad shard or sample raises naming it and the fix. With 'skip' it is
    skipped, flagged in ``skips`` and warned about; shards in ``preskipped`` (found missing or
    wrong-size at start) are never opened. If ``refill``, the worker then reads its good segments
    again until ``quota`` is met, so every rank still yields the same number of batches (the
    price: a few repeated samples in that epoch)."""
    produced, bad = 0, set(preskipped)
    skip_sample = _SampleSkips(skips)
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
                good = _segment_samples(seg, fields, stream, on_corrupt, shapes or {}, skips, skip_sample, bad)
                with contextlib.closing(good):
                    for sample in good:
                        yield sample
                        produced += 1
                        made += 1
                        if quota is not None and produced >= quota:
                            return
        finally:
            for stream in ahead.values():
                stream.close()
        if quota is None or produced >= quota or not refill:
            return
        if made == 0:
            raise DataError(f"no readable samples in shards {sorted(bad)}: every shard of this worker is corrupt or "
                            "missing; rebuild the dataset")


# --------------------------------------------------------------------------------------------
# Decoding and batching: webdataset's stages


def _decode_failed(exn: Exception) -> bool:
    """webdataset handler: a member that cannot be decoded (after the shuffle) fails naming it."""
    key, url, k = getattr(exn, "key", None), getattr(exn, "url", None), getattr(exn, "k", None)
    cause = exn.__cause__ or exn
    raise CorruptShardError(f"shard {url}: sample {key} member {k} cannot be decoded "
                            f"({type(cause).__name__}: {cause}); rebuild the dataset") from exn


def decode():
    """webdataset's decode stage: png -> uint8 (H, W, 3), json -> dict; arrays already decoded
    by :func:`check_sample` pass through (``partial``); no other member is decoded."""
    return wds.decode(wds.imagehandler("rgb8"), only=_DECODED, partial=True, handler=_decode_failed)


def decode_sample(sample: dict) -> dict:
    """One raw sample through :func:`check_sample` and :func:`decode` (tests, tools)."""
    sample = dict(sample)
    problem = check_sample(sample, {})
    if problem is not None:
        raise CorruptShardError(f"shard {sample.get('__url__')}: sample {sample.get('__key__')} {problem}")
    return next(iter(decode()(iter([sample]))))


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
    """Decoded samples (webdataset member names) -> Batch: z-score voxels with train statistics,
    reduce repetitions, to torch."""
    vox = np.stack([s["voxels.npy"] for s in samples]).astype(np.float32)  # (B, R, V)
    vox = (vox - mean) / std
    vox = reduce_reps(vox, reps, rng, step)  # (B, V)
    tgt = np.stack([s["targets.npy"] for s in samples]).astype(np.float32)  # (B, T, D)
    vae = np.stack([s["vae.npy"] for s in samples]).astype(np.float32) if "vae.npy" in samples[0] else None
    teacher = np.stack([s["teacher.npy"] for s in samples]).astype(np.float32) if "teacher.npy" in samples[0] else None
    img = np.stack([s["png"] for s in samples]) if "png" in samples[0] else None  # (B, H, W, 3)
    return Batch(
        voxels=torch.from_numpy(np.ascontiguousarray(vox)),
        targets=torch.from_numpy(tgt),
        vae=None if vae is None else torch.from_numpy(vae),
        teacher=None if teacher is None else torch.from_numpy(teacher),
        images=None if img is None else torch.from_numpy(img),
        subject=torch.tensor([s["json"]["subject"] for s in samples], dtype=torch.long),
        index=torch.tensor([s["json"]["index"] for s in samples], dtype=torch.long),
    )
