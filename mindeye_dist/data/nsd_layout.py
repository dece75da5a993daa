"""The Natural Scenes Dataset as published: where its files are and how to read them.

Facts this module relies on (sources: the NSD Data Manual, brain-diffuser and MindEye2 code cited below):

- ``nsd_expdesign.mat`` is a MATLAB v5 file (every reference reads it with ``scipy.io.loadmat``,
  which cannot read v7.3) holding ``masterordering`` (1 x 30000), ``subjectim`` (8 x 10000),
  ``sharedix`` (1 x 1000) and ``stimpattern`` (40 sessions x 12 runs x 75 slots, 1 where a slot
  is a stimulus trial), all MATLAB 1-based. Trial t (0-based, session-major) of subject s shows
  the 0-based 73k image ``subjectim[s-1, masterordering[t]-1] - 1`` (brain-diffuser
  ``data/prepare_nsddata.py``); ``sharedix`` are the 1-based 73k ids of the shared images.
  Trials per session are not hard-coded: session k has ``stimpattern[k].sum()`` trials (750 in
  NSD), so a smaller design file (the tests' miniature tree) is read by the same code.
- Single-trial betas are percent signal change x 300 stored as int16. The NIfTI release is
  (X, Y, Z, T); the HDF5 release's ``/betas`` was written from MATLAB as X x Y x Z x T, so h5py
  reads it as (T, Z, Y, X). Voxels come out in MindEye's order either way: C order over the
  NIfTI (X, Y, Z) grid of the mask (``betas[mask > 0]`` in brain-diffuser, ``mask.flatten()`` in
  MindEye2's ``dataset_creation.ipynb``).
- ``nsdgeneral.nii.gz`` codes -1 outside cortex, 0 unlabelled cortex, 1 in the ROI. The ROI is
  ``mask > 0`` (brain-diffuser's rule; MindEye2's ``mask[mask < 1] = 0`` keeps the same set).
- Completed sessions per subject: 40 40 32 30 40 32 40 30 (NSD Data Manual; nsddatapaper
  ``FINALNUMBERSnotes.m``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import IO, Iterator, Optional

import numpy as np

from mindeye_dist.compat import require
from mindeye_dist.data.errors import DataError
from mindeye_dist.data.storage import Storage

NSD_SESSIONS = (40, 40, 32, 30, 40, 32, 40, 30)
"""Sessions each subject completed (NSD Data Manual, "Technical notes")."""
BETA_SCALE = 300.0
"""The int16 betas are percent signal change times 300 (NSD Data Manual)."""
MINDEYE1_SESSIONS = 37
"""Sessions public when brain-diffuser and MindEye1 built their 8,859 / 982 splits
(brain-diffuser ``num_trials = 37*750``)."""
DEFAULT_BETA_VERSION = "betas_fithrf_GLMdenoise_RR"

EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
_EXTRA = "nsd"


def mask_path(subject: int) -> str:
    return f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/nsdgeneral.nii.gz"


def betas_path(subject: int, session: int, release: str, version: str = DEFAULT_BETA_VERSION) -> str:
    ext = {"nifti": "nii.gz", "hdf5": "hdf5"}[release]
    return f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/{version}/betas_session{session:02d}.{ext}"


def parse_sessions(spec: Optional[str], available: int, subject: int) -> tuple[int, ...]:
    """``"1-40"``, ``"1,3,5-7"``, ``"all"`` or None (all) -> sorted 1-based sessions, checked
    against the ``available`` sessions of ``subject``."""
    if spec is None or spec.strip().lower() == "all":
        return tuple(range(1, available + 1))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise DataError(f"--sessions {spec!r}: {part!r} is not N or N-M (e.g. 1-40, or 1,3,5-7)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 1 or hi < lo:
            raise DataError(f"--sessions {spec!r}: {part!r} is not a range of 1-based session numbers")
        out.update(range(lo, hi + 1))
    beyond = sorted(s for s in out if s > available)
    if beyond:
        raise DataError(
            f"subject {subject} has {available} NSD sessions (1-{available}); session(s) {beyond} do not exist "
            f"for this subject (completed sessions per subject: {', '.join(map(str, NSD_SESSIONS))})"
        )
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------
# Files, local or on S3


class NsdSource:
    """The NSD root (a local directory or ``s3://bucket/prefix``) and its files by relative path."""

    def __init__(self, root: str, s3_endpoint: Optional[str] = None, scratch_dir: Optional[str] = None) -> None:
        self.storage = Storage(root, s3_endpoint)
        self.scratch_dir = scratch_dir

    def path(self, rel: str) -> str:
        return self.storage.child(rel)

    def require(self, rel: str, what: str) -> None:
        if not self.storage.exists(rel):
            raise DataError(f"missing {what}: {self.path(rel)} does not exist; check --nsd-root (the folder holding nsddata/)")

    @contextlib.contextmanager
    def local_file(self, rel: str) -> Iterator[str]:
        """A local path to ``rel``: the file itself, or for S3 a download removed afterwards
        (NIfTI gzip and HDF5 chunks read poorly over ranged GETs)."""
        if not self.storage.remote:
            yield self.path(rel)
            return
        fd, tmp = tempfile.mkstemp(prefix="nsd_", suffix="_" + os.path.basename(rel), dir=self.scratch_dir)
        try:
            with os.fdopen(fd, "wb") as out, self.storage.open_read(rel) as src:
                shutil.copyfileobj(src, out, 8 << 20)
            yield tmp
        finally:
            os.remove(tmp)

    def open(self, rel: str) -> IO[bytes]:
        """A seekable read stream (h5py reads the 39 GB stimuli file through it by range on S3)."""
        return self.storage.open_read(rel)


# --------------------------------------------------------------------------------------------
# nsd_expdesign.mat


@dataclass(frozen=True)
class Design:
    """``nsd_expdesign.mat`` converted to 0-based indices."""

    masterordering: np.ndarray  # (n_trials,) 0-based 10k index shown at each trial
    subjectim: np.ndarray  # (n_subjects, n_10k) 0-based 73k id of each subject's 10k images
    sharedix: np.ndarray  # (n_shared,) 0-based 73k ids of the shared images
    session_starts: np.ndarray  # (n_sessions + 1,) first trial of each session, then n_trials

    @property
    def n_sessions(self) -> int:
        return len(self.session_starts) - 1

    def session_trials(self, session: int) -> np.ndarray:
        """0-based global trial indices of the 1-based ``session``."""
        return np.arange(self.session_starts[session - 1], self.session_starts[session])

    def trial_sessions(self) -> np.ndarray:
        """(n_trials,) 1-based session of every trial."""
        return np.repeat(np.arange(1, self.n_sessions + 1), np.diff(self.session_starts))

    def nsd_ids(self, subject: int) -> np.ndarray:
        """(n_trials,) 0-based 73k image id shown at every trial to ``subject``."""
        return self.subjectim[subject - 1, self.masterordering]

    def sessions_of(self, subject: int) -> int:
        """Sessions ``subject`` completed (the Manual's table, bounded by the design's length)."""
        return min(NSD_SESSIONS[subject - 1], self.n_sessions)


def _matrix(mat: dict, key: str, path: str, ndim: int, nsd_shape: str) -> np.ndarray:
    if key not in mat:
        raise DataError(f"{path} has no {key!r} (keys: {sorted(k for k in mat if not k.startswith('__'))}); "
                        "is this NSD's nsd_expdesign.mat?")
    a = np.asarray(mat[key])
    if ndim == 1:
        if a.ndim not in (1, 2) or (a.ndim == 2 and 1 not in a.shape) or a.size == 0:
            raise DataError(f"{path}: {key!r} has shape {a.shape}; expected a vector (NSD's is {nsd_shape})")
        a = a.reshape(-1)
    elif a.ndim != ndim or a.size == 0:
        raise DataError(f"{path}: {key!r} has shape {a.shape}; expected {ndim} dimensions (NSD's is {nsd_shape})")
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)) or a.min() < 0:
        raise DataError(f"{path}: {key!r} holds values that are not non-negative integers")
    return a.astype(np.int64)


def read_design(source: NsdSource) -> Design:
    """Read and validate ``nsd_expdesign.mat`` (MATLAB v5, as NSD publishes it)."""
    scipy_io = require("scipy.io", _EXTRA, "reading nsd_expdesign.mat")
    source.require(EXPDESIGN, "the NSD experiment design")
    path = source.path(EXPDESIGN)
    with source.open(EXPDESIGN) as f:
        data = f.read()
    try:
        mat = scipy_io.loadmat(io.BytesIO(data))
    except NotImplementedError as err:  # scipy says "Please use HDF reader for matlab v7.3 files"
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; NSD publishes it as MATLAB v5. Re-download it") from err
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise DataError(f"{path} is not a readable MATLAB file ({type(err).__name__}: {err}); re-download it") from err
    order = _matrix(mat, "masterordering", path, 1, "1 x 30000")
    subjectim = _matrix(mat, "subjectim", path, 2, "8 x 10000")
    shared = _matrix(mat, "sharedix", path, 1, "1 x 1000")
    pattern = _matrix(mat, "stimpattern", path, 3, "40 x 12 x 75")
    per_session = pattern.reshape(pattern.shape[0], -1).sum(axis=1)
    if per_session.sum() != order.size:
        raise DataError(f"{path}: 'stimpattern' marks {int(per_session.sum())} stimulus trials but 'masterordering' "
                        f"lists {order.size}; the file is inconsistent (NSD: 40 sessions x 750 = 30000)")
    if subjectim.shape[0] < len(NSD_SESSIONS) or order.min() < 1 or order.max() > subjectim.shape[1]:
        raise DataError(f"{path}: 'subjectim' {subjectim.shape} and 'masterordering' (values {order.min()}..{order.max()}) "
                        "do not fit together: NSD's is 8 subjects x 10000 images, masterordering in 1..10000")
    if subjectim.min() < 1 or shared.min() < 1:
        raise DataError(f"{path}: 'subjectim' and 'sharedix' must be 1-based 73k ids (found a 0)")
    return Design(order - 1, subjectim - 1, shared - 1, np.concatenate([[0], np.cumsum(per_session)]))


# --------------------------------------------------------------------------------------------
# nsd_stim_info_merged.csv: an independent record of which trial showed which image


def check_stim_info(source: NsdSource, design: Design, subject: int, trials: np.ndarray) -> int:
    """Check the design's trial -> image mapping against ``subject{N}_rep{K}`` (1-based trials,
    0 = not shown) and ``shared1000`` of ``nsd_stim_info_merged.csv``; returns rows checked."""
    import csv

    source.require(STIM_INFO, "the NSD stimulus table")
    path = source.path(STIM_INFO)
    want = set(int(t) for t in trials)
    nsd_ids = design.nsd_ids(subject)
    shared = set(int(i) for i in design.sharedix)
    with source.open(STIM_INFO) as raw:
        rows = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        header = next(rows, [])
        cols = [f"subject{subject}_rep{k}" for k in range(3)]
        missing = [c for c in ["nsdId", "shared1000", *cols] if c not in header]
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}; is this NSD's nsd_stim_info_merged.csv?")
        i_id, i_shared = header.index("nsdId"), header.index("shared1000")
        i_reps = [header.index(c) for c in cols]
        checked = 0
        for row in rows:
            nsd_id = int(row[i_id])
            if (row[i_shared].strip().lower() == "true") != (nsd_id in shared):
                raise DataError(f"{path}: nsdId {nsd_id} has shared1000={row[i_shared]} but {source.path(EXPDESIGN)} "
                                "'sharedix' disagrees; the two files come from different NSD releases")
            for i in i_reps:
                trial = int(float(row[i])) - 1
                if trial in want:
                    checked += 1
                    if nsd_ids[trial] != nsd_id:
                        raise DataError(
                            f"{path}: {header[i]} says trial {trial + 1} (1-based) showed nsdId {nsd_id}, but "
                            f"{source.path(EXPDESIGN)} gives nsdId {int(nsd_ids[trial])}; the files disagree")
    if checked != len(want):
        raise DataError(f"{path} accounts for {checked} of the {len(want)} imported trials of subject {subject}; "
                        "the file is incomplete or from another NSD release")
    return checked


# --------------------------------------------------------------------------------------------
# nsdgeneral mask and single-trial betas


@dataclass(frozen=True)
class Mask:
    """The subject's nsdgeneral ROI on the NIfTI (X, Y, Z) grid."""

    path: str
    roi: np.ndarray  # (X, Y, Z) bool, voxel order = np.nonzero C order
    affine: np.ndarray  # (4, 4)

    @property
    def n_voxels(self) -> int:
        return int(self.roi.sum())

    def digest(self) -> str:
        return hashlib.sha1(np.packbits(self.roi).tobytes() + str(self.roi.shape).encode()).hexdigest()[:16]


def read_mask(source: NsdSource, subject: int) -> Mask:
    nib = require("nibabel", _EXTRA, "reading NSD NIfTI files")
    rel = mask_path(subject)
    source.require(rel, f"nsdgeneral ROI of subject {subject}")
    with source.local_file(rel) as local:
        img = nib.load(local)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    if data.ndim != 3:
        raise DataError(f"{source.path(rel)} has shape {data.shape}; an ROI volume is 3-D (X, Y, Z)")
    roi = data > 0  # nsdgeneral: -1 outside cortex, 0 unlabelled, 1 ROI (brain-diffuser: mask > 0)
    if not roi.any():
        raise DataError(f"{source.path(rel)} has no voxel > 0; is it an nsdgeneral ROI?")
    return Mask(source.path(rel), roi, affine)


_TRIAL_CHUNK = 64  # trials read at once: (X, Y, Z, 64) int16 is 90 MB at 1.8 mm


def _check_count(path: str, have: int, want: int, session: int) -> None:
    if have != want:
        raise DataError(f"{path} holds {have} trials but the design gives session {session} {want} "
                        "(stimpattern); the file is truncated or belongs to another session")


def read_session_betas(source: NsdSource, subject: int, session: int, release: str, version: str,
                       mask: Mask, n_trials: int) -> np.ndarray:
    """(n_trials, V) float32 percent signal change of the mask's voxels in MindEye order."""
    rel = betas_path(subject, session, release, version)
    if not source.storage.exists(rel):
        raise DataError(f"missing betas of subject {subject} session {session}: {source.path(rel)} does not exist "
                        f"(--betas {release}, version {version}); download it or leave the session out of --sessions")
    with source.local_file(rel) as local:
        if release == "nifti":
            raw = _read_nifti_betas(local, source.path(rel), mask, n_trials, session)
        else:
            raw = _read_hdf5_betas(local, source.path(rel), mask, n_trials, session)
    return raw.astype(np.float32) / BETA_SCALE


def _read_nifti_betas(local: str, path: str, mask: Mask, n_trials: int, session: int) -> np.ndarray:
    nib = require("nibabel", _EXTRA, "reading NSD NIfTI betas")
    img = nib.load(local, keep_file_open=True)  # one open gzip stream: chunks read forward, no re-inflating
    if len(img.shape) != 4 or tuple(img.shape[:3]) != mask.roi.shape or not np.allclose(img.affine, mask.affine, atol=1e-3):
        raise DataError(f"{path} has grid {tuple(img.shape[:3])} (affine diag {np.diag(img.affine)[:3].round(3).tolist()}) "
                        f"but the nsdgeneral mask {mask.path} has {mask.roi.shape} (diag "
                        f"{np.diag(mask.affine)[:3].round(3).tolist()}); use betas and ROI of the same subject and resolution (func1pt8mm)")
    _check_count(path, int(img.shape[3]), n_trials, session)
    out = np.empty((n_trials, mask.n_voxels), dtype=np.float32)
    for lo in range(0, n_trials, _TRIAL_CHUNK):
        chunk = np.asanyarray(img.dataobj[..., lo:lo + _TRIAL_CHUNK])  # (X, Y, Z, t)
        out[lo:lo + chunk.shape[3]] = chunk[mask.roi].T  # boolean index: C order over (X, Y, Z)
    return out


def _read_hdf5_betas(local: str, path: str, mask: Mask, n_trials: int, session: int) -> np.ndarray:
    h5py = require("h5py", _EXTRA, "reading NSD HDF5 betas")
    xs, ys, zs = np.nonzero(mask.roi)  # MindEye order, as coordinates on the (X, Y, Z) grid
    with h5py.File(local, "r") as f:
        if "betas" not in f:
            raise DataError(f"{path} has no dataset 'betas' (found {list(f.keys())}); is it an NSD betas_sessionNN.hdf5?")
        d = f["betas"]
        want = tuple(mask.roi.shape[::-1])
        if d.ndim != 4 or tuple(d.shape[1:]) != want:
            raise DataError(f"{path} has shape {d.shape}, read as (trials, Z, Y, X); the nsdgeneral mask {mask.path} "
                            f"needs (trials, {', '.join(map(str, want))}); use betas and ROI of the same subject and resolution")
        _check_count(path, int(d.shape[0]), n_trials, session)
        out = np.empty((n_trials, mask.n_voxels), dtype=np.float32)
        for lo in range(0, n_trials, _TRIAL_CHUNK):
            chunk = d[lo:lo + _TRIAL_CHUNK]  # (t, Z, Y, X): MATLAB's X x Y x Z x T seen from C
            out[lo:lo + len(chunk)] = chunk[:, zs, ys, xs]
    return out


# --------------------------------------------------------------------------------------------
# nsd_stimuli.hdf5


class Stimuli:
    """``imgBrick`` (73000 x 425 x 425 x 3 uint8) read one image at a time."""

    def __init__(self, source: NsdSource) -> None:
        h5py = require("h5py", _EXTRA, "reading nsd_stimuli.hdf5")
        source.require(STIMULI, "the NSD stimuli")
        self.path = source.path(STIMULI)
        self._stream = source.open(STIMULI) if source.storage.remote else None
        self._file = h5py.File(self._stream if self._stream is not None else self.path, "r")
        if "imgBrick" not in self._file:
            raise DataError(f"{self.path} has no dataset 'imgBrick' (found {list(self._file.keys())})")
        self.images = self._file["imgBrick"]
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(f"{self.path}: imgBrick is {self.images.shape} {self.images.dtype}; NSD's is (73000, 425, 425, 3) uint8")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, nsd_id: int) -> np.ndarray:
        return np.asarray(self.images[int(nsd_id)])

    def close(self) -> None:
        self._file.close()
        if self._stream is not None:
            self._stream.close()
