"""Shard writer: split arrays -> webdataset tars + ``stats.npz`` + ``meta.json`` (written last).

One sample per stimulus, keyed ``{split}_{row:08d}``:

- ``voxels.npy``  float16 ``[reps, V]``
- ``targets.npy`` float16 ``[T, D]``
- ``png``         uint8 RGB image (optional)
- ``vae.npy``     float16 ``[4, h, w]`` (optional)
- ``json``        ``{"index": row in the source split, "split": name, "subject": id}``

meta.json records each shard's name, sample count, size and SHA-256 of its bytes (computed as
they are written); loaders verify the checksum as they stream a shard (see integrity.py).

Nothing is half-written: each shard is written under a temporary name and placed whole
(``os.replace`` locally, one completed PUT on S3); ``meta.json`` is written after every shard and
``stats.npz`` are in place, and is deleted first when ``overwrite`` replaces a dataset. A failed
run removes what it placed and leaves no ``meta.json``, so readers never see a partial dataset.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import webdataset as wds

from mindeye_dist.data.errors import DataError
from mindeye_dist.data.integrity import HashingWriter
from mindeye_dist.data.meta import FORMAT, FORMAT_VERSION, META_NAME, STATS_NAME, DatasetMeta, ShardInfo, read_meta
from mindeye_dist.data.storage import Storage

DEFAULT_SHARD_SIZE_MB = 256.0  # big sequential reads, few objects (webdataset docs, "Sharding": OpenImages uses ~1 GB shards)
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_ROWS_PER_CHUNK = 256


@dataclass
class SplitSource:
    """Rows ``rows`` of the source arrays of ``source_split`` become output split ``name``."""

    name: str
    voxels: np.ndarray  # (N, R, V) float, possibly a memmap
    targets: np.ndarray  # (N, T, D) float
    images: Optional[np.ndarray]  # (N, H, W, 3) uint8
    vae: Optional[np.ndarray]  # (N, ...) float
    rows: np.ndarray  # increasing source row indices
    source_split: str

    @property
    def fields(self) -> list[str]:
        return ["voxels", "targets"] + [f for f in ("images", "vae") if getattr(self, f) is not None]


def carve_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (train_rows, val_rows), both sorted. ``fraction`` 0 gives no validation rows."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--val-fraction {fraction} must be in [0, 1)")
    n_val = int(round(fraction * n))
    if fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n:
        raise DataError(f"--val-fraction {fraction} leaves no training rows out of {n}; use a smaller fraction")
    val = np.sort(np.random.default_rng([int(seed), 7]).choice(n, n_val, replace=False))
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    return np.flatnonzero(keep), val


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _to_float16(a: np.ndarray, what: str, split: str, first_row: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = np.asarray(a).astype(np.float16)
    if not np.all(np.isfinite(out)):
        raise DataError(
            f"{split} {what} near source row {first_row} exceed the float16 range (|x| > {_FLOAT16_MAX:.0f}) "
            "or are not finite; rescale them (e.g. z-score voxels per session) before preparing shards"
        )
    return out


class ShardWriter:
    """Writes one split into tars of at most ``max_bytes`` / ``max_samples``; places each whole."""

    def __init__(self, storage: Storage, split: str, max_bytes: int, max_samples: Optional[int], tmp_dir: str, progress: bool) -> None:
        self.storage, self.split = storage, split
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.tmp_dir, self.progress = tmp_dir, progress
        self.shards: list[ShardInfo] = []
        self.placed: list[str] = []
        self._tar = self._file = self._tmp_path = None
        self._count = self._bytes = 0
        self._start = time.time()
        self._total = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp_path = os.path.join(self.tmp_dir, f".{name}.partial-{os.getpid()}")
        self._file = HashingWriter(open(self._tmp_path, "wb"))  # the checksum of exactly the bytes written
        self._tar = wds.TarWriter(self._file, encoder=False)
        self._count = self._bytes = 0

    def _close_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tar.close()  # ends the archive; a passed-in file stays open
        self._file.close()
        size = os.path.getsize(self._tmp_path)
        if size != self._file.n_bytes:
            raise DataError(f"{self._tmp_path}: {size} bytes on disk but {self._file.n_bytes} written; check the disk")
        self.storage.move_local_file(self._tmp_path, name)
        self.placed.append(name)
        self.shards.append(ShardInfo(name, self._count, size, self._file.hexdigest()))
        self._total += self._count
        self._tar = self._file = self._tmp_path = None
        if self.progress:
            rate = self._total / max(time.time() - self._start, 1e-9)
            print(f"[prepare_data] {self.split}: {name} {self.shards[-1].count} samples, {size / 1e6:.1f} MB "
                  f"({self._total} samples so far, {rate:.0f} samples/s)", file=sys.stderr, flush=True)

    def add(self, sample: dict) -> None:
        size = sum(len(v) + 512 for k, v in sample.items() if not k.startswith("__")) + 512
        if self._tar is not None and self._count > 0 and (
            self._bytes + size > self.max_bytes or (self.max_samples is not None and self._count >= self.max_samples)
        ):
            self._close_shard()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        self._bytes += size

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None and self._count > 0:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Remove the temporary file and everything this writer placed."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
        if self._tmp_path and os.path.exists(self._tmp_path):
            os.remove(self._tmp_path)
        for name in self.placed:
            try:
                self.storage.remove(name)
            except Exception:  # noqa: BLE001 - best-effort cleanup, the original error matters
                pass


def _write_split(src: SplitSource, writer: ShardWriter, subject: int, stats: Optional[list]) -> int:
    """Encode and write every row of ``src``; accumulate voxel sums into ``stats`` (train)."""
    for lo in range(0, len(src.rows), _ROWS_PER_CHUNK):
        rows = src.rows[lo:lo + _ROWS_PER_CHUNK]
        vox = _to_float16(src.voxels[rows], "voxels", src.source_split, int(rows[0]))
        if vox.ndim == 2:
            vox = vox[:, None, :]  # (n, V) -> (n, 1, V): one repetition
        tgt = _to_float16(src.targets[rows], "targets", src.source_split, int(rows[0]))
        vae = None if src.vae is None else _to_float16(src.vae[rows], "vae latents", src.source_split, int(rows[0]))
        imgs = None if src.images is None else np.asarray(src.images[rows])
        if stats is not None:
            flat = vox.reshape(-1, vox.shape[-1]).astype(np.float64)
            stats[0] += flat.shape[0]
            stats[1] += flat.sum(0)
            stats[2] += (flat**2).sum(0)
        for j, row in enumerate(rows):
            sample = {
                "__key__": f"{src.name}_{int(row):08d}",
                "voxels.npy": _npy_bytes(vox[j]),
                "targets.npy": _npy_bytes(tgt[j]),
                "json": json.dumps({"index": int(row), "split": src.source_split, "subject": subject}).encode(),
            }
            if imgs is not None:
                sample["png"] = _png_bytes(imgs[j])
            if vae is not None:
                sample["vae.npy"] = _npy_bytes(vae[j])
            writer.add(sample)
    return len(src.rows)


def _prepare_destination(storage: Storage, overwrite: bool) -> None:
    storage.makedirs()
    names = storage.list_names()
    ours = [n for n in names if n in (META_NAME, STATS_NAME) or _SHARD_NAME.match(n)]
    if ours and not overwrite:
        raise DataError(f"{storage.url} already holds a dataset ({', '.join(ours[:3])}...); pass --overwrite to replace it or choose another --out")
    if META_NAME in ours:
        storage.remove(META_NAME)  # first: from now on readers see "no dataset", never a mix
    for name in ours:
        if name != META_NAME:
            storage.remove(name)


def write_dataset(
    out_url: str,
    sources: list[SplitSource],
    *,
    subject: int = 1,
    command: str = "",
    source_info: Optional[dict] = None,
    extra_meta: Optional[dict] = None,
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB,
    max_samples_per_shard: Optional[int] = None,
    s3_endpoint: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetMeta:
    """Write ``sources`` as shards under ``out_url``; voxel stats come from the split named ``train``."""
    if shard_size_mb <= 0:
        raise DataError(f"--shard-size-mb {shard_size_mb} must be > 0")
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise DataError(f"--max-samples-per-shard {max_samples_per_shard} must be >= 1")
    names = [s.name for s in sources]
    if "train" not in names:
        raise DataError("a dataset needs a 'train' split (voxel statistics are computed on it)")
    for s in sources:
        if len(s.rows) == 0:
            raise DataError(f"split {s.name!r} is empty; every split needs at least one stimulus")
    storage = Storage(out_url, s3_endpoint)
    _prepare_destination(storage, overwrite)
    tmp_dir = storage.temp_dir()
    writers: list[ShardWriter] = []
    n_voxels = int(sources[0].voxels.shape[-1])
    stats = [0, np.zeros(n_voxels), np.zeros(n_voxels)]
    split_meta = {}
    try:
        for src in sources:
            w = ShardWriter(storage, src.name, int(shard_size_mb * 1e6), max_samples_per_shard, tmp_dir, progress)
            writers.append(w)
            _write_split(src, w, subject, stats if src.name == "train" else None)
            shards = w.finish()
            split_meta[src.name] = {
                "count": len(src.rows),
                "reps": int(src.voxels.shape[1]) if src.voxels.ndim == 3 else 1,
                "fields": src.fields,
                "source_split": src.source_split,
                "shards": [s.to_json() for s in shards],
            }
        count, total, total_sq = stats
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        std = np.where(std < 1e-6, 1.0, std)  # constant voxels: leave them centred, do not divide by 0
        buf = io.BytesIO()
        np.savez(buf, mean=mean.astype(np.float32), std=std.astype(np.float32))
        storage.write_bytes(STATS_NAME, buf.getvalue())
        first = sources[0]
        fields = {
            "voxels": {"key": "voxels.npy", "dtype": "float16", "shape": [None, n_voxels]},
            "targets": {"key": "targets.npy", "dtype": "float16", "shape": list(first.targets.shape[1:])},
            "ids": {"key": "json", "content": {"index": "row in the source split", "split": "source split", "subject": "subject id"}},
        }
        if any(s.images is not None for s in sources):
            img = next(s.images for s in sources if s.images is not None)
            fields["images"] = {"key": "png", "dtype": "uint8", "shape": list(img.shape[1:])}
        if any(s.vae is not None for s in sources):
            vae = next(s.vae for s in sources if s.vae is not None)
            fields["vae"] = {"key": "vae.npy", "dtype": "float16", "shape": list(vae.shape[1:])}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command or " ".join(sys.argv),
            "source": source_info or {},
            "subject": int(subject),
            "n_voxels": n_voxels,
            "n_tokens": int(first.targets.shape[1]),
            "token_dim": int(first.targets.shape[2]),
            "fields": fields,
            "splits": split_meta,
            "voxel_stats": {"file": STATS_NAME, "split": "train", "mean": "mean", "std": "std",
                            "over": "all repetitions of all train samples (float16 values as stored)"},
            **(extra_meta or {}),
        }
        storage.write_bytes(META_NAME, json.dumps(meta, indent=2).encode())  # last: the dataset now exists
    except BaseException:
        for w in writers:
            w.abort()
        for name in (META_NAME, STATS_NAME):
            try:
                storage.remove(name)
            except Exception:  # noqa: BLE001 - keep the original error
                pass
        raise
    finally:
        if storage.remote:
            import shutil

            shutil.rmtree(tmp_dir, ignore_errors=True)
    if progress:
        total = sum(s["count"] for s in split_meta.values())
        print(f"[prepare_data] wrote {total} samples in {sum(len(s['shards']) for s in split_meta.values())} shards to {storage.url}",
              file=sys.stderr, flush=True)
    return read_meta(storage.url, s3_endpoint)
