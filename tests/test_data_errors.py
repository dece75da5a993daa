"""Bad input gets a clear error, and nothing half-written is left behind."""

import os
import time

import numpy as np
import pytest

from mindeye_dist.config import DataConfig
from mindeye_dist.data import (
    CorruptShardError, DataError, StorageError, build_eval_loader, build_synthetic_dataset, build_train_loader,
    import_arrays, read_meta,
)
from mindeye_dist.distributed import free_port
from tests.test_data_arrays import write_contract


def _import(src, out):
    return import_arrays(str(src), str(out), progress=False)


@pytest.mark.parametrize("case, match", [
    ("rows", "row counts differ within split 'train'"),
    ("ndim", r"train_voxels.npy has shape \(30, 1, 3, 20\)"),
    ("nan_voxels", "train_voxels.npy has NaN or inf .* first at row 4"),
    ("inf_targets", "test_clip.npy has NaN or inf .* first at row 2"),
    ("missing", "missing test_clip.npy"),
    ("empty", "split 'test' is empty"),
    ("voxels_mismatch", "train has 20 voxels but test has 19"),
    ("float16_overflow", "exceed the float16 range"),
])
def test_bad_arrays(tmp_path, case, match):
    src = tmp_path / "src"
    a = write_contract(src, images=False)
    if case == "rows":
        np.save(src / "train_clip.npy", a["train_clip"][:-1])
    elif case == "ndim":
        np.save(src / "train_voxels.npy", a["train_voxels"][:, None])
    elif case == "nan_voxels":
        a["train_voxels"][4, 1, 2] = np.nan
        np.save(src / "train_voxels.npy", a["train_voxels"])
    elif case == "inf_targets":
        a["test_clip"][2, 0, 0] = np.inf
        np.save(src / "test_clip.npy", a["test_clip"])
    elif case == "missing":
        os.remove(src / "test_clip.npy")
    elif case == "empty":
        np.save(src / "test_voxels.npy", a["test_voxels"][:0])
        np.save(src / "test_clip.npy", a["test_clip"][:0])
    elif case == "voxels_mismatch":
        np.save(src / "test_voxels.npy", a["test_voxels"][:, :19])
    elif case == "float16_overflow":
        a["train_voxels"][7, 0, 0] = 1e6
        np.save(src / "train_voxels.npy", a["train_voxels"])
    with pytest.raises(DataError, match=match):
        _import(src, tmp_path / "ds")
    assert not (tmp_path / "ds" / "meta.json").exists()


def test_failed_write_leaves_no_dataset(tmp_path, monkeypatch):
    from mindeye_dist.data import writer

    real = writer._write_split

    def explode(src, w, subject, stats):
        if src.name == "test":
            raise RuntimeError("disk full")
        return real(src, w, subject, stats)

    monkeypatch.setattr(writer, "_write_split", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        build_synthetic_dataset("tiny", str(tmp_path / "ds"), progress=False)
    assert os.listdir(tmp_path / "ds") == []  # no meta.json, no shards, no temporaries
    with pytest.raises(DataError, match="no meta.json"):
        read_meta(str(tmp_path / "ds"))


def test_existing_dataset_needs_overwrite(tmp_path):
    build_synthetic_dataset("tiny", str(tmp_path / "ds"), progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        build_synthetic_dataset("tiny", str(tmp_path / "ds"), progress=False)
    meta = build_synthetic_dataset("tiny", str(tmp_path / "ds"), seed=1, overwrite=True, progress=False, max_samples_per_shard=50)
    assert meta.raw["source"]["seed"] == 1
    assert sorted(p for p in os.listdir(tmp_path / "ds") if p.endswith(".tar")) == sorted(
        s.name for sp in meta.splits.values() for s in sp.shards)


def test_unreachable_endpoint_fails_fast(tmp_path, s3_server):  # s3_server: credentials are set
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = time.time()
    with pytest.raises(StorageError, match="unreachable") as err:
        read_meta("s3://bucket/ds", endpoint)
    assert endpoint in str(err.value) and time.time() - t < 30
    with pytest.raises(StorageError, match="unreachable"):
        build_synthetic_dataset("tiny", "s3://bucket/ds", s3_endpoint=endpoint, progress=False)


def test_wrong_credentials(s3_server, s3_bucket, s3_auth_enforced):
    with pytest.raises(StorageError, match="invalid credentials") as err:
        read_meta(f"{s3_bucket}/ds", s3_server.endpoint)
    assert "testing" not in str(err.value)  # never echo credentials


def test_missing_dataset_and_split(tmp_path, s3_server, s3_bucket):
    with pytest.raises(DataError, match="no meta.json .* Run launchers/prepare_data.py"):
        read_meta(f"{s3_bucket}/nothing", s3_server.endpoint)
    build_synthetic_dataset("tiny", str(tmp_path / "ds"), progress=False)
    with pytest.raises(DataError, match="split 'dev' is not in"):
        build_eval_loader(DataConfig(url=str(tmp_path / "ds")), "dev", 4)
    with pytest.raises(DataError, match="data.n_voxels=7 disagrees"):
        build_eval_loader(DataConfig(url=str(tmp_path / "ds"), n_voxels=7), "test", 4)


def _damage(path, how):
    data = open(path, "rb").read()
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # garbage in the middle of the tar
        mid = len(data) // 2
        data = data[:mid] + b"\xff" * 2048 + data[mid + 2048:]
    open(path, "wb").write(data)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_corrupt_shard_fail_names_it(tmp_path, how):
    meta = build_synthetic_dataset("tiny", str(tmp_path / "ds"), max_samples_per_shard=20, progress=False)
    bad = meta.splits["test"].shards[1].name
    _damage(tmp_path / "ds" / bad, how)
    with pytest.raises(CorruptShardError, match=bad) as err:
        list(build_eval_loader(DataConfig(url=str(tmp_path / "ds")), "test", 8))
    assert "rebuild the dataset" in str(err.value) and "data.on_corrupt=skip" in str(err.value)


def test_corrupt_shard_skip_counts_and_keeps_ranks_equal(tmp_path):
    meta = build_synthetic_dataset("tiny", str(tmp_path / "ds"), max_samples_per_shard=20, progress=False)
    _damage(tmp_path / "ds" / meta.splits["train"].shards[2].name, "truncate")
    cfg = DataConfig(url=str(tmp_path / "ds"), on_corrupt="skip", num_workers=0, shuffle_buffer=4)
    counts = []
    total_skipped = 0
    for rank in range(2):
        loader = build_train_loader(cfg, 8, seed=0, rank=rank, world_size=2)
        with pytest.warns(RuntimeWarning, match="skipping shard train-000002.tar") if rank == 0 else _maybe_warn() as rec:
            batches = list(loader.epoch_batches(0))
        if rank == 0:  # already skipping: the warning must not tell you to set skip
            assert not any("set data.on_corrupt=skip" in str(w.message) for w in rec)
        counts.append(len(batches))
        assert all(len(b) == 8 for b in batches)
        total_skipped += loader.skipped.counts().shards
    assert counts[0] == counts[1] == loader.batches_per_epoch
    assert total_skipped == 1  # the damaged shard lies in exactly one rank's range
    ev = build_eval_loader(cfg, "train", 8)
    import warnings as w

    with w.catch_warnings(record=True):
        n = sum(len(b) for b in ev)
    assert ev.skipped.counts().shard_names == (meta.splits["train"].shards[2].name,) and n < meta.splits["train"].count


class _maybe_warn:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self._cm.__enter__()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
