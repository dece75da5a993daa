"""NSD importer: the official Natural Scenes Dataset files -> shards, one sample per image.

    meta = import_nsd(NsdImportConfig(nsd_root="/data/nsd", subject=1, out="data/subj01"))

What a sample holds (``launchers/prepare_data.py nsd`` documents the options):

- ``voxels.npy`` float16 ``[3, V]``: the image's repetitions in trial order, nsdgeneral voxels in
  MindEye's order (C order over the NIfTI grid of ``mask > 0``), betas / 300, z-scored per voxel
  within each session (``zscore``). An image seen fewer than 3 times in the imported sessions is
  padded as MindEye's Algonauts writer does (``src/algo_webdataset_creation.py``): 1 repetition
  is repeated 3 times, 2 get their mean appended, so the mean over the 3 rows is always the mean
  of the real repetitions; ``n_reps`` says how many are real (``min_reps`` drops images with fewer).
- ``png``: ``imgBrick[nsd_id]`` (425 x 425 unless ``image_size``).
- ``json`` (the ``ids`` field): ``index`` (row in the split), ``split``, ``subject`` (NSD's 1-8),
  ``nsd_id`` (0-based 73k index), ``n_reps``, and per real repetition ``trials`` (0-based trial in
  the subject's NSD sequence = row of ``masterordering``; 1-based it is the
  ``subjectN_repK`` value of ``nsd_stim_info_merged.csv``), ``sessions`` (1-based) and
  ``session_trials`` (0-based row in that session's betas file); ``shared1000``.

Splits: ``test`` = the shared images of the ``test_set`` seen in ``test_sessions``; ``train`` = the
other (subject-unique) images seen in ``sessions``, minus a seeded ``val`` carve-out. Shared
images outside the test set (``shared982`` leaves some out) are in no split.

How it streams and resumes: stage 1 reads one session at a time (chunks of trials), masks and
z-scores it and keeps it as a float16 ``(trials, V)`` file in ``work_dir`` (a 40-session subject:
about 1 GB); a session is finished when its file and a matching fingerprint are there. Stage 2
writes shards one at a time from that cache and the stimuli; a shard is finished when it is
listed in ``OUT/.nsd-import.json`` (rewritten after each placement) with the same fingerprint.
A rerun with the same options skips finished sessions and shards; ``meta.json`` comes last,
then the progress file and the work directory are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from mindeye_dist.data import nsd_layout as L
from mindeye_dist.data import shard_io as S
from mindeye_dist.data.errors import DataError
from mindeye_dist.data.meta import DatasetMeta, META_NAME, read_meta
from mindeye_dist.data.storage import Storage
from mindeye_dist.data.writer import DEFAULT_SHARD_SIZE_MB, carve_validation

PROGRESS_NAME = ".nsd-import.json"
MAX_REPS = 3  # NSD shows every image at most 3 times
ZSCORE_MODES = ("session", "session-nonshared", "none")
TEST_SETS = ("shared1000", "shared982")
RELEASES = ("nifti", "hdf5")


@dataclass
class NsdImportConfig:
    nsd_root: str
    """NSD root (holds nsddata/, nsddata_betas/, nsddata_stimuli/): a local path or s3://bucket/prefix."""
    subject: int
    """NSD subject, 1-8."""
    out: str
    """Dataset root to write: local path or s3://bucket/prefix."""
    sessions: Optional[str] = None
    """Sessions whose trials form train/val, e.g. "1-40" or "1" (MindEye2's 1-hour setting); None: all the subject has."""
    test_sessions: Optional[str] = None
    """Sessions whose trials form test; None: the same as ``sessions``."""
    betas: str = "nifti"
    """Release to read: nifti (betas_sessionNN.nii.gz) or hdf5 (betas_sessionNN.hdf5); both give the same shards."""
    beta_version: str = L.DEFAULT_BETA_VERSION
    """GLMsingle version folder (MindEye2's notebook reads betas_fithrf)."""
    test_set: str = "shared1000"
    """shared1000: every shared image; shared982: the shared images shown in sessions 1-37 (MindEye1's test set)."""
    zscore: str = "session"
    """session: per voxel within each session over all its trials (MindEye1, MindEye2's notebook);
    session-nonshared: statistics from the non-shared trials only (MindEye2 paper); none: betas / 300."""
    val_fraction: float = 0.1
    """Share of the train images carved out (seeded) as the val split; 0: no val split."""
    seed: int = 0
    """Seed of the val carve-out."""
    min_reps: int = 1
    """Drop images with fewer real repetitions than this in the imported sessions (1-3)."""
    image_size: Optional[int] = None
    """Resize stimuli to this square size (bicubic); None keeps NSD's 425."""
    check_stim_info: bool = True
    """Cross-check every imported trial against nsd_stim_info_merged.csv."""
    work_dir: Optional[str] = None
    """Session cache (float16 betas); default OUT/.nsd-work locally, a temp folder for S3 output."""
    keep_work: bool = False
    """Keep the session cache after success (re-imports with other splits reuse it)."""
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB
    """Maximum shard size."""
    max_samples_per_shard: Optional[int] = None
    """Also cap samples per shard (tests)."""
    s3_endpoint: Optional[str] = None
    """S3 endpoint for s3:// input and output (default AWS_ENDPOINT_URL or AWS)."""
    overwrite: bool = False
    """Replace whatever dataset or unfinished import is at ``out``."""
    progress: bool = True
    """Progress bars on stderr."""
    command: str = ""
    """The command line recorded in meta.json."""
    targets: list = field(default_factory=list)
    """Target specs to add after the import (``targets.TargetSpec``); empty: voxels, images and ids only."""

    def __post_init__(self) -> None:
        if not 1 <= int(self.subject) <= len(L.NSD_SESSIONS):
            raise DataError(f"--subject {self.subject}: NSD has subjects 1-{len(L.NSD_SESSIONS)}")
        for name, value, allowed in (("--betas", self.betas, RELEASES), ("--zscore", self.zscore, ZSCORE_MODES),
                                     ("--test", self.test_set, TEST_SETS)):
            if value not in allowed:
                raise DataError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if not 1 <= self.min_reps <= MAX_REPS:
            raise DataError(f"--min-reps {self.min_reps} must be in 1..{MAX_REPS}")
        if self.image_size is not None and self.image_size < 8:
            raise DataError(f"--image-size {self.image_size} is too small")


@dataclass(frozen=True)
class Sample:
    nsd_id: int
    """0-based 73k image index."""
    trials: tuple[int, ...]
    """0-based global trials of its real repetitions, in order."""


@dataclass
class ImportPlan:
    """Which trials become which samples; cheap to build, decides everything stage 2 writes."""

    subject: int
    train_sessions: tuple[int, ...]
    test_sessions: tuple[int, ...]
    splits: dict[str, list[Sample]]
    trial_session: np.ndarray  # (n_trials,) 1-based session of every trial
    session_start: dict[int, int]  # session -> its first global trial
    shared: frozenset  # 0-based 73k ids of every shared image
    dropped: dict[str, int]

    @property
    def read_sessions(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.train_sessions) | set(self.test_sessions)))

    def used_trials(self) -> np.ndarray:
        return np.array(sorted(t for samples in self.splits.values() for s in samples for t in s.trials), dtype=np.int64)


def test_images(design: L.Design, test_set: str) -> frozenset:
    """0-based 73k ids of the test set. shared982: the shared images with a trial in sessions
    1-37, the sessions public when brain-diffuser and MindEye1 made their splits (brain-diffuser
    ``prepare_nsddata.py``: ``num_trials = 37*750``, ``masterordering <= 1000``). The 10k order is
    common to all subjects, so the set is too. That this gives exactly 982 on the real design is
    consistent with MindEye1's ``num_val = 982`` but is not checked here (no NSD files here)."""
    if test_set == "shared1000":
        return frozenset(int(i) for i in design.sharedix)
    n = min(L.MINDEYE1_SESSIONS, design.n_sessions)
    shown = design.subjectim[0, design.masterordering[: design.session_starts[n]]]  # any subject: shared ids agree
    return frozenset(int(i) for i in np.intersect1d(shown, design.sharedix))


def _group(trials: np.ndarray, nsd_ids: np.ndarray, min_reps: int, dropped: dict, split: str) -> list[Sample]:
    groups: dict[int, list[int]] = {}
    for t in trials:
        groups.setdefault(int(nsd_ids[t]), []).append(int(t))
    out = []
    for nsd_id in sorted(groups):
        reps = sorted(groups[nsd_id])
        if len(reps) > MAX_REPS:
            raise DataError(f"image {nsd_id} has {len(reps)} trials; NSD shows an image at most {MAX_REPS} times (bad expdesign?)")
        if len(reps) < min_reps:
            dropped[f"{split}_fewer_than_min_reps"] = dropped.get(f"{split}_fewer_than_min_reps", 0) + 1
            continue
        out.append(Sample(nsd_id, tuple(reps)))
    return out


def build_plan(design: L.Design, cfg: NsdImportConfig) -> ImportPlan:
    available = design.sessions_of(cfg.subject)
    train_sessions = L.parse_sessions(cfg.sessions, available, cfg.subject)
    test_sessions = train_sessions if cfg.test_sessions is None else L.parse_sessions(cfg.test_sessions, available, cfg.subject)
    nsd_ids = design.nsd_ids(cfg.subject)
    sessions = design.trial_sessions()
    shared = frozenset(int(i) for i in design.sharedix)
    is_shared = np.isin(nsd_ids, list(shared))
    in_test_set = np.isin(nsd_ids, list(test_images(design, cfg.test_set)))
    dropped: dict[str, int] = {}
    train_trials = np.flatnonzero(np.isin(sessions, train_sessions) & ~is_shared)
    test_trials = np.flatnonzero(np.isin(sessions, test_sessions) & in_test_set)
    outside = np.isin(sessions, test_sessions) & is_shared & ~in_test_set
    dropped["shared_images_outside_test_set"] = len(np.unique(nsd_ids[outside]))
    train = _group(train_trials, nsd_ids, cfg.min_reps, dropped, "train")
    test = _group(test_trials, nsd_ids, cfg.min_reps, dropped, "test")
    if not train or not test:
        raise DataError(f"subject {cfg.subject}, sessions {cfg.sessions or 'all'} / test sessions {cfg.test_sessions or 'same'}: "
                        f"{len(train)} train and {len(test)} test images; both splits need at least one")
    train_rows, val_rows = carve_validation(len(train), cfg.val_fraction, cfg.seed)
    splits = {"train": [train[i] for i in train_rows]}
    if len(val_rows):
        splits["val"] = [train[i] for i in val_rows]
    splits["test"] = test
    starts = {s: int(design.session_starts[s - 1]) for s in set(train_sessions) | set(test_sessions)}
    return ImportPlan(cfg.subject, train_sessions, test_sessions, splits, sessions, starts, shared, dropped)


# --------------------------------------------------------------------------------------------
# Stage 1: one session at a time -> float16 (trials, V) in the work directory


def _zscore(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per voxel over ``rows`` (ddof 0, as sklearn's StandardScaler in MindEye2's notebook; a
    constant voxel keeps scale 1)."""
    ref = x[rows].astype(np.float64)
    mean, std = ref.mean(axis=0), ref.std(axis=0)
    std = np.where(std < 1e-8, 1.0, std)
    return (x - mean) / std


class SessionCache:
    def __init__(self, work_dir: str, fingerprint: dict) -> None:
        self.dir, self.fingerprint = work_dir, fingerprint
        os.makedirs(work_dir, exist_ok=True)

    def path(self, session: int) -> str:
        return os.path.join(self.dir, f"session{session:02d}.npy")

    def _stamp(self, session: int) -> str:
        return os.path.join(self.dir, f"session{session:02d}.json")

    def _key(self, session: int) -> str:
        return json.dumps({**self.fingerprint, "session": session}, sort_keys=True)

    def done(self, session: int) -> bool:
        if not (os.path.exists(self.path(session)) and os.path.exists(self._stamp(session))):
            return False
        with open(self._stamp(session)) as f:
            return f.read() == self._key(session)

    def store(self, session: int, values: np.ndarray) -> None:
        tmp = self.path(session) + ".partial.npy"
        np.save(tmp, values.astype(np.float16))
        os.replace(tmp, self.path(session))
        with open(self._stamp(session) + ".partial", "w") as f:
            f.write(self._key(session))
        os.replace(self._stamp(session) + ".partial", self._stamp(session))  # stamp last: the pair is complete

    def load(self, session: int) -> np.ndarray:
        return np.load(self.path(session), mmap_mode="r")


def cache_sessions(source: L.NsdSource, design: L.Design, plan: ImportPlan, cfg: NsdImportConfig,
                   mask: L.Mask, cache: SessionCache) -> None:
    from tqdm import tqdm

    nsd_ids = design.nsd_ids(cfg.subject)
    todo = [s for s in plan.read_sessions if not cache.done(s)]
    for session in tqdm(todo, desc=f"subj{cfg.subject:02d} sessions", unit="session", disable=not cfg.progress, file=sys.stderr):
        trials = design.session_trials(session)
        x = L.read_session_betas(source, cfg.subject, session, cfg.betas, cfg.beta_version, mask, len(trials))
        if cfg.zscore != "none":
            keep = np.ones(len(trials), dtype=bool)
            if cfg.zscore == "session-nonshared":
                keep = ~np.isin(nsd_ids[trials], list(plan.shared))
            x = _zscore(x, np.flatnonzero(keep))
        cache.store(session, x)


# --------------------------------------------------------------------------------------------
# Stage 2: shards from the cache and the stimuli


def sample_voxels(sample: Sample, plan: ImportPlan, cache: dict) -> np.ndarray:
    """(3, V) float16: the real repetitions, padded by MindEye's Algonauts rule."""
    rows = [cache[int(plan.trial_session[t])][t - plan.session_start[int(plan.trial_session[t])]] for t in sample.trials]
    vox = np.stack(rows).astype(np.float32)
    if len(vox) == 1:
        vox = np.repeat(vox, MAX_REPS, axis=0)
    elif len(vox) == 2:
        vox = np.concatenate([vox, vox.mean(axis=0, keepdims=True)])
    return vox.astype(np.float16)


def _ids(sample: Sample, plan: ImportPlan, split: str, row: int) -> dict:
    sessions = [int(plan.trial_session[t]) for t in sample.trials]
    return {"index": row, "split": split, "subject": plan.subject, "nsd_id": sample.nsd_id, "n_reps": len(sample.trials),
            "trials": list(sample.trials), "sessions": sessions,
            "session_trials": [t - plan.session_start[s] for t, s in zip(sample.trials, sessions)],
            "shared1000": sample.nsd_id in plan.shared}


def _image(stimuli: L.Stimuli, nsd_id: int, size: Optional[int]) -> np.ndarray:
    img = stimuli[nsd_id]
    if size is not None and img.shape[:2] != (size, size):
        from PIL import Image

        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return img


def _shard_samples(split: str, samples: list[Sample], start: int, plan: ImportPlan, cache: dict, stimuli: L.Stimuli,
                   cfg: NsdImportConfig, taken: list[int], bar) -> Iterator[dict]:
    """Samples from ``start`` until the shard is full; ``taken[0]`` counts them."""
    budget = int(cfg.shard_size_mb * 1e6)
    size = 0
    for row in range(start, len(samples)):
        s = samples[row]
        sample = {"__key__": f"{split}_{row:08d}", "voxels.npy": S.npy_bytes(sample_voxels(s, plan, cache)),
                  "png": S.png_bytes(_image(stimuli, s.nsd_id, cfg.image_size)),
                  "json": json.dumps(_ids(s, plan, split, row)).encode()}
        nbytes = sum(len(v) + 512 for k, v in sample.items() if k != "__key__")
        if taken[0] and (size + nbytes > budget or (cfg.max_samples_per_shard and taken[0] >= cfg.max_samples_per_shard)):
            return
        size += nbytes
        taken[0] += 1
        bar.update(1)
        yield sample


def write_split(storage: Storage, split: str, plan: ImportPlan, cache: dict, stimuli: L.Stimuli,
                cfg: NsdImportConfig, progress: S.Progress, bar) -> list[S.ShardRecord]:
    samples = plan.splits[split]
    records = S.verified_records(storage, progress.records(split), split)
    if len(records) != len(progress.records(split)):
        progress.state["shards"][split] = [r.to_json() for r in records]
    start = sum(r.count for r in records)
    bar.update(start)
    while start < len(samples):
        taken = [0]
        rec = S.write_shard(storage, S.shard_name(split, len(records)),
                            _shard_samples(split, samples, start, plan, cache, stimuli, cfg, taken, bar), start)
        progress.add(split, rec)
        records.append(rec)
        start += rec.count
    return records


def train_stats(plan: ImportPlan, cache: dict, n_voxels: int) -> bytes:
    count, total, total_sq = 0, np.zeros(n_voxels), np.zeros(n_voxels)
    for s in plan.splits["train"]:
        v = sample_voxels(s, plan, cache).astype(np.float64)
        count += len(v)
        total += v.sum(0)
        total_sq += (v * v).sum(0)
    return S.stats_bytes(count, total, total_sq)


# --------------------------------------------------------------------------------------------
# The whole import

IDS_CONTENT = {
    "index": "row in the split", "split": "split name", "subject": "NSD subject (1-8)",
    "nsd_id": "0-based index into the 73k NSD images (imgBrick row, nsdId of nsd_stim_info_merged.csv)",
    "n_reps": "real repetitions (voxels rows beyond it are padding)",
    "trials": "0-based trial of each real repetition in the subject's NSD sequence (row of masterordering)",
    "sessions": "1-based session of each repetition", "session_trials": "0-based row of each repetition in its session's betas file",
    "shared1000": "whether the image is one of NSD's shared images",
}


def _fingerprint(cfg: NsdImportConfig, mask: L.Mask) -> str:
    keys = ("subject", "sessions", "test_sessions", "betas", "beta_version", "test_set", "zscore", "val_fraction",
            "seed", "min_reps", "image_size", "shard_size_mb", "max_samples_per_shard")
    return S.fingerprint({**{k: getattr(cfg, k) for k in keys}, "mask": mask.digest(), "format": 1})


def _prepare_output(storage: Storage, fp: str, cfg: NsdImportConfig) -> tuple[S.Progress, Optional[DatasetMeta]]:
    """(progress, meta if this exact import is already complete). Refuses to mix with other data."""
    storage.makedirs()
    S.remove_partials(storage)  # a killed run's half-written shard
    progress = S.Progress(storage, PROGRESS_NAME, fp)
    if cfg.overwrite:
        S.clear_dataset(storage, extra=[PROGRESS_NAME])
        return progress, None
    if storage.exists(META_NAME):
        meta = read_meta(storage.url, cfg.s3_endpoint)
        if meta.raw.get("source", {}).get("fingerprint") == fp:
            return progress, meta
        raise DataError(f"{storage.url} already holds a dataset made with other options or from other data; "
                        "pass --overwrite to replace it, or choose another --out")
    have = progress.load()
    if have is None and S.foreign_files(storage):
        raise DataError(f"{storage.url} holds shards but no NSD import record ({PROGRESS_NAME}); pass --overwrite to replace them")
    if have is not None and have != fp:
        raise DataError(f"{storage.url} holds an unfinished NSD import made with other options; rerun with the same "
                        "options to resume it, or pass --overwrite to start over")
    return progress, None


def _work_dir(cfg: NsdImportConfig, storage: Storage) -> str:
    if cfg.work_dir:
        return cfg.work_dir
    if not storage.remote:
        return os.path.join(storage.root, ".nsd-work")
    tag = hashlib.sha1(f"{storage.url}|{cfg.subject}".encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"mindeye-nsd-{tag}")


def _source_info(cfg: NsdImportConfig, plan: ImportPlan, mask: L.Mask, fp: str) -> dict:
    return {
        "kind": "nsd", "nsd_root": cfg.nsd_root, "subject": cfg.subject, "fingerprint": fp,
        "train_sessions": list(plan.train_sessions), "test_sessions": list(plan.test_sessions),
        "betas": cfg.betas, "beta_version": cfg.beta_version, "test_set": cfg.test_set, "zscore": cfg.zscore,
        "beta_scale": L.BETA_SCALE, "mask": mask.path, "mask_rule": "nsdgeneral > 0", "n_mask_voxels": mask.n_voxels,
        "voxel_order": "C order over the NIfTI (X, Y, Z) grid of the mask (MindEye's)",
        "reps": {"max": MAX_REPS, "min": cfg.min_reps, "padding": "1 rep x3; 2 reps + their mean (MindEye's Algonauts writer)"},
        "image_size": cfg.image_size, "dropped": plan.dropped,
    }


def _check_inputs(source: L.NsdSource, plan: ImportPlan, cfg: NsdImportConfig, cache: SessionCache, stimuli: L.Stimuli) -> None:
    """Fail in seconds, not hours: every betas file is there, every image id is in imgBrick."""
    for s in plan.read_sessions:
        rel = L.betas_path(cfg.subject, s, cfg.betas, cfg.beta_version)
        if not cache.done(s) and not source.storage.exists(rel):
            raise DataError(f"missing betas of subject {cfg.subject} session {s}: {source.path(rel)} does not exist "
                            f"(--betas {cfg.betas}); download it, or leave session {s} out of --sessions/--test-sessions")
    top = max(x.nsd_id for samples in plan.splits.values() for x in samples)
    if top >= len(stimuli):
        raise DataError(f"{stimuli.path} has {len(stimuli)} images but the design uses nsdId {top}; the files disagree")


def _write_dataset(storage: Storage, source: L.NsdSource, design: L.Design, plan: ImportPlan, cfg: NsdImportConfig,
                   mask: L.Mask, progress: S.Progress, fp: str) -> None:
    """Stages 1 and 2, stats.npz, then meta.json; removes the progress file and the work dir."""
    from tqdm import tqdm

    work = _work_dir(cfg, storage)
    cache = SessionCache(work, {"fingerprint": fp, "zscore": cfg.zscore, "betas": cfg.betas})
    stimuli = L.Stimuli(source)
    try:
        _check_inputs(source, plan, cfg, cache, stimuli)
        source.scratch_dir = work
        cache_sessions(source, design, plan, cfg, mask, cache)
        arrays = {s: cache.load(s) for s in plan.read_sessions}
        total = sum(len(v) for v in plan.splits.values())
        with tqdm(total=total, desc=f"subj{cfg.subject:02d} shards", unit="img", disable=not cfg.progress, file=sys.stderr) as bar:
            records = {split: write_split(storage, split, plan, arrays, stimuli, cfg, progress, bar) for split in plan.splits}
        storage.write_bytes(S.STATS_NAME, train_stats(plan, arrays, mask.n_voxels))
        h, w = _image(stimuli, plan.splits["test"][0].nsd_id, cfg.image_size).shape[:2]
    finally:
        stimuli.close()
    fields = {"voxels": {"key": "voxels.npy", "dtype": "float16", "shape": [None, mask.n_voxels]},
              "images": {"key": "png", "dtype": "uint8", "shape": [h, w, 3]},
              "ids": {"key": "json", "content": IDS_CONTENT}}
    splits = {name: S.split_meta(recs, MAX_REPS, ["voxels", "images"], "test" if name == "test" else "train")
              for name, recs in records.items()}
    meta = S.compose_meta(command=cfg.command, source=_source_info(cfg, plan, mask, fp), subject=cfg.subject,
                          n_voxels=mask.n_voxels, fields=fields, splits=splits,
                          extra={"val": {"fraction": cfg.val_fraction, "seed": cfg.seed, "from_split": "train"}})
    S.write_meta(storage, meta)  # last: the dataset now exists
    progress.remove()
    if not cfg.keep_work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def import_nsd(cfg: NsdImportConfig) -> DatasetMeta:
    """Import one subject (see the module docstring); returns the dataset's meta."""
    storage = Storage(cfg.out, cfg.s3_endpoint)
    source = L.NsdSource(cfg.nsd_root, cfg.s3_endpoint)
    design = L.read_design(source)
    plan = build_plan(design, cfg)
    if cfg.check_stim_info:
        L.check_stim_info(source, design, cfg.subject, plan.used_trials())
    mask = L.read_mask(source, cfg.subject)
    fp = _fingerprint(cfg, mask)
    progress, done = _prepare_output(storage, fp, cfg)
    if done is None:
        _write_dataset(storage, source, design, plan, cfg, mask, progress, fp)
        if cfg.progress:
            counts = ", ".join(f"{k} {len(v)}" for k, v in plan.splits.items())
            print(f"[prepare_data] NSD subject {cfg.subject}: {counts} images, {mask.n_voxels} voxels -> {storage.url}", file=sys.stderr)
    elif cfg.progress:
        print(f"[prepare_data] {storage.url} already holds this import (same options); nothing to redo", file=sys.stderr)
    if cfg.targets:
        from mindeye_dist.data.targets import add_targets

        for spec in cfg.targets:
            add_targets(storage.url, spec, s3_endpoint=cfg.s3_endpoint, progress=cfg.progress)
    return read_meta(storage.url, cfg.s3_endpoint)
