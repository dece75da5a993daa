"""Resumable shard output for the importers (NSD, MindEye1 tars) and the targets step.

The arrays importer writes a whole dataset in one go (``writer.write_dataset``). The importers
here run for hours over data that does not fit in memory, so they need what that writer does
not offer: shards written one at a time with a record of which are finished (a progress file
in the dataset root, rewritten after each shard), shards rewritten in place with a new field,
and ``meta.json`` composed at the very end. The on-disk format is the same: webdataset tars
named ``{split}-{index:06d}.tar`` (each placed whole, see ``Storage.put_file``), ``stats.npz``,
and ``meta.json`` (schema in ``meta.py``) written last.

Tars are written with mtime 0, so the same samples always give the same bytes (and sha256).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import webdataset as wds

from mindeye_dist.data.errors import CorruptShardError, DataError
from mindeye_dist.data.meta import FORMAT, FORMAT_VERSION, META_NAME, STATS_NAME
from mindeye_dist.data.storage import Storage

SHARD_PATTERN = r"^[A-Za-z0-9_]+-\d{6}\.tar$"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard: where it starts in its split, how many samples, its size and digest."""

    name: str
    start: int
    count: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "start": self.start, "count": self.count, "bytes": self.bytes, "sha256": self.sha256}


def write_shard(storage: Storage, name: str, samples: Iterable[dict], start: int, tmp_dir: Optional[str] = None) -> ShardRecord:
    """Write ``samples`` (``{"__key__": .., ext: bytes}``) into one tar and place it whole as ``name``."""
    local_tmp = tmp_dir or (tempfile.gettempdir() if storage.remote else storage.root)
    tmp = os.path.join(local_tmp, f".{name}.partial-{uuid.uuid4().hex[:8]}")
    digest, count = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            tar = wds.TarWriter(f, encoder=False, mtime=0)
            for sample in samples:
                tar.write(sample)
                count += 1
            tar.close()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = os.path.getsize(tmp)
        storage.move_local_file(tmp, name)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ShardRecord(name, start, count, size, digest.hexdigest())


def read_shard(storage: Storage, name: str) -> Iterator[dict]:
    """Samples of one shard, undecoded, in order: ``{"__key__": key, ext: bytes}``."""
    with storage.open_read(name) as stream:
        current: Optional[dict] = None
        try:
            for member in wds.tariterators.tar_file_iterator(stream):
                key, _, ext = member["fname"].partition(".")
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                current[ext] = member["data"]
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - tar damage
            raise CorruptShardError(f"shard {storage.child(name)} is truncated or corrupt ({type(err).__name__}: {err}); "
                                    "rebuild the dataset") from err
        if current is not None:
            yield current


class Progress:
    """A small JSON file in the dataset root recording finished work for one fingerprint.

    ``fingerprint`` names everything that decides the output (options, inputs): a rerun with the
    same fingerprint resumes, a different one is refused (or starts over with overwrite).
    """

    def __init__(self, storage: Storage, name: str, fingerprint: str) -> None:
        self.storage, self.name, self.fingerprint = storage, name, fingerprint
        self.state: dict = {"fingerprint": fingerprint, "shards": {}}

    def load(self) -> Optional[str]:
        """Load the file; returns its fingerprint (None when absent)."""
        if not self.storage.exists(self.name):
            return None
        try:
            state = json.loads(self.storage.read_bytes(self.name))
            fp = str(state["fingerprint"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{self.storage.child(self.name)} is damaged ({err!r}); delete it (or pass --overwrite) to start over") from err
        if fp == self.fingerprint:
            self.state = state
        return fp

    def records(self, split: str) -> list[ShardRecord]:
        return [ShardRecord(**r) for r in self.state["shards"].get(split, [])]

    def add(self, split: str, record: ShardRecord) -> None:
        self.state["shards"].setdefault(split, []).append(record.to_json())
        self.save()

    def save(self) -> None:
        self.storage.write_bytes(self.name, json.dumps(self.state).encode())

    def remove(self) -> None:
        self.storage.remove(self.name)


def verified_records(storage: Storage, records: list[ShardRecord], split: str) -> list[ShardRecord]:
    """The leading records whose shard files still exist (a later one missing: redo from there)."""
    names = set(storage.list_names())
    out = []
    for i, r in enumerate(records):
        if r.name != shard_name(split, i) or r.name not in names:
            break
        out.append(r)
    return out


def clear_dataset(storage: Storage, extra: Iterable[str] = ()) -> None:
    """Delete meta.json first (readers then see no dataset), then shards, stats and ``extra``."""
    import re

    names = storage.list_names()
    if META_NAME in names:
        storage.remove(META_NAME)
    for n in names:
        if n == STATS_NAME or n in extra or re.match(SHARD_PATTERN, n):
            storage.remove(n)


def remove_partials(storage: Storage) -> int:
    """Delete temporary files a killed run left in a local dataset root (``.NAME.partial-*``);
    S3 roots never hold any (shards are built in a local temp folder, then PUT whole)."""
    if storage.remote or not os.path.isdir(storage.root):
        return 0
    stale = [n for n in os.listdir(storage.root) if n.startswith(".") and ".partial-" in n]
    for n in stale:
        os.remove(os.path.join(storage.root, n))
    return len(stale)


def foreign_files(storage: Storage, extra: Iterable[str] = ()) -> list[str]:
    import re

    return [n for n in storage.list_names() if n in (META_NAME, STATS_NAME, *extra) or re.match(SHARD_PATTERN, n)]


def stats_bytes(count: int, total: np.ndarray, total_sq: np.ndarray) -> bytes:
    """stats.npz as the writer makes it: mean/std over every stored repetition of train."""
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # constant voxels: centred, never divided by 0
    buf = io.BytesIO()
    np.savez(buf, mean=mean.astype(np.float32), std=std.astype(np.float32))
    return buf.getvalue()


def split_meta(records: list[ShardRecord], reps: int, fields: list[str], source_split: str) -> dict:
    return {
        "count": sum(r.count for r in records),
        "reps": reps,
        "fields": fields,
        "source_split": source_split,
        "shards": [{"name": r.name, "count": r.count, "bytes": r.bytes, "sha256": r.sha256} for r in records],
    }


def compose_meta(*, command: str, source: dict, subject: int, n_voxels: int, fields: dict, splits: dict,
                 extra: Optional[dict] = None) -> dict:
    """A meta.json document (schema in meta.py). ``n_tokens``/``token_dim`` come from the
    ``targets`` field, 0 while a dataset has none (``prepare_data.py targets`` adds it)."""
    tgt = fields.get("targets", {}).get("shape", [0, 0])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "source": source,
        "subject": int(subject),
        "n_voxels": int(n_voxels),
        "n_tokens": int(tgt[0]),
        "token_dim": int(tgt[1]) if len(tgt) > 1 else 0,
        "fields": fields,
        "splits": splits,
        "voxel_stats": {"file": STATS_NAME, "split": "train", "mean": "mean", "std": "std",
                        "over": "all repetitions of all train samples (float16 values as stored)"},
        **(extra or {}),
    }


def write_meta(storage: Storage, meta: dict) -> None:
    storage.write_bytes(META_NAME, json.dumps(meta, indent=2).encode())


def fingerprint(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]
