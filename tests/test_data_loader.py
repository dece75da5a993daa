"""Loader semantics: rank/worker split, equal batch counts, seeded epochs, exact resume, resampling."""

import pytest
import torch

from mindeye_dist.config import DataConfig
from mindeye_dist.data import Batch, DataError, build_synthetic_dataset, build_train_loader, read_meta


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("data") / "ds")
    build_synthetic_dataset("tiny", url, seed=2, max_samples_per_shard=13, progress=False)
    return url


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("data1") / "ds")
    build_synthetic_dataset("tiny", url, seed=2, shard_size_mb=100, progress=False)
    return url


def _ids(batches):
    return [int(i) for b in batches for i in b.index]


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.voxels, y.voxels) and torch.equal(x.index, y.index) and torch.equal(x.targets, y.targets) for x, y in zip(a, b))


@pytest.mark.parametrize("workers, reps", [(0, "one"), (2, "convex"), (2, "cycle")])
def test_resume_matches_uninterrupted_stream(dataset, workers, reps):
    cfg = DataConfig(url=dataset, num_workers=workers, shuffle_buffer=10, train_reps=reps)
    full = build_train_loader(cfg, 5, seed=7, rank=1, world_size=2)
    n = full.batches_per_epoch
    stream = []
    for b in full:  # two epochs from the endless iterator
        stream.append(b)
        if len(stream) == 2 * n:
            break
    assert full.position == (2, 0)
    for epoch, start in [(0, 3), (1, 0), (1, n - 1)]:
        resumed = build_train_loader(cfg, 5, seed=7, rank=1, world_size=2, start_epoch=epoch, start_batch=start)
        got = []
        for b in resumed:
            got.append(b)
            if len(got) == 2 * n - (epoch * n + start):
                break
        assert _same(got, stream[epoch * n + start:])


def test_ranks_get_equal_batches_and_disjoint_samples(dataset):
    cfg = DataConfig(url=dataset, num_workers=2, shuffle_buffer=10)
    meta = read_meta(dataset)
    per_rank = [list(build_train_loader(cfg, 4, seed=0, rank=r, world_size=3, meta=meta).epoch_batches(0)) for r in range(3)]
    n_train = meta.splits["train"].count
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == (n_train // 3) // 4
    ids = [i for b in per_rank for i in _ids(b)]
    assert len(ids) == len(set(ids)) and n_train - len(ids) < 3 * (4 + 1)  # dropped remainder < W (B + 1)


def test_epochs_are_shuffled_and_seeded(dataset):
    cfg = DataConfig(url=dataset, num_workers=0, shuffle_buffer=10)
    a = build_train_loader(cfg, 4, seed=0, rank=0, world_size=1)
    e0, e1 = _ids(a.epoch_batches(0)), _ids(a.epoch_batches(1))
    assert e0 != e1 and sorted(e0) != list(range(len(e0)))
    assert _ids(build_train_loader(cfg, 4, seed=0, rank=0, world_size=1).epoch_batches(0)) == e0
    assert _ids(build_train_loader(cfg, 4, seed=1, rank=0, world_size=1).epoch_batches(0)) != e0


def test_one_shard_many_ranks_and_workers(one_shard):
    meta = read_meta(one_shard)
    assert len(meta.splits["train"].shards) == 1
    cfg = DataConfig(url=one_shard, num_workers=2, shuffle_buffer=0)
    ids, counts = [], []
    for rank in range(2):
        batches = list(build_train_loader(cfg, 3, seed=0, rank=rank, world_size=2, drop_last=False, meta=meta).epoch_batches(0))
        counts.append(len(batches))
        ids += _ids(batches)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == meta.splits["train"].count
    assert abs(counts[0] - counts[1]) <= 1


def test_resampled_is_infinite_seeded_and_resumable(dataset):
    cfg = DataConfig(url=dataset, num_workers=2, shuffle_buffer=5, resampled=True)
    a = build_train_loader(cfg, 4, seed=3, rank=0, world_size=2)
    n = a.batches_per_epoch
    e0, e1 = list(a.epoch_batches(0)), list(a.epoch_batches(1))
    assert len(e0) == len(e1) == n and _ids(e0) != _ids(e1)
    again = build_train_loader(cfg, 4, seed=3, rank=0, world_size=2)
    assert _same(list(again.epoch_batches(0)), e0)
    assert _same(list(a.epoch_batches(1, 2)), e1[2:])


def test_reps_modes(dataset):
    meta = read_meta(dataset)
    out = {}
    for reps in ("one", "convex", "mean", "cycle"):
        cfg = DataConfig(url=dataset, num_workers=0, shuffle_buffer=0, train_reps=reps)
        out[reps] = next(iter(build_train_loader(cfg, 6, seed=0, rank=0, world_size=1, meta=meta)))
    assert all(torch.equal(out["mean"].index, b.index) for b in out.values())  # same samples, different mixing
    assert not torch.allclose(out["one"].voxels, out["mean"].voxels)
    assert not torch.allclose(out["convex"].voxels, out["mean"].voxels)
    assert out["mean"].voxels.shape == (6, meta.n_voxels) and out["mean"].voxels.dtype == torch.float32
    b = out["mean"].to("cpu")
    assert b.vae.shape == (6, 4, 8, 8) and b.images.shape == (6, 32, 32, 3) and b.subject.tolist() == [1] * 6


def test_too_small_split_is_a_clear_error(dataset):
    with pytest.raises(DataError, match="too few"):
        build_train_loader(DataConfig(url=dataset), 500, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="start_batch"):
        build_train_loader(DataConfig(url=dataset), 4, seed=0, rank=0, world_size=1, start_batch=10_000)


def test_an_epoch_left_open_does_not_hang_the_interpreter_at_exit(tmp_path):
    """Workers ignore SIGTERM (preemption); multiprocessing's exit handler SIGTERMs and then joins
    them, so an epoch generator still holding workers at exit used to hang the process forever."""
    import subprocess
    import sys
    import textwrap

    from mindeye_dist.data import build_synthetic_dataset

    url = tmp_path / "tiny"
    build_synthetic_dataset("tiny", str(url), seed=2, progress=False)
    code = textwrap.dedent(f"""
        from mindeye_dist.config import DataConfig
        from mindeye_dist.data.loader import build_train_loader
        loader = build_train_loader(DataConfig(url={str(url)!r}, num_workers=2, shuffle_buffer=10), 4, 0, rank=0, world_size=1)
        epoch = loader.epoch_batches(0)
        next(epoch); next(epoch)
        print("open", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "open" in proc.stdout, proc.stderr[-2000:]
