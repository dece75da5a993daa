"""MindEye1's released webdataset tars -> our shards, so users of that release switch without re-deriving anything.

The release (HF dataset ``pscotti/naturalscenesdataset``, folder ``webdataset_avg_split/``;
MindEye1 ``src/utils.py`` ``get_huggingface_urls`` and ``get_dataloaders``)::

    train/train_subj0S_{0..17}.tar   8,559 images
    val/val_subj0S_0.tar               300 images (MindEye1 trains on them too: num_train = 8559 + 300)
    test/test_subj0S_{0..1}.tar        982 shared images (MindEye1's "val" loader)

Each sample (key ``sample%09d``) holds ``nsdgeneral.npy`` (``[3, V]`` session-wise z-scored
betas, repetitions padded), ``jpg`` or ``png`` (the stimulus), ``coco73k.npy`` (index into the
73k NSD images), ``trial.npy`` and ``num_uniques.npy`` (real repetitions); MindEye1's loader
renames them voxels, images, coco, trial, reps.

Our samples: ``voxels.npy`` float16 ``[3, V]`` as stored there (already z-scored, not redone),
``png`` (their JPEG decoded once, stored losslessly), ``json`` ids with ``nsd_id`` (their
coco73k value), ``n_reps`` (num_uniques), ``trial`` (their trial.npy, whose exact meaning the
release does not document) and where the sample came from. Splits: ``test`` = their test.
``val_source="mindeye1"``: their 300-image val is our val and is *not* trained on (MindEye1
trained on it, and selected checkpoints on test); ``"carve"``: their val joins train (MindEye1's
8,859 training images) and ``val_fraction`` of that is carved out, seeded.

Resumable as the NSD importer: finished shards are listed in ``OUT/.mindeye1-import.json``; a
rerun with the same options re-reads the source only to skip to the first unfinished shard.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from mindeye_dist.data import shard_io as S
from mindeye_dist.data.errors import DataError
from mindeye_dist.data.meta import DatasetMeta, META_NAME, read_meta
from mindeye_dist.data.storage import Storage
from mindeye_dist.data.writer import DEFAULT_SHARD_SIZE_MB, carve_validation

PROGRESS_NAME = ".mindeye1-import.json"
SOURCE_SPLITS = ("train", "val", "test")
_NAME = re.compile(r"^(train|val|test)_subj0(\d)_(\d+)\.tar$")
_IMAGE_KEYS = ("jpg", "png", "jpeg")


@dataclass
class MindEye1TarsConfig:
    src: str
    """The webdataset_avg_split folder (train/, val/, test/), or a folder holding it; local or s3://."""
    out: str
    """Dataset root to write."""
    subject: Optional[int] = None
    """Subject to convert; None: the only one in ``src``."""
    val_source: str = "mindeye1"
    """mindeye1: their val split is our val; carve: their val joins train and val_fraction is carved out."""
    val_fraction: float = 0.1
    """Share of train+val carved out when val_source is carve."""
    seed: int = 0
    """Seed of that carve-out."""
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB
    """Maximum shard size."""
    max_samples_per_shard: Optional[int] = None
    """Also cap samples per shard (tests)."""
    s3_endpoint: Optional[str] = None
    """S3 endpoint for s3:// source or output."""
    overwrite: bool = False
    """Replace whatever is at ``out``."""
    progress: bool = True
    """Progress bars on stderr."""
    command: str = ""
    """Command line recorded in meta.json."""
    targets: list = field(default_factory=list)
    """Target specs to add afterwards (targets.TargetSpec)."""

    def __post_init__(self) -> None:
        if self.val_source not in ("mindeye1", "carve"):
            raise DataError(f"--val {self.val_source!r} is not mindeye1 or carve")


def find_tars(cfg: MindEye1TarsConfig) -> tuple[int, dict[str, list[str]]]:
    """(subject, split -> tar URLs in shard order)."""
    root = cfg.src.rstrip("/")
    if not Storage(root + "/train", cfg.s3_endpoint).list_names() and Storage(root + "/webdataset_avg_split/train", cfg.s3_endpoint).list_names():
        root += "/webdataset_avg_split"
    found: dict[int, dict[str, list[tuple[int, str]]]] = {}
    for split in SOURCE_SPLITS:
        st = Storage(f"{root}/{split}", cfg.s3_endpoint)
        for name in st.list_names():
            m = _NAME.match(name)
            if m and m.group(1) == split:
                found.setdefault(int(m.group(2)), {}).setdefault(split, []).append((int(m.group(3)), st.child(name)))
    if not found:
        raise DataError(f"no MindEye1 tars under {root}: expected train/train_subj0S_N.tar, val/val_subj0S_0.tar, "
                        "test/test_subj0S_N.tar (the webdataset_avg_split folder of pscotti/naturalscenesdataset)")
    subject = cfg.subject
    if subject is None:
        if len(found) > 1:
            raise DataError(f"{root} holds subjects {sorted(found)}; choose one with --subject")
        subject = next(iter(found))
    if subject not in found:
        raise DataError(f"{root} has no tars of subject {subject} (found subjects {sorted(found)})")
    splits = {s: [u for _, u in sorted(found[subject].get(s, []))] for s in SOURCE_SPLITS}
    missing = [s for s in SOURCE_SPLITS if not splits[s]]
    if missing:
        raise DataError(f"{root}: subject {subject} has no {', '.join(missing)} tars; the release has train, val and test")
    return subject, splits


def _open(url: str, endpoint: Optional[str]):
    parent, _, name = url.rpartition("/")
    return Storage(parent, endpoint).open_read(name)


def source_samples(urls: list[str], endpoint: Optional[str]) -> Iterator[tuple[str, dict]]:
    """(tar URL, raw sample) in order, grouped by key as webdataset does."""
    import webdataset as wds

    for url in urls:
        with _open(url, endpoint) as stream:
            current: Optional[dict] = None
            try:
                for member in wds.tariterators.tar_file_iterator(stream):
                    key, _, ext = member["fname"].partition(".")
                    if current is None or key != current["__key__"]:
                        if current is not None:
                            yield url, current
                        current = {"__key__": key}
                    current[ext] = member["data"]
            except DataError:
                raise
            except Exception as err:  # noqa: BLE001 - tar damage
                raise DataError(f"{url} is truncated or not a tar ({type(err).__name__}: {err}); download it again") from err
            if current is not None:
                yield url, current


def count_samples(urls: list[str], endpoint: Optional[str]) -> int:
    """Samples in the tars (headers only where the storage can seek)."""
    import tarfile

    n = 0
    for url in urls:
        with _open(url, endpoint) as stream:
            keys = {m.name.partition(".")[0] for m in tarfile.open(fileobj=stream, mode="r:")}
        n += len(keys)
    return n


def _scalar(sample: dict, key: str, where: str) -> Optional[int]:
    if key not in sample:
        return None
    a = S.load_npy(sample[key]).reshape(-1)
    if a.size != 1:
        raise DataError(f"{where}: {key} has {a.size} values; MindEye1 stores one")
    return int(a[0])


def convert_sample(url: str, raw: dict, split: str, row: int, subject: int) -> dict:
    """One of their samples -> one of ours (see the module docstring)."""
    where = f"{url} sample {raw['__key__']}"
    if "nsdgeneral.npy" not in raw:
        raise DataError(f"{where} has no nsdgeneral.npy (members: {sorted(k for k in raw if k != '__key__')})")
    image_key = next((k for k in _IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise DataError(f"{where} has no jpg/png image")
    vox = S.load_npy(raw["nsdgeneral.npy"]).astype(np.float32)
    vox = vox[None] if vox.ndim == 1 else vox
    if vox.ndim != 2 or not np.all(np.isfinite(vox)) or np.abs(vox).max() > 65000:
        raise DataError(f"{where}: nsdgeneral.npy has shape {vox.shape} or values that are not finite float16; expected [reps, voxels]")
    ids = {"index": row, "split": split, "subject": subject, "nsd_id": _scalar(raw, "coco73k.npy", where),
           "n_reps": _scalar(raw, "num_uniques.npy", where), "trial": _scalar(raw, "trial.npy", where),
           "source": {"tar": url.rsplit("/", 1)[-1], "key": raw["__key__"]}}
    return {"__key__": f"{split}_{row:08d}", "voxels.npy": S.npy_bytes(vox.astype(np.float16)),
            "png": S.png_bytes(S.decode_image(raw[image_key])), "json": json.dumps(ids).encode()}


# --------------------------------------------------------------------------------------------
# Writing, resumably


def _assign(cfg: MindEye1TarsConfig, tars: dict[str, list[str]]) -> dict[str, tuple[list[str], Optional[set]]]:
    """Output split -> (source tars, selected sample positions in them, or None for all)."""
    if cfg.val_source == "mindeye1":
        return {"train": (tars["train"], None), "val": (tars["val"], None), "test": (tars["test"], None)}
    pool = tars["train"] + tars["val"]
    train_rows, val_rows = carve_validation(count_samples(pool, cfg.s3_endpoint), cfg.val_fraction, cfg.seed)
    out = {"train": (pool, set(train_rows.tolist()))}
    if len(val_rows):
        out["val"] = (pool, set(val_rows.tolist()))
    out["test"] = (tars["test"], None)
    return out


def _rows(urls: list[str], selected: Optional[set], skip: int, endpoint: Optional[str]) -> Iterator[tuple[str, dict]]:
    kept = 0
    for pos, (url, raw) in enumerate(source_samples(urls, endpoint)):
        if selected is not None and pos not in selected:
            continue
        if kept >= skip:
            yield url, raw
        kept += 1


class _Peekable:
    def __init__(self, it: Iterator) -> None:
        self.it, self.head = it, None
        self.done = False
        self._advance()

    def _advance(self) -> None:
        try:
            self.head = next(self.it)
        except StopIteration:
            self.done = True

    def pop(self):
        value = self.head
        self._advance()
        return value


def _shard(rows: _Peekable, split: str, start: int, subject: int, cfg: MindEye1TarsConfig, shape: list, bar) -> Iterator[dict]:
    budget, size, n = int(cfg.shard_size_mb * 1e6), 0, 0
    while not rows.done:
        url, raw = rows.head
        sample = convert_sample(url, raw, split, start + n, subject)
        vshape = S.load_npy(sample["voxels.npy"]).shape
        if shape and list(vshape) != shape[0]:
            raise DataError(f"{url} sample {raw['__key__']}: nsdgeneral.npy is {vshape}, earlier samples {tuple(shape[0])}")
        nbytes = sum(len(v) + 512 for k, v in sample.items() if k != "__key__")
        if n and (size + nbytes > budget or (cfg.max_samples_per_shard and n >= cfg.max_samples_per_shard)):
            return
        if not shape:
            shape += [list(vshape), list(S.decode_image(sample["png"]).shape)]
        rows.pop()
        size, n = size + nbytes, n + 1
        bar.update(1)
        yield sample


def _write_split(storage: Storage, split: str, source: tuple[list[str], Optional[set]], subject: int,
                 cfg: MindEye1TarsConfig, progress: S.Progress, shape: list, bar) -> list[S.ShardRecord]:
    records = S.verified_records(storage, progress.records(split), split)
    progress.state["shards"][split] = [r.to_json() for r in records]
    start = sum(r.count for r in records)
    if records and not shape:  # resumed: shapes from a finished shard
        first = next(S.read_shard(storage, records[0].name))
        shape += [list(S.load_npy(first["voxels.npy"]).shape), list(S.decode_image(first["png"]).shape)]
    bar.update(start)
    rows = _Peekable(_rows(*source, start, cfg.s3_endpoint))
    while not rows.done:
        rec = S.write_shard(storage, S.shard_name(split, len(records)), _shard(rows, split, start, subject, cfg, shape, bar), start)
        progress.add(split, rec)
        records.append(rec)
        start += rec.count
    if not records:
        raise DataError(f"split {split!r} of subject {subject} is empty in {cfg.src}")
    return records


def _train_stats(storage: Storage, records: list[S.ShardRecord], n_voxels: int) -> bytes:
    count, total, total_sq = 0, np.zeros(n_voxels), np.zeros(n_voxels)
    for rec in records:
        for raw in S.read_shard(storage, rec.name):
            v = S.load_npy(raw["voxels.npy"]).astype(np.float64)
            count, total, total_sq = count + len(v), total + v.sum(0), total_sq + (v * v).sum(0)
    return S.stats_bytes(count, total, total_sq)


def _prepare_output(storage: Storage, fp: str, cfg: MindEye1TarsConfig) -> tuple[S.Progress, bool]:
    storage.makedirs()
    S.remove_partials(storage)  # a killed run's half-written shard
    progress = S.Progress(storage, PROGRESS_NAME, fp)
    if cfg.overwrite:
        S.clear_dataset(storage, extra=[PROGRESS_NAME])
        return progress, False
    if storage.exists(META_NAME):
        if read_meta(storage.url, cfg.s3_endpoint).raw.get("source", {}).get("fingerprint") == fp:
            return progress, True
        raise DataError(f"{storage.url} already holds a dataset made otherwise; pass --overwrite or choose another --out")
    have = progress.load()
    if (have is None and S.foreign_files(storage)) or (have is not None and have != fp):
        raise DataError(f"{storage.url} holds shards of another import; rerun with the same options to resume, or --overwrite")
    return progress, False


def import_mindeye1_tars(cfg: MindEye1TarsConfig) -> DatasetMeta:
    """Convert one subject's release (see the module docstring); returns the dataset's meta."""
    from tqdm import tqdm

    subject, tars = find_tars(cfg)
    storage = Storage(cfg.out, cfg.s3_endpoint)
    fp = S.fingerprint({"tars": tars, "subject": subject, "val": cfg.val_source, "fraction": cfg.val_fraction,
                        "seed": cfg.seed, "size": cfg.shard_size_mb, "cap": cfg.max_samples_per_shard})
    progress, done = _prepare_output(storage, fp, cfg)
    if not done:
        shape: list = []
        records = {}
        with tqdm(desc=f"MindEye1 subj0{subject}", unit="img", disable=not cfg.progress, file=sys.stderr) as bar:
            for split, source in _assign(cfg, tars).items():
                records[split] = _write_split(storage, split, source, subject, cfg, progress, shape, bar)
        (reps, n_voxels), image_shape = shape[0], shape[1]
        storage.write_bytes(S.STATS_NAME, _train_stats(storage, records["train"], n_voxels))
        fields = {"voxels": {"key": "voxels.npy", "dtype": "float16", "shape": [None, n_voxels]},
                  "images": {"key": "png", "dtype": "uint8", "shape": image_shape},
                  "ids": {"key": "json", "content": {"index": "row in the split", "split": "split", "subject": "subject",
                                                      "nsd_id": "their coco73k.npy", "n_reps": "their num_uniques.npy",
                                                      "trial": "their trial.npy", "source": "tar and key it came from"}}}
        splits = {n: S.split_meta(r, reps, ["voxels", "images"], "test" if n == "test" else "train") for n, r in records.items()}
        source = {"kind": "mindeye1-tars", "src": cfg.src, "subject": subject, "fingerprint": fp, "val_source": cfg.val_source,
                  "tars": {k: [u.rsplit("/", 1)[-1] for u in v] for k, v in tars.items()},
                  "voxels": "as released: session-wise z-scored nsdgeneral betas, [3, V] with padded repetitions"}
        S.write_meta(storage, S.compose_meta(command=cfg.command, source=source, subject=subject, n_voxels=n_voxels,
                                             fields=fields, splits=splits,
                                             extra={"val": {"source": cfg.val_source, "fraction": cfg.val_fraction, "seed": cfg.seed}}))
        progress.remove()
    if cfg.targets:
        from mindeye_dist.data.targets import add_targets

        for spec in cfg.targets:
            add_targets(storage.url, spec, s3_endpoint=cfg.s3_endpoint, progress=cfg.progress)
    return read_meta(storage.url, cfg.s3_endpoint)
