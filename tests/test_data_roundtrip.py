"""Write shards, read every sample back bit-for-bit, locally and through a real S3 server."""

import hashlib
import json

import numpy as np
import torch

from mindeye_dist.config import DataConfig
from mindeye_dist.data import SyntheticSubject, build_eval_loader, build_synthetic_dataset, build_train_loader, read_meta
from mindeye_dist.data import pipeline as P

SEED = 5
RANKS, WORKERS = 2, 2


def _build(url, endpoint=None):
    return build_synthetic_dataset("tiny", url, SEED, max_samples_per_shard=16, s3_endpoint=endpoint, progress=False)


def _source(meta):
    """The float16 values the writer must have stored, per split, by source row."""
    subject = SyntheticSubject("tiny", SEED)
    arrays = {s: subject.split_arrays(s) for s in ("train", "test")}
    return {name: arrays[info_source] for name, info_source in
            ((n, meta.raw["splits"][n]["source_split"]) for n in meta.splits)}


def _check_bit_exact(meta):
    src = _source(meta)
    for name, split in meta.splits.items():
        rows = []
        for shard in split.shards:
            seg = P.Segment(meta.shard_url(shard), shard.name, 0, shard.count, shard.count, meta.s3_endpoint, shard.sha256)
            for raw in P.shard_samples(seg, split.fields):
                s = P.decode_sample(raw)
                r = s["json"]["index"]
                rows.append(r)
                a = src[name]
                assert s["voxels.npy"].dtype == np.float16
                np.testing.assert_array_equal(s["voxels.npy"].view(np.uint16), a["voxels"][r].astype(np.float16).view(np.uint16))
                np.testing.assert_array_equal(s["targets.npy"].view(np.uint16), a["clip"][r].astype(np.float16).view(np.uint16))
                np.testing.assert_array_equal(s["vae.npy"], a["vae"][r].astype(np.float16))
                np.testing.assert_array_equal(s["png"], a["images"][r])
        assert rows == sorted(rows) and len(rows) == split.count  # row order inside a split
    assert set(meta.splits) == {"train", "val", "test"}


def _check_exactly_once(cfg, meta):
    seen, per_rank = [], []
    for rank in range(RANKS):
        loader = build_train_loader(cfg, 4, seed=1, rank=rank, world_size=RANKS, drop_last=False, meta=meta)
        ids = [int(i) for b in loader.epoch_batches(0) for i in b.index]
        per_rank.append(len(ids))
        seen += ids
    assert sorted(seen) == sorted(int(i) for i in _train_rows(meta))
    assert abs(per_rank[0] - per_rank[1]) <= 1


def _train_rows(meta):
    rows = []
    for shard in meta.splits["train"].shards:
        seg = P.Segment(meta.shard_url(shard), shard.name, 0, shard.count, shard.count, meta.s3_endpoint)
        rows += [json.loads(s["json"])["index"] for s in P.shard_samples(seg, ["voxels"])]
    return rows


def _check_values(cfg, meta):
    """Loader output = z-scored stored float16 voxels (mean of reps in eval), float16 targets."""
    src = _source(meta)["test"]
    mean, std = meta.voxel_stats()
    batches = list(build_eval_loader(cfg, "test", 7, meta=meta))
    idx = torch.cat([b.index for b in batches]).numpy()
    np.testing.assert_array_equal(idx, np.arange(meta.splits["test"].count))
    vox = torch.cat([b.voxels for b in batches]).numpy()
    want = ((src["voxels"].astype(np.float16).astype(np.float32) - mean) / std).mean(axis=1)
    np.testing.assert_allclose(vox, want, rtol=1e-5, atol=1e-5)
    tgt = torch.cat([b.targets for b in batches]).numpy()
    np.testing.assert_array_equal(tgt, src["clip"].astype(np.float16).astype(np.float32))
    assert batches[0].images.dtype == torch.uint8 and batches[0].subject.dtype == torch.long


def test_local_roundtrip(tmp_path):
    url = str(tmp_path / "ds")
    meta = _build(url)
    assert meta.splits["train"].count + meta.splits["val"].count == 160
    _check_bit_exact(meta)
    cfg = DataConfig(url=url, num_workers=WORKERS, shuffle_buffer=8)
    _check_exactly_once(cfg, meta)
    _check_values(cfg, meta)
    # stats are from the train split only
    train_vox = _source(meta)["train"]["voxels"][_train_rows(meta)].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(meta.voxel_stats()[0], train_vox.reshape(-1, meta.n_voxels).mean(0), rtol=1e-4, atol=1e-4)


def test_s3_roundtrip(s3_server, s3_bucket):
    url = f"{s3_bucket}/tiny"
    meta = _build(url, s3_server.endpoint)
    meta = read_meta(url, s3_server.endpoint)
    assert meta.url == url and "retrieval_ceiling" in meta.raw
    _check_bit_exact(meta)
    cfg = DataConfig(url=url, num_workers=WORKERS, shuffle_buffer=8, s3_endpoint=s3_server.endpoint)
    _check_exactly_once(cfg, meta)
    _check_values(cfg, meta)


def test_file_url_and_meta_contents(tmp_path):
    meta = _build(f"file://{tmp_path}/ds")
    raw = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert raw["format_version"] == 1 and raw["command"]
    assert [s["count"] for s in raw["splits"]["train"]["shards"]] == [s.count for s in meta.splits["train"].shards]
    for split in raw["splits"].values():  # the checksum is of the file as placed (sha256sum would agree)
        for shard in split["shards"]:
            data = (tmp_path / "ds" / shard["name"]).read_bytes()
            assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
    assert raw["fields"]["voxels"]["dtype"] == "float16" and raw["voxel_stats"]["file"] == "stats.npz"
    assert 0 < raw["retrieval_ceiling"]["image_top1"] <= 1
    assert "secret" not in json.dumps(raw).lower() and "testing" not in json.dumps(raw)
    assert not [p for p in (tmp_path / "ds").iterdir() if "partial" in p.name]
