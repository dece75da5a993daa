"""The arrays importer round-trips an outside dataset given in the contract's format."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mindeye_dist.config import DataConfig
from mindeye_dist.data import build_eval_loader, import_arrays, read_meta

ROOT = Path(__file__).resolve().parents[1]


def write_contract(d: Path, n_train=30, n_test=12, reps=3, vox=20, seed=0, images=True):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_voxels": rng.normal(3.0, 2.0, (n_train, reps, vox)).astype(np.float32),
        "test_voxels": rng.normal(3.0, 2.0, (n_test, vox)).astype(np.float64),  # [n, voxels] form
        "train_clip": rng.normal(size=(n_train, 2, 8)).astype(np.float32),
        "test_clip": rng.normal(size=(n_test, 2, 8)).astype(np.float32),
    }
    if images:
        arrays |= {
            "train_images": rng.integers(0, 256, (n_train, 8, 8, 3), dtype=np.uint8),
            "test_images": rng.integers(0, 256, (n_test, 8, 8, 3), dtype=np.uint8),
            "train_vae": rng.normal(size=(n_train, 4, 2, 2)).astype(np.float32),
            "test_vae": rng.normal(size=(n_test, 4, 2, 2)).astype(np.float32),
        }
    for name, a in arrays.items():
        np.save(d / f"{name}.npy", a)
    return arrays


def test_import_roundtrip(tmp_path):
    arrays = write_contract(tmp_path / "src")
    meta = import_arrays(str(tmp_path / "src"), str(tmp_path / "ds"), val_fraction=0.2, seed=3,
                         max_samples_per_shard=7, progress=False)
    assert (meta.splits["train"].count, meta.splits["val"].count, meta.splits["test"].count) == (24, 6, 12)
    assert meta.splits["test"].reps == 1 and meta.splits["train"].reps == 3
    cfg = DataConfig(url=str(tmp_path / "ds"))
    mean, std = meta.voxel_stats()
    for split, source in (("train", "train"), ("val", "train"), ("test", "test")):
        batches = list(build_eval_loader(cfg, split, 5))
        idx = torch.cat([b.index for b in batches]).numpy()
        assert list(idx) == sorted(idx)
        vox16 = arrays[f"{source}_voxels"][idx].astype(np.float16).astype(np.float32)
        if vox16.ndim == 2:
            vox16 = vox16[:, None]
        np.testing.assert_allclose(torch.cat([b.voxels for b in batches]).numpy(), ((vox16 - mean) / std).mean(1), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(torch.cat([b.targets for b in batches]).numpy(),
                                      arrays[f"{source}_clip"][idx].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(torch.cat([b.images for b in batches]).numpy(), arrays[f"{source}_images"][idx])
        np.testing.assert_array_equal(torch.cat([b.vae for b in batches]).numpy(),
                                      arrays[f"{source}_vae"][idx].astype(np.float16).astype(np.float32))
    val_idx = {int(i) for b in build_eval_loader(cfg, "val", 50) for i in b.index}
    train_idx = {int(i) for b in build_eval_loader(cfg, "train", 50) for i in b.index}
    assert not val_idx & train_idx and len(val_idx | train_idx) == 30
    # z-score statistics come from the train split only (not val, not test)
    tr = arrays["train_voxels"][sorted(train_idx)].astype(np.float16).astype(np.float64).reshape(-1, 20)
    np.testing.assert_allclose(mean, tr.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(std, tr.std(0), rtol=1e-4, atol=1e-4)


def test_val_fraction_zero_and_seeded(tmp_path):
    write_contract(tmp_path / "src", images=False)
    meta = import_arrays(str(tmp_path / "src"), str(tmp_path / "a"), val_fraction=0.0, progress=False)
    assert "val" not in meta.splits and meta.splits["train"].count == 30 and meta.field_shape("images") is None
    m1 = import_arrays(str(tmp_path / "src"), str(tmp_path / "b"), val_fraction=0.3, seed=1, progress=False)
    m2 = import_arrays(str(tmp_path / "src"), str(tmp_path / "c"), val_fraction=0.3, seed=1, progress=False)
    rows = lambda m: [int(i) for b in build_eval_loader(DataConfig(url=m.url), "val", 50) for i in b.index]  # noqa: E731
    assert rows(m1) == rows(m2) and len(rows(m1)) == 9


def test_cli_arrays(tmp_path):
    write_contract(tmp_path / "src", images=False)
    out = subprocess.run([sys.executable, str(ROOT / "launchers/prepare_data.py"), "arrays", "--src", str(tmp_path / "src"),
                          "--out", str(tmp_path / "ds"), "--max-samples-per-shard", "10", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    meta = read_meta(str(tmp_path / "ds"))
    assert "prepare_data.py arrays" in meta.raw["command"] and len(meta.splits["train"].shards) == 3
    bad = subprocess.run([sys.executable, str(ROOT / "launchers/prepare_data.py"), "arrays", "--src", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "ds2")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr and "Traceback" not in bad.stderr
