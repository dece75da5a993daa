"""Dataset builders behind ``launchers/prepare_data.py``: the arrays importer and the synthetic subject.

Arrays contract (DESIGN.md): DIR holds ``train_voxels.npy`` and ``test_voxels.npy`` (float,
``[n, reps, voxels]`` or ``[n, voxels]``), ``train_clip.npy`` and ``test_clip.npy`` (float,
``[n, tokens, dim]``), optionally ``{split}_images.npy`` (uint8 ``[n, H, W, 3]``) and
``{split}_vae.npy``. Row i of every array of a split is the same stimulus. A seeded random
validation split is carved out of train, because training-time evaluation must never use test.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from mindeye_dist.data.errors import DataError
from mindeye_dist.data.meta import DatasetMeta
from mindeye_dist.data.synthetic import SyntheticSubject, get_spec
from mindeye_dist.data.writer import DEFAULT_SHARD_SIZE_MB, SplitSource, carve_validation, write_dataset

SOURCE_SPLITS = ("train", "test")
_CHECK_CHUNK_BYTES = 64 << 20


def _check_finite(a: np.ndarray, what: str) -> None:
    """Chunked NaN/inf scan (arrays may be memory-mapped and larger than RAM)."""
    row_bytes = max(1, a[0].nbytes) if len(a) else 1
    step = max(1, _CHECK_CHUNK_BYTES // row_bytes)
    for lo in range(0, len(a), step):
        chunk = np.asarray(a[lo:lo + step])
        bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if bad.any():
            rows = lo + np.flatnonzero(bad)
            raise DataError(
                f"{what} has NaN or inf in {len(rows)}+ row(s), first at row {int(rows[0])}; "
                "fix or drop those stimuli (same rows in every array of the split) and retry"
            )


def _load(src: str, name: str, required: bool) -> Optional[np.ndarray]:
    path = os.path.join(src, name)
    if not os.path.exists(path):
        if required:
            have = sorted(f for f in os.listdir(src) if f.endswith(".npy"))
            raise DataError(
                f"missing {name} in {src} (found: {', '.join(have) or 'no .npy files'}). Expected train_voxels.npy, "
                "test_voxels.npy, train_clip.npy, test_clip.npy and optionally {split}_images.npy, {split}_vae.npy"
            )
        return None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path} is not a plain .npy array ({err}); save it with numpy.save") from err


def load_array_splits(src: str) -> dict[str, dict[str, Optional[np.ndarray]]]:
    """Load and validate the contract's arrays (memory-mapped). Raises DataError naming the problem."""
    if not os.path.isdir(src):
        raise DataError(f"--src {src} is not a directory; it must hold train_voxels.npy, test_clip.npy, ...")
    splits = {}
    for split in SOURCE_SPLITS:
        a = {
            "voxels": _load(src, f"{split}_voxels.npy", True),
            "clip": _load(src, f"{split}_clip.npy", True),
            "images": _load(src, f"{split}_images.npy", False),
            "vae": _load(src, f"{split}_vae.npy", False),
        }
        v, c = a["voxels"], a["clip"]
        if v.ndim not in (2, 3):
            raise DataError(f"{split}_voxels.npy has shape {v.shape}; expected [n, reps, voxels] or [n, voxels]")
        if c.ndim != 3:
            raise DataError(f"{split}_clip.npy has shape {c.shape}; expected [n, tokens, dim]")
        for key in ("voxels", "clip", "vae"):
            if a[key] is not None and a[key].dtype.kind != "f":
                raise DataError(f"{split}_{key}.npy has dtype {a[key].dtype}; expected a float array")
        if a["images"] is not None:
            im = a["images"]
            if im.ndim != 4 or im.shape[-1] != 3 or im.dtype != np.uint8:
                raise DataError(f"{split}_images.npy has shape {im.shape} dtype {im.dtype}; expected uint8 [n, H, W, 3]")
        if a["vae"] is not None and a["vae"].ndim < 2:
            raise DataError(f"{split}_vae.npy has shape {a['vae'].shape}; expected [n, ...] with per-stimulus latents")
        counts = {k: len(x) for k, x in a.items() if x is not None}
        if len(set(counts.values())) != 1:
            raise DataError(f"row counts differ within split {split!r}: {counts}; row i of every array must be the same stimulus")
        if counts["voxels"] == 0:
            raise DataError(f"split {split!r} is empty ({split}_voxels.npy has 0 rows); every split needs stimuli")
        for key in ("voxels", "clip", "vae"):
            if a[key] is not None:
                _check_finite(a[key], f"{split}_{key}.npy")
        splits[split] = a
    tr, te = splits["train"], splits["test"]
    if tr["voxels"].shape[-1] != te["voxels"].shape[-1]:
        raise DataError(f"train has {tr['voxels'].shape[-1]} voxels but test has {te['voxels'].shape[-1]}; both must use the same mask")
    if tr["clip"].shape[1:] != te["clip"].shape[1:]:
        raise DataError(f"train targets are {tr['clip'].shape[1:]} but test targets are {te['clip'].shape[1:]}; use the same CLIP model")
    for key in ("images", "vae"):
        if (tr[key] is None) != (te[key] is None):
            raise DataError(f"only one split has {key}; provide train_{key}.npy and test_{key}.npy together, or neither")
        if tr[key] is not None and tr[key].shape[1:] != te[key].shape[1:]:
            raise DataError(f"train {key} are {tr[key].shape[1:]} but test {key} are {te[key].shape[1:]}; they must match")
    return splits


def _sources(arrays: dict, val_fraction: float, seed: int) -> list[SplitSource]:
    tr, te = arrays["train"], arrays["test"]
    train_rows, val_rows = carve_validation(len(tr["voxels"]), val_fraction, seed)

    def make(name: str, a: dict, rows: np.ndarray, source: str) -> SplitSource:
        return SplitSource(name, a["voxels"], a["clip"], a["images"], a["vae"], rows, source)

    out = [make("train", tr, train_rows, "train")]
    if len(val_rows):
        out.append(make("val", tr, val_rows, "train"))
    out.append(make("test", te, np.arange(len(te["voxels"])), "test"))
    return out


def import_arrays(
    src: str,
    out_url: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    subject: int = 1,
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB,
    max_samples_per_shard: Optional[int] = None,
    s3_endpoint: Optional[str] = None,
    overwrite: bool = False,
    command: str = "",
    progress: bool = True,
) -> DatasetMeta:
    """Import an outside dataset in the arrays contract; returns the written dataset's meta."""
    arrays = load_array_splits(src)
    return write_dataset(
        out_url, _sources(arrays, val_fraction, seed), subject=subject, command=command,
        source_info={"kind": "arrays", "src": os.path.abspath(src)},
        extra_meta={"val": {"fraction": val_fraction, "seed": seed, "from_split": "train"}},
        shard_size_mb=shard_size_mb, max_samples_per_shard=max_samples_per_shard,
        s3_endpoint=s3_endpoint, overwrite=overwrite, progress=progress,
    )


def build_synthetic_dataset(
    preset: str,
    out_url: str,
    seed: int = 0,
    *,
    val_fraction: float = 0.1,
    shard_size_mb: Optional[float] = None,
    max_samples_per_shard: Optional[int] = None,
    s3_endpoint: Optional[str] = None,
    overwrite: bool = False,
    command: str = "",
    progress: bool = True,
    **spec_overrides,
) -> DatasetMeta:
    """Write the synthetic subject ``preset`` (``tiny`` or ``demo``) as shards at ``out_url``.

    meta.json gets ``retrieval_ceiling`` (300-way, 30 loops, on test) and the spec under
    ``source``. ``spec_overrides`` change preset fields (e.g. ``n_train=64``) for tests.
    """
    spec = get_spec(preset, **spec_overrides)
    subject = SyntheticSubject(spec, seed)
    arrays = {split: subject.split_arrays(split) for split in SOURCE_SPLITS}
    ceiling = subject.retrieval_ceiling("test", way=300, loops=30)
    import dataclasses

    return write_dataset(
        out_url, _sources(arrays, val_fraction, seed), subject=spec.subject, command=command,
        source_info={"kind": "synthetic", "preset": preset, "seed": seed, "spec": dataclasses.asdict(spec)},
        extra_meta={"val": {"fraction": val_fraction, "seed": seed, "from_split": "train"}, "retrieval_ceiling": ceiling},
        shard_size_mb=spec.shard_size_mb if shard_size_mb is None else shard_size_mb,
        max_samples_per_shard=max_samples_per_shard, s3_endpoint=s3_endpoint, overwrite=overwrite, progress=progress,
    )
