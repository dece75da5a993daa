"""A miniature Natural Scenes Dataset in the official formats, for the importer tests.

Same paths, file types, dtypes, axis orders and 1-based conventions as the release
(``mindeye_dist/data/nsd_layout.py`` lists them). What it shrinks, and why that is honest:

- the design keeps NSD's 40 sessions, 8 subjects and the ``stimpattern`` (sessions x runs x
  slots) structure, but with 4 runs of 15 stimulus trials (60 trials per session instead of
  750); the reader derives trials per session from ``stimpattern``, as it does for NSD's 750;
- 900 images per subject instead of 10,000, 90 shared instead of 1,000, 16 x 16 stimuli instead
  of 425 x 425, a 9 x 8 x 7 voxel grid instead of 81 x 104 x 83;
- betas files exist only for the sessions a test imports.

Betas are a known function of the image, so alignment is checkable: four *marker* voxels (at
random places inside the ROI) hold ``nsd_id // 64``, ``nsd_id % 64``, the session and the
trial within the session, each times 300 (so ``--zscore none`` reads them back exactly); the
other voxels are a random linear map of a 48-d image feature (4 x 4 RGB means) with a per
session gain and offset plus noise, so a ridge decoder has signal and z-scoring matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

N_SESSIONS, RUNS, SLOTS, STIM_PER_RUN = 40, 4, 18, 15
TRIALS_PER_SESSION = RUNS * STIM_PER_RUN  # 60
N_10K, N_SHARED, N_SUBJECTS = 900, 90, 8
GRID = (9, 8, 7)
IMAGE_SIZE = 16
LATE_SHARED = tuple(range(81, 91))  # 1-based 10k ids shown only in sessions 38-40 (outside the 982 rule)
N_MARKERS = 4


def image_features(images: np.ndarray) -> np.ndarray:
    """(n, 16, 16, 3) uint8 -> (n, 48) float64: 4 x 4 block means per channel, in [0, 1]."""
    n = images.shape[0]
    x = images.astype(np.float64).reshape(n, 4, IMAGE_SIZE // 4, 4, IMAGE_SIZE // 4, 3) / 255.0
    return x.mean(axis=(2, 4)).reshape(n, -1)


def _first_block(rng: np.random.Generator) -> list[int]:
    """1-based 10k ids of sessions 1-3 (180 trials): shared 1-10 x3, 11-15 x2, 16-25 x1;
    non-shared 101-125 x3, 126-145 x2, 146-160 x1."""
    ids = [i for i in range(1, 11) for _ in range(3)] + [i for i in range(11, 16) for _ in range(2)] + list(range(16, 26))
    ids += [i for i in range(101, 126) for _ in range(3)] + [i for i in range(126, 146) for _ in range(2)] + list(range(146, 161))
    assert len(ids) == 3 * TRIALS_PER_SESSION
    return list(rng.permutation(ids))


def build_masterordering(rng: np.random.Generator) -> np.ndarray:
    """(2400,) 1-based 10k ids; every id at most 3 times; LATE_SHARED only in sessions 38-40."""
    first = _first_block(rng)
    used = np.zeros(N_10K + 1, dtype=int)
    for i in first:
        used[i] += 1
    late_n = 3 * TRIALS_PER_SESSION
    late = [i for i in LATE_SHARED for _ in range(3)]
    for i in late:
        used[i] += 1
    pool = [i for i in range(1, N_10K + 1) if i not in LATE_SHARED for _ in range(3 - used[i])]
    pool = list(rng.permutation(pool))
    middle_n = (N_SESSIONS - 6) * TRIALS_PER_SESSION
    middle, rest = pool[:middle_n], pool[middle_n:middle_n + late_n - len(late)]
    tail = list(rng.permutation(late + rest))
    order = np.array(first + middle + tail)
    assert order.size == N_SESSIONS * TRIALS_PER_SESSION and np.bincount(order).max() <= 3
    return order


def _stimpattern() -> np.ndarray:
    pat = np.zeros((N_SESSIONS, RUNS, SLOTS), dtype=np.uint8)
    pat[:, :, 1:1 + STIM_PER_RUN] = 1  # blank slots at the start and end of each run, as in NSD
    return pat


@dataclass
class MiniNsd:
    root: Path
    masterordering: np.ndarray  # (n_trials,) 1-based, as written
    subjectim: np.ndarray  # (8, 900) 1-based 73k ids, as written
    sharedix: np.ndarray  # (90,) 1-based
    images: np.ndarray  # (n_73k, 16, 16, 3) uint8
    affine: np.ndarray
    masks: dict = field(default_factory=dict)  # subject -> (X, Y, Z) int16 in {-1, 0, 1}
    markers: dict = field(default_factory=dict)  # subject -> (4, 3) XYZ coordinates
    betas: dict = field(default_factory=dict)  # (subject, session) -> (X, Y, Z, T) int16 as written

    def nsd_ids(self, subject: int) -> np.ndarray:
        """(n_trials,) 0-based 73k id per trial, computed independently of the importer."""
        return self.subjectim[subject - 1][self.masterordering - 1] - 1

    def roi_order(self, subject: int) -> np.ndarray:
        """(V, 3) XYZ of the ROI voxels in MindEye order (C order over the NIfTI grid)."""
        return np.argwhere(self.masks[subject] > 0)

    def marker_columns(self, subject: int) -> list[int]:
        order = [tuple(c) for c in self.roi_order(subject)]
        return [order.index(tuple(m)) for m in self.markers[subject]]


def _affine() -> np.ndarray:
    aff = np.diag([1.8, 1.8, 1.8, 1.0])
    aff[:3, 3] = -1.8 * (np.array(GRID) - 1) / 2  # centred on the slab, like NSD's func1pt8mm files
    return aff


def _write_design(root: Path, order: np.ndarray, subjectim: np.ndarray, shared: np.ndarray) -> None:
    import scipy.io

    d = root / "nsddata/experiments/nsd"
    d.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(d / "nsd_expdesign.mat"), {  # MATLAB v5, doubles as MATLAB writes them
        "masterordering": order[None, :].astype(np.float64),
        "subjectim": subjectim.astype(np.float64),
        "sharedix": shared[None, :].astype(np.float64),
        "stimpattern": _stimpattern().astype(np.float64),
        "basiccnt": np.zeros((3, N_SESSIONS)),
    })


def _write_stim_info(root: Path, tree: MiniNsd) -> None:
    n = len(tree.images)
    reps = np.zeros((n, N_SUBJECTS, 3), dtype=int)
    shown = np.zeros((n, N_SUBJECTS), dtype=int)
    for s in range(1, N_SUBJECTS + 1):
        n_trials = min((40, 40, 32, 30, 40, 32, 40, 30)[s - 1], N_SESSIONS) * TRIALS_PER_SESSION  # NSD Manual
        count = np.zeros(n, dtype=int)
        for t, nsd_id in enumerate(tree.nsd_ids(s)[:n_trials]):
            reps[nsd_id, s - 1, count[nsd_id]] = t + 1  # 1-based trial number
            count[nsd_id] += 1
            shown[nsd_id, s - 1] = 1
    shared = set((tree.sharedix - 1).tolist())
    cols = ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
    cols += [f"subject{s}" for s in range(1, 9)] + [f"subject{s}_rep{k}" for s in range(1, 9) for k in range(3)]
    lines = [",".join(cols)]
    for i in range(n):
        row = [str(i), str(100000 + i), "train2017", '"(0, 0, 0.1, 0.1)"', "0.0", str(i), "False", "False", str(i in shared)]
        row += [str(v) for v in shown[i]] + [str(v) for v in reps[i].reshape(-1)]
        lines.append(",".join(row))
    (root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv").write_text("\n".join(lines) + "\n")


def _write_stimuli(root: Path, images: np.ndarray) -> None:
    import h5py

    d = root / "nsddata_stimuli/stimuli/nsd"
    d.mkdir(parents=True, exist_ok=True)
    with h5py.File(d / "nsd_stimuli.hdf5", "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, *images.shape[1:]))


def _make_mask(rng: np.random.Generator) -> np.ndarray:
    mask = -np.ones(GRID, dtype=np.int16)
    mask[1:-1, 1:-1, 1:-1] = 0
    inner = np.argwhere(mask == 0)
    roi = inner[rng.random(len(inner)) < 0.8]
    mask[tuple(roi.T)] = 1
    return mask


def _session_betas(tree: MiniNsd, subject: int, session: int, encoder: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(X, Y, Z, T) int16 betas x 300 of one session."""
    trials = np.arange((session - 1) * TRIALS_PER_SESSION, session * TRIALS_PER_SESSION)
    ids = tree.nsd_ids(subject)[trials]
    feats = image_features(tree.images[ids])  # (T, 48)
    roi = tree.roi_order(subject)
    gain = 1.0 + 0.5 * rng.random(len(roi))
    offset = 3.0 * rng.standard_normal(len(roi))
    psc = gain * ((feats - 0.5) @ encoder.T) + offset + 0.3 * rng.standard_normal((len(trials), len(roi)))  # (T, V)
    vol = np.zeros((*GRID, len(trials)), dtype=np.float64)
    vol[tuple(roi.T)] = psc.T
    outside = tree.masks[subject] < 1
    vol[outside] = rng.standard_normal((int(outside.sum()), len(trials)))  # cortex outside the ROI is not zero
    codes = np.stack([ids // 64, ids % 64, np.full_like(ids, session), np.arange(len(trials))])  # (4, T)
    for m, xyz in enumerate(tree.markers[subject]):
        vol[tuple(xyz)] = codes[m]
    return np.round(vol * 300).astype(np.int16)


def _write_betas(root: Path, subject: int, session: int, vol: np.ndarray, releases: tuple[str, ...]) -> None:
    import h5py
    import nibabel as nib

    d = root / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    d.mkdir(parents=True, exist_ok=True)
    if "nifti" in releases:
        nib.save(nib.Nifti1Image(vol, _affine()), str(d / f"betas_session{session:02d}.nii.gz"))
    if "hdf5" in releases:
        with h5py.File(d / f"betas_session{session:02d}.hdf5", "w") as f:
            f.create_dataset("betas", data=vol.transpose(3, 2, 1, 0))  # MATLAB X x Y x Z x T seen from C: (T, Z, Y, X)


def build_mini_nsd(root: Path, subjects=(1,), sessions=(1, 2, 3), releases=("nifti", "hdf5"), seed: int = 0) -> MiniNsd:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    order = build_masterordering(rng)
    shared = np.arange(1, N_SHARED + 1)  # 1-based 73k ids 1..90 are the shared images
    subjectim = np.empty((N_SUBJECTS, N_10K), dtype=np.int64)
    nxt = N_SHARED + 1
    for s in range(N_SUBJECTS):
        subjectim[s, :N_SHARED] = shared  # the first 1,000 (here 90) 10k ids are the shared images
        subjectim[s, N_SHARED:] = rng.permutation(np.arange(nxt, nxt + N_10K - N_SHARED))
        nxt += N_10K - N_SHARED
    images = rng.integers(0, 256, size=(nxt - 1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    tree = MiniNsd(Path(root), order, subjectim, shared, images, _affine())
    _write_design(tree.root, order, subjectim, shared)
    _write_stim_info(tree.root, tree)
    _write_stimuli(tree.root, images)
    for subject in subjects:
        srng = np.random.default_rng([seed, subject])
        mask = _make_mask(srng)
        tree.masks[subject] = mask
        roi = np.argwhere(mask > 0)
        tree.markers[subject] = roi[srng.choice(len(roi), N_MARKERS, replace=False)]
        d = tree.root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi"
        d.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask, _affine()), str(d / "nsdgeneral.nii.gz"))
        encoder = srng.standard_normal((len(roi), 48))
        for session in sessions:
            vol = _session_betas(tree, subject, session, encoder, srng)
            tree.betas[(subject, session)] = vol
            _write_betas(tree.root, subject, session, vol, releases)
    return tree
