"""Shard checksums, the start-up shard check, NaN/inf in the data, and skip counts.

Every case goes through the real entry points (build_train_loader / build_eval_loader /
check_shards) on real shards, locally or on the loopback moto S3 server.
"""

import hashlib
import json
import logging
import os
import tarfile
import warnings

import numpy as np
import pytest

from mindeye_dist.config import DataConfig
from mindeye_dist.data import (
    CorruptShardError, build_eval_loader, build_synthetic_dataset, build_train_loader, check_shards, read_meta,
)
from mindeye_dist.data.storage import s3_filesystem


def _build(url, endpoint=None, per_shard=20):
    return build_synthetic_dataset("tiny", url, seed=1, max_samples_per_shard=per_shard, shard_size_mb=100, s3_endpoint=endpoint,
                                   progress=False)


def _rewrite_targets(path, which, values):
    """Overwrite the targets.npy payload of samples ``which`` (indices in the shard) in place:
    same bytes count, npy header untouched; ``values(old) -> new`` float16 array."""
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".targets.npy")]
    with open(path, "r+b") as f:
        for i in which:
            m = members[i]
            f.seek(m.offset_data)
            raw = f.read(m.size)
            header = len(raw) - np.load(__import__("io").BytesIO(raw)).nbytes
            old = np.frombuffer(raw[header:], dtype=np.float16)
            new = values(old).astype(np.float16)
            assert new.nbytes == old.nbytes
            f.seek(m.offset_data + header)
            f.write(new.tobytes())
    return [m.name.split(".")[0] for m in (members[i] for i in which)]


def _set_meta(ds, fn):
    path = os.path.join(ds, "meta.json")
    raw = json.loads(open(path).read())
    fn(raw)
    open(path, "w").write(json.dumps(raw))


def _drain(loader_iter):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = list(loader_iter)
    return out, [str(w.message) for w in rec]


def test_overwritten_targets_fail_naming_the_shard(tmp_path):
    """Silent bit-rot: finite values of the same size in place of a shard's targets. One shard
    read by 2 ranks: the damage lies in rank 1's half, and rank 0 (which reads the rest of the
    shard only to hash it) finds it too, before releasing its last sample."""
    ds = str(tmp_path / "ds")
    meta = _build(ds, per_shard=1000)
    (shard,) = meta.splits["train"].shards
    _rewrite_targets(os.path.join(ds, shard.name), range(shard.count - 5, shard.count), lambda old: old * 0.5 + 0.25)
    cfg = DataConfig(url=ds, num_workers=0, shuffle_buffer=8)
    for rank in range(2):
        with pytest.raises(CorruptShardError, match=shard.name) as err:
            list(build_train_loader(cfg, 4, seed=0, rank=rank, world_size=2).epoch_batches(0))
        assert "checksum" in str(err.value) and "rebuild the dataset" in str(err.value)
        assert "data.on_corrupt=skip" in str(err.value)
    # skip: the shard is dropped and counted once however often it is met; ranks stay equal
    skip = DataConfig(url=ds, num_workers=0, shuffle_buffer=8, on_corrupt="skip")
    ev = build_eval_loader(skip, "train", 8)
    batches, warned = _drain(ev)
    assert ev.skipped.counts().shard_names == (shard.name,) and sum(len(b) for b in batches) < shard.count
    assert warned and all("set data.on_corrupt=skip" not in w for w in warned)


def test_old_dataset_without_checksums_loads_with_a_note(tmp_path, caplog):
    ds = str(tmp_path / "ds")
    _build(ds)
    _set_meta(ds, lambda raw: [sh.pop("sha256") for sp in raw["splits"].values() for sh in sp["shards"]])
    with caplog.at_level(logging.WARNING, logger="mindeye_dist.data.meta"):
        meta = read_meta(ds)
        read_meta(ds)
    notes = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
    assert len(notes) == 1 and "no checksum" in notes[0]  # one line per dataset and process
    assert all(s.sha256 is None for sp in meta.splits.values() for s in sp.shards)
    assert check_shards(meta).unverified == len(meta.splits["train"].shards) + len(meta.splits["val"].shards)
    n = sum(len(b) for b in build_eval_loader(DataConfig(url=ds), "test", 8, meta=meta))
    assert n == meta.splits["test"].count


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _check_found(check_or_err, meta, missing, truncated):
    text = str(check_or_err)
    for name in (missing, truncated):
        assert name in text
    sizes = {s.name: s.bytes for s in meta.splits["train"].shards}
    assert f"{missing}: missing (expected {sizes[missing]:,} bytes)" in text
    assert f"{truncated}: {sizes[truncated] // 2:,} bytes, expected {sizes[truncated]:,} (truncated)" in text


def test_check_shards_finds_missing_and_truncated_at_start(tmp_path):
    ds = str(tmp_path / "ds")
    meta = _build(ds)
    shards = meta.splits["train"].shards
    missing, truncated = shards[1].name, shards[3].name
    os.remove(os.path.join(ds, missing))
    _truncate(os.path.join(ds, truncated))
    with pytest.raises(CorruptShardError, match="2 of .* shards .* disagree with meta.json") as err:
        check_shards(ds)
    _check_found(err.value, meta, missing, truncated)
    assert "--overwrite" in str(err.value) and "data.on_corrupt=skip" in str(err.value)
    assert check_shards(ds, ("test",)).problems == ()  # only the splits asked for
    check = check_shards(ds, ("train", "val"), on_corrupt="skip")
    assert check.skip_shards == {missing, truncated} and check.warnings == 2
    # the loaders never open them, count them, and every rank still yields full epochs
    cfg = DataConfig(url=ds, num_workers=2, shuffle_buffer=8, on_corrupt="skip")
    loader = build_train_loader(cfg, 4, seed=0, rank=0, world_size=2, skip_shards=check.skip_shards)
    batches, warned = _drain(loader.epoch_batches(0))
    assert len(batches) == loader.batches_per_epoch and all(len(b) == 4 for b in batches)
    assert not warned  # nothing was opened and found bad while reading
    assert loader.skipped.counts().shard_names == tuple(sorted((missing, truncated)))


def test_check_shards_on_s3_lists_or_heads(s3_server, s3_bucket, monkeypatch):
    url = f"{s3_bucket}/ds"
    meta = _build(url, s3_server.endpoint)
    fs = s3_filesystem(s3_server.endpoint)
    shards = meta.splits["train"].shards
    missing, truncated = shards[0].name, shards[2].name
    fs.rm_file(f"{url[5:]}/{missing}")
    data = fs.cat_file(f"{url[5:]}/{truncated}")
    fs.pipe_file(f"{url[5:]}/{truncated}", data[: len(data) // 2])
    with pytest.raises(CorruptShardError) as err:
        check_shards(url, s3_endpoint=s3_server.endpoint)
    _check_found(err.value, meta, missing, truncated)
    # without s3:ListBucket: one HEAD per object
    from mindeye_dist.data.storage import Storage

    def denied(self):
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(Storage, "list_sizes", denied)
    check = check_shards(url, None, s3_endpoint=s3_server.endpoint, on_corrupt="skip")
    _check_found("; ".join(p.describe() for p in check.problems), meta, missing, truncated)
    assert check.checked == sum(len(s.shards) for s in meta.splits.values())


def _poison(ds, shard, positions, value):
    """Put ``value`` (NaN/inf) into some samples' targets and re-record the shard's checksum, as a
    dataset written by a writer that let NaN through would look."""
    path = os.path.join(ds, shard.name)

    def poison(old):
        new = old.copy()
        new[3] = value
        return new

    keys = _rewrite_targets(path, positions, poison)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    _set_meta(ds, lambda raw: [sh.update(sha256=digest) for sp in raw["splits"].values() for sh in sp["shards"]
                               if sh["name"] == shard.name])
    return keys


def test_nan_in_the_data_names_shard_and_sample_or_is_skipped_and_counted(tmp_path):
    ds = str(tmp_path / "ds")
    meta = _build(ds)
    shard = meta.splits["train"].shards[1]
    keys = _poison(ds, shard, [2, 7], np.nan)
    cfg = DataConfig(url=ds, num_workers=2, shuffle_buffer=8)
    with pytest.raises(CorruptShardError, match=f"{shard.name}: sample {keys[0]} targets.npy has NaN or inf") as err:
        list(build_train_loader(cfg, 4, seed=0, rank=0, world_size=1).epoch_batches(0))
    assert "data.on_corrupt=skip" in str(err.value)
    skip = DataConfig(url=ds, num_workers=2, shuffle_buffer=8, on_corrupt="skip")
    loader = build_train_loader(skip, 4, seed=0, rank=0, world_size=1)
    for epoch in range(2):  # counted once per sample, across both worker processes and both epochs
        batches, warned = _drain(loader.epoch_batches(epoch))
        assert len(batches) == loader.batches_per_epoch and all(len(b) == 4 for b in batches)
        assert all(np.isfinite(b.targets.numpy()).all() for b in batches)
        assert not {int(i) for b in batches for i in b.index} & {int(k.split("_")[-1]) for k in keys}
    counts = loader.skipped.counts()
    assert (counts.shards, counts.samples) == (0, 2)
    assert counts.as_metrics() == {"data/skipped_shards": 0, "data/skipped_samples": 2}
    # resume under skip is still exact: the dropped samples are replaced before the shuffle
    full = [b.index.tolist() for b in _drain(loader.epoch_batches(1))[0]]
    resumed = [b.index.tolist() for b in _drain(build_train_loader(skip, 4, seed=0, rank=0, world_size=1,
                                                                   start_epoch=1, start_batch=3).epoch_batches(1, 3))[0]]
    assert resumed == full[3:]


def test_inf_in_eval_split_is_skipped_and_counted(tmp_path):
    ds = str(tmp_path / "ds")
    meta = _build(ds)
    shard = meta.splits["test"].shards[0]
    _poison(ds, shard, [0], np.inf)
    ev = build_eval_loader(DataConfig(url=ds, on_corrupt="skip"), "test", 8)
    batches, warned = _drain(ev)
    assert sum(len(b) for b in batches) == meta.splits["test"].count - 1 and ev.skipped.counts().samples == 1
    assert any("has NaN or inf" in w and "rebuild the dataset" in w for w in warned)
    assert all("set data.on_corrupt=skip" not in w for w in warned)


def _merge_rank(rank, init_file, out_dir):
    import torch.distributed as dist

    from mindeye_dist.data import ShardInfo, SkipCounter, SplitInfo

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        split = SplitInfo("train", 30, 1, ("voxels",), tuple(ShardInfo(f"train-{i:06d}.tar", 10, 100) for i in range(3)))
        counter = SkipCounter(split, preskipped=["train-000000.tar"])  # both ranks skip shard 0 from the start
        counter.shard(f"train-{rank + 1:06d}.tar")  # each finds another one
        counter.sample("train-000002.tar", 4)  # both find the same sample
        c = counter.counts(across_ranks=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump([c.shards, c.samples, list(c.shard_names), counter.counts().shards], f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_skip_counts_merge_across_ranks(tmp_path):
    """counts(across_ranks=True) is a MAX all-reduce of the flags: a shard two ranks both
    skipped counts once, and every rank gets the same totals."""
    import torch.multiprocessing as mp

    # fork: the children need nothing re-imported (spawn would re-import torch twice)
    mp.start_processes(_merge_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    names = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert got[0] == [3, 1, names, 2] and got[1] == [3, 1, names, 2]
