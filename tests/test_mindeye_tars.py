"""MindEye1's released webdataset tars (webdataset_avg_split/) -> our shards."""

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mindeye_dist.data import DataError, read_meta
from mindeye_dist.data import mindeye_tars as M
from mindeye_dist.data import shard_io as S
from mindeye_dist.data.storage import Storage

V = 40
SIZES = {"train": (7, 6, 5), "val": (6,), "test": (5, 4)}  # samples per tar (theirs: 18 train tars, 1 val, 2 test)


def _write_release(root: Path, subject: int, seed: int = 0) -> dict:
    """Tiny tars with MindEye1's member names and encodings (webdataset's TarWriter encodes npy and jpg)."""
    rng = np.random.default_rng([seed, subject])
    made = {}
    idx = 0
    for split, sizes in SIZES.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        made[split] = []
        for i, n in enumerate(sizes):
            with wds.TarWriter(str(root / split / f"{split}_subj0{subject}_{i}.tar")) as sink:
                for _ in range(n):
                    s = {"vox": rng.standard_normal((3, V)).astype(np.float16), "coco": int(rng.integers(73000)),
                         "trial": int(rng.integers(30000)), "reps": int(rng.integers(1, 4)),
                         "img": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)}  # smooth: JPEG keeps it
                    sink.write({"__key__": "sample%09d" % idx, "nsdgeneral.npy": s["vox"], "jpg": Image.fromarray(s["img"]),
                                "coco73k.npy": np.array([s["coco"]]), "trial.npy": np.array([s["trial"]]),
                                "num_uniques.npy": np.array([s["reps"]])})
                    idx += 1
                    made[split].append(s)
    return made


def _their_jpgs(folder: Path) -> list[bytes]:
    import tarfile

    out = []
    for tar in sorted(folder.glob("*.tar"), key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        with tarfile.open(tar) as t:
            out += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "webdataset_avg_split"
    return root, _write_release(root, 1)


def _samples(meta):
    st = Storage(meta.url)
    return {n: [raw for sh in s.shards for raw in S.read_shard(st, sh.name)] for n, s in meta.splits.items()}


def _convert(src, out, **kw):
    kw.setdefault("max_samples_per_shard", 4)
    return M.import_mindeye1_tars(M.MindEye1TarsConfig(src=str(src), out=str(out), progress=False, **kw))


def test_convert_keeps_every_sample_and_their_split(release, tmp_path):
    root, made = release
    meta = _convert(root.parent, tmp_path / "d")  # the folder holding webdataset_avg_split/ is found too
    assert {n: s.count for n, s in meta.splits.items()} == {"train": 18, "val": 6, "test": 9}
    assert meta.subject == 1 and meta.n_voxels == V and meta.raw["splits"]["train"]["reps"] == 3
    for split, raws in _samples(meta).items():
        jpgs = _their_jpgs(root / split)
        for row, (raw, want) in enumerate(zip(raws, made[split])):
            ids = json.loads(raw["json"])
            assert ids["index"] == row and ids["split"] == split and ids["subject"] == 1
            assert (ids["nsd_id"], ids["trial"], ids["n_reps"]) == (want["coco"], want["trial"], want["reps"])
            np.testing.assert_array_equal(S.load_npy(raw["voxels.npy"]), want["vox"])
            img = S.decode_image(raw["png"])
            np.testing.assert_array_equal(img, np.asarray(Image.open(io.BytesIO(jpgs[row])).convert("RGB")))
            assert np.abs(img.astype(int) - want["img"]).mean() < 20  # unrelated images: ~85  # and it is that image (JPEG is lossy)
    train = np.concatenate([S.load_npy(r["voxels.npy"]).astype(np.float64) for r in _samples(meta)["train"]])
    np.testing.assert_allclose(meta.voxel_stats()[0], train.mean(0), atol=1e-4)


def test_carve_folds_their_val_into_train(release, tmp_path):
    root, made = release
    meta = _convert(root, tmp_path / "d", val_source="carve", val_fraction=0.25, seed=3)
    got = _samples(meta)
    keys = {n: [json.loads(r["json"])["source"]["key"] for r in raws] for n, raws in got.items()}
    assert len(keys["train"]) + len(keys["val"]) == 24 and len(keys["val"]) == 6  # MindEye1's train + val, 25% carved
    assert not set(keys["train"]) & set(keys["val"]) and len(keys["test"]) == 9
    again = _convert(root, tmp_path / "e", val_source="carve", val_fraction=0.25, seed=3)
    assert [json.loads(r["json"])["source"]["key"] for r in _samples(again)["val"]] == keys["val"]


def test_resume_after_interruption(release, tmp_path, monkeypatch):
    root, _ = release
    fresh = _convert(root, tmp_path / "fresh")
    placed, real = [], S.write_shard

    def die(storage, name, samples, start, tmp_dir=None):
        if len(placed) == 3:
            raise KeyboardInterrupt("killed")
        placed.append(name)
        return real(storage, name, samples, start, tmp_dir)

    monkeypatch.setattr(S, "write_shard", die)
    with pytest.raises(KeyboardInterrupt):
        _convert(root, tmp_path / "d")
    monkeypatch.setattr(S, "write_shard", real)
    meta = _convert(root, tmp_path / "d")
    sha = lambda m: {n: [sh["sha256"] for sh in s["shards"]] for n, s in m.raw["splits"].items()}  # noqa: E731
    assert sha(meta) == sha(fresh) and not (tmp_path / "d" / M.PROGRESS_NAME).exists()


def test_bad_release_layouts(release, tmp_path):
    root, _ = release
    two = tmp_path / "two"
    _write_release(two, 1)
    _write_release(two, 2)
    with pytest.raises(DataError, match=r"holds subjects \[1, 2\]; choose one with --subject"):
        _convert(two, tmp_path / "a")
    assert _convert(two, tmp_path / "b", subject=2).subject == 2
    (two / "val" / "val_subj02_0.tar").unlink()
    with pytest.raises(DataError, match="subject 2 has no val tars"):
        _convert(two, tmp_path / "c", subject=2)
    with pytest.raises(DataError, match="no MindEye1 tars under"):
        _convert(tmp_path / "empty", tmp_path / "d")


def test_cli_mindeye1_tars(release, tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "launchers" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data_cli_me1", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(["mindeye1-tars", "--src", str(release[0]), "--out", str(tmp_path / "d"), "--quiet"])
    assert rc == 0 and "train 18, val 6, test 9" in capsys.readouterr().out
    assert read_meta(str(tmp_path / "d")).raw["source"]["kind"] == "mindeye1-tars"
