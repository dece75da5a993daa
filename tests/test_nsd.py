"""NSD importer on a miniature NSD tree in the official formats (tests/nsd_tree.py)."""

import csv
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("nibabel", reason="the NSD importer needs the 'nsd' extra (pip install -e '.[nsd]')")
pytest.importorskip("h5py", reason="the NSD importer needs the 'nsd' extra")

from mindeye_dist.data import DataError, read_meta  # noqa: E402
from mindeye_dist.data import nsd as N  # noqa: E402
from mindeye_dist.data import nsd_layout as L  # noqa: E402
from mindeye_dist.data import shard_io as S  # noqa: E402
from mindeye_dist.data.storage import Storage  # noqa: E402
from tests.nsd_tree import LATE_SHARED, TRIALS_PER_SESSION, build_mini_nsd, image_features  # noqa: E402


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_mini_nsd(tmp_path_factory.mktemp("nsd"), subjects=(1,), sessions=(1, 2, 3))


def _import(tree, out, **kw):
    kw.setdefault("sessions", "1-3")
    kw.setdefault("max_samples_per_shard", 16)
    return N.import_nsd(N.NsdImportConfig(nsd_root=str(tree.root), subject=1, out=str(out), progress=False, **kw))


def _samples(meta):
    """split -> list of decoded samples (voxels float16, image uint8, ids dict) in row order."""
    st = Storage(meta.url, meta.s3_endpoint)
    out = {}
    for name, split in meta.splits.items():
        out[name] = [{"voxels": S.load_npy(raw["voxels.npy"]), "image": S.decode_image(raw["png"]), "ids": json.loads(raw["json"])}
                     for shard in split.shards for raw in S.read_shard(st, shard.name)]
    return out


def _sha(meta):
    return {n: [sh["sha256"] for sh in s["shards"]] for n, s in meta.raw["splits"].items()}


def _mindeye_voxels(tree, session, zscore="session"):
    """Independent reference: (T, V) betas of a session in MindEye order, /300, z-scored in numpy."""
    roi = tree.masks[1] > 0
    x = tree.betas[(1, session)][roi].T.astype(np.float64) / 300.0  # boolean index = C order over (X, Y, Z)
    if zscore == "none":
        return x
    rows = np.arange(len(x))
    if zscore == "session-nonshared":
        ids = tree.nsd_ids(1)[(session - 1) * TRIALS_PER_SESSION: session * TRIALS_PER_SESSION]
        rows = np.flatnonzero(~np.isin(ids, tree.sharedix - 1))
    std = x[rows].std(0)  # ddof 0, like sklearn's StandardScaler in MindEye2's notebook
    return (x - x[rows].mean(0)) / np.where(std == 0, 1.0, std)  # constant voxel (the session marker): centred only


def test_nifti_and_hdf5_releases_give_identical_shards(tree, tmp_path):
    a = _import(tree, tmp_path / "nifti", betas="nifti")
    b = _import(tree, tmp_path / "hdf5", betas="hdf5")
    assert _sha(a) == _sha(b)  # tars are byte-identical (mtime 0): same voxels, order, images, ids
    assert a.n_voxels == int((tree.masks[1] > 0).sum()) and set(a.splits) == {"train", "val", "test"}
    assert not (tmp_path / "nifti" / ".nsd-work").exists() and not (tmp_path / "nifti" / N.PROGRESS_NAME).exists()


def test_every_trial_lands_on_its_image(tree, tmp_path):
    meta = _import(tree, tmp_path / "d", zscore="none")
    markers = tree.marker_columns(1)
    nsd_ids = tree.nsd_ids(1)
    seen = []
    for split, samples in _samples(meta).items():
        for row, s in enumerate(samples):
            ids, vox = s["ids"], s["voxels"]
            assert ids["index"] == row and ids["split"] == split and ids["subject"] == 1 and vox.shape == (3, meta.n_voxels)
            assert ids["shared1000"] == (split == "test") == (ids["nsd_id"] < 90)
            np.testing.assert_array_equal(s["image"], tree.images[ids["nsd_id"]])
            for k, (t, sess, st) in enumerate(zip(ids["trials"], ids["sessions"], ids["session_trials"])):
                assert nsd_ids[t] == ids["nsd_id"] and t == (sess - 1) * TRIALS_PER_SESSION + st
                code = vox[k, markers].astype(np.int64)  # betas/300 of the marker voxels, exact in float16
                assert code[0] * 64 + code[1] == ids["nsd_id"] and code[2] == sess and code[3] == st
            real = vox[: ids["n_reps"]].astype(np.float32)
            np.testing.assert_allclose(vox.astype(np.float32).mean(0), real.mean(0), rtol=2e-3, atol=2e-3)  # padding keeps the mean
            seen += ids["trials"]
    assert sorted(seen) == list(range(3 * TRIALS_PER_SESSION))  # every trial of sessions 1-3 exactly once
    reps = [s["ids"]["n_reps"] for ss in _samples(meta).values() for s in ss]
    assert {1, 2, 3} <= set(reps)


@pytest.mark.parametrize("zscore", ["session", "session-nonshared"])
def test_session_zscore_matches_numpy(tree, tmp_path, zscore):
    meta = _import(tree, tmp_path / zscore, zscore=zscore)
    ref = {s: _mindeye_voxels(tree, s, zscore) for s in (1, 2, 3)}
    for samples in _samples(meta).values():
        for s in samples:
            for k, (sess, st) in enumerate(zip(s["ids"]["sessions"], s["ids"]["session_trials"])):
                np.testing.assert_allclose(s["voxels"][k].astype(np.float64), ref[sess][st], rtol=1e-3, atol=2e-3)
    mean, std = meta.voxel_stats()  # stats.npz as the writer defines it: every stored rep of train
    train = np.concatenate([s["voxels"].astype(np.float64) for s in _samples(meta)["train"]])
    np.testing.assert_allclose(mean, train.mean(0), rtol=1e-4, atol=1e-4)
    want_std = train.std(0)
    np.testing.assert_allclose(std, np.where(want_std < 1e-6, 1.0, want_std), rtol=1e-4, atol=1e-4)  # constant: 1, as the writer


def test_ridge_decoder_finds_signal_only_when_trials_are_aligned(tree, tmp_path):
    from mindeye_dist.evaluate import retrieval_accuracy, ridge_baseline

    samples = _samples(_import(tree, tmp_path / "d", val_fraction=0.15))

    def xy(split, shift=0):
        x = np.stack([s["voxels"].astype(np.float64).mean(0) for s in samples[split]])
        y = image_features(np.stack([s["image"] for s in samples[split]]))
        return np.roll(x, shift, axis=0), y

    def score(shift):
        fit = ridge_baseline(*xy("train", shift), *xy("val", shift), way=len(samples["val"]), loops=1)
        x, y = xy("test", shift)
        r = retrieval_accuracy(fit.predict(x), y, way=None, loops=1)
        return (r["image_top1"] + r["brain_top1"]) / 2

    aligned, shifted = score(0), score(1)  # shift: every voxel row paired with the next image
    print(f"ridge retrieval aligned {aligned:.3f} shifted {shifted:.3f}")
    assert aligned > 0.6, aligned
    assert shifted < 0.25, shifted  # chance is 1/25


def test_one_session_setting_trains_on_session_one_only(tree, tmp_path):
    meta = _import(tree, tmp_path / "d", sessions="1", test_sessions="1-3", val_fraction=0.0)
    got = _samples(meta)
    assert set(got) == {"train", "test"}
    assert all(set(s["ids"]["sessions"]) == {1} for s in got["train"])
    assert {x for s in got["test"] for x in s["ids"]["sessions"]} == {1, 2, 3}
    assert meta.raw["source"]["train_sessions"] == [1] and meta.raw["source"]["test_sessions"] == [1, 2, 3]


def test_resume_after_interrupted_import(tree, tmp_path, monkeypatch):
    fresh = _import(tree, tmp_path / "fresh", betas="hdf5")
    reads, writes = [], []
    real_read, real_write = L.read_session_betas, S.write_shard

    def read(*a, **k):
        reads.append(a[2])
        return real_read(*a, **k)

    def write_then_die(storage, name, samples, start, tmp_dir=None):
        if len(writes) == 3:
            raise KeyboardInterrupt("killed")  # Ctrl-C / kill in the middle of the fourth shard
        writes.append(name)
        return real_write(storage, name, samples, start, tmp_dir)

    monkeypatch.setattr(L, "read_session_betas", read)
    monkeypatch.setattr(S, "write_shard", write_then_die)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _import(tree, out, betas="hdf5")
    assert reads == [1, 2, 3] and not (out / "meta.json").exists() and (out / N.PROGRESS_NAME).exists()
    monkeypatch.setattr(S, "write_shard", real_write)
    with pytest.raises(DataError, match="other options"):
        _import(tree, out, betas="hdf5", seed=1)  # a different import is refused, not mixed in
    meta = _import(tree, out, betas="hdf5")
    assert reads == [1, 2, 3]  # the session cache was reused
    assert _sha(meta) == _sha(fresh)
    assert not (out / N.PROGRESS_NAME).exists()
    again = _import(tree, out, betas="hdf5")  # complete: nothing is redone
    assert reads == [1, 2, 3] and again.raw["created_at"] == meta.raw["created_at"]


@pytest.mark.slow
def test_kill_9_then_rerun_resumes(tree, tmp_path):
    """A real SIGKILL in the middle of writing shards; the rerun finishes what is left."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fresh = _import(tree, tmp_path / "fresh", max_samples_per_shard=1)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(root / "launchers/prepare_data.py"), "nsd", "--nsd-root", str(tree.root), "--subject", "1",
           "--sessions", "1-3", "--out", str(out), "--max-samples-per-shard", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(root)})
    progress = out / N.PROGRESS_NAME
    while proc.poll() is None:
        try:
            if len(json.loads(progress.read_text())["shards"].get("train", [])) >= 5:
                proc.send_signal(signal.SIGKILL)
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert proc.wait(timeout=120) == -signal.SIGKILL, "the import finished before it could be killed"
    assert not (out / "meta.json").exists()
    meta = _import(tree, out, max_samples_per_shard=1)
    assert _sha(meta) == _sha(fresh) and not [n for n in os.listdir(out) if ".partial-" in n]


def test_shared982_leaves_out_images_shown_only_after_session_37(tree):
    design = L.read_design(L.NsdSource(str(tree.root)))
    late = {int(tree.subjectim[0, i - 1] - 1) for i in LATE_SHARED}  # shown only in sessions 38-40
    all_shared = N.test_images(design, "shared1000")
    assert len(all_shared) == 90 and late <= all_shared
    assert N.test_images(design, "shared982") == all_shared - late


def test_s3_input_and_output(tree, tmp_path, s3_server, s3_bucket):
    from mindeye_dist.data.storage import s3_filesystem

    fs = s3_filesystem(s3_server.endpoint)
    keep = [L.EXPDESIGN, L.STIM_INFO, L.STIMULI, L.mask_path(1)] + [L.betas_path(1, s, "nifti") for s in (1, 2)]
    for rel in keep:
        fs.put_file(str(tree.root / rel), f"{s3_bucket[5:]}/nsd/{rel}")
    remote = N.import_nsd(N.NsdImportConfig(nsd_root=f"{s3_bucket}/nsd", subject=1, out=f"{s3_bucket}/out", sessions="1-2",
                                            max_samples_per_shard=16, s3_endpoint=s3_server.endpoint, progress=False))
    local = _import(tree, tmp_path / "local", sessions="1-2")
    assert _sha(remote) == _sha(local)
    assert read_meta(f"{s3_bucket}/out", s3_server.endpoint).splits["test"].count == local.splits["test"].count


def test_bad_inputs_name_the_file_and_the_problem(tree, tmp_path):
    import nibabel as nib
    import scipy.io

    bad = tmp_path / "nsd"
    shutil.copytree(tree.root, bad)
    cfg = dict(nsd_root=str(bad), subject=1, out=str(tmp_path / "o"), progress=False, sessions="1-3")
    session2 = bad / L.betas_path(1, 2, "nifti")
    session2.rename(session2.with_suffix(".moved"))
    with pytest.raises(DataError, match=r"missing betas of subject 1 session 2: .*betas_session02\.nii\.gz does not exist"):
        N.import_nsd(N.NsdImportConfig(**cfg))
    session2.with_suffix(".moved").rename(session2)
    with pytest.raises(DataError, match=r"subject 4 has 30 NSD sessions .*\[31\] do not exist"):
        N.import_nsd(N.NsdImportConfig(**{**cfg, "subject": 4, "sessions": "30-31"}))
    mask = bad / L.mask_path(1)
    nib.save(nib.Nifti1Image(np.ones((9, 8, 6), dtype=np.int16), tree.affine), str(mask))
    with pytest.raises(DataError, match=r"betas_session01\.nii\.gz has grid \(9, 8, 7\).*nsdgeneral mask .*\(9, 8, 6\)"):
        N.import_nsd(N.NsdImportConfig(**{**cfg, "sessions": "1"}))
    with pytest.raises(DataError, match=r"betas_session01\.hdf5 has shape \(60, 7, 8, 9\).*needs \(trials, 6, 8, 9\)"):
        N.import_nsd(N.NsdImportConfig(**{**cfg, "sessions": "1", "betas": "hdf5"}))
    design = bad / L.EXPDESIGN
    mat = {k: v for k, v in scipy.io.loadmat(str(design)).items() if not k.startswith("__")}
    scipy.io.savemat(str(design), {**mat, "subjectim": mat["subjectim"][:, :, None]})
    with pytest.raises(DataError, match=r"nsd_expdesign\.mat: 'subjectim' has shape \(8, 900, 1\).*NSD's is 8 x 10000"):
        N.import_nsd(N.NsdImportConfig(**cfg))
    scipy.io.savemat(str(design), {**mat, "masterordering": mat["masterordering"][:, :-5]})
    with pytest.raises(DataError, match=r"nsd_expdesign\.mat: 'stimpattern' marks 2400 .* 'masterordering' lists 2395"):
        N.import_nsd(N.NsdImportConfig(**cfg))
    scipy.io.savemat(str(design), mat)
    table = bad / L.STIM_INFO
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    first = int(tree.nsd_ids(1)[0])  # the image of trial 1 (1-based)
    rows[1 + first][rows[0].index("subject1_rep0")] = "2"  # now claims trial 2 showed it
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=r"nsd_stim_info_merged\.csv: subject1_rep0 says trial 2 .* the files disagree"):
        N.import_nsd(N.NsdImportConfig(**cfg))


def test_cli_nsd(tree, tmp_path, capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "launchers" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "d"
    rc = cli.main(["nsd", "--nsd-root", str(tree.root), "--subject", "1", "--sessions", "1-2", "--test", "shared982",
                   "--betas", "hdf5", "--out", str(out), "--max-samples-per-shard", "8", "--quiet"])
    assert rc == 0
    meta = read_meta(str(out))
    assert meta.raw["source"]["test_set"] == "shared982" and meta.n_tokens == 0 and "targets" not in meta.raw["fields"]
    assert "dataset" in capsys.readouterr().out
    rc = cli.main(["nsd", "--nsd-root", str(tree.root), "--subject", "4", "--sessions", "31", "--out", str(tmp_path / "e")])
    assert rc == 2 and "subject 4 has 30 NSD sessions" in capsys.readouterr().err
