"""Target precompute (prepare_data.py targets) with tiny randomly initialised encoders built from config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mindeye_dist.data import DataError, build_synthetic_dataset, read_meta
from mindeye_dist.data import shard_io as S
from mindeye_dist.data import targets as T
from mindeye_dist.data.encoders import CLIP_MEAN, CLIP_STD, TargetSpec
from mindeye_dist.data.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {"embed_dim": 24, "quick_gelu": True,
            "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "patch_size": 7, "head_width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
TINY_VAE = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [4, 4, 4, 4], "layers_per_block": 1, "norm_num_groups": 2, "latent_channels": 4}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random encoders saved the way users hold real ones: an open_clip checkpoint + config,
    a diffusers VAE folder and a MindEye-style .pth (old attention key names), a .pt2 teacher."""
    import open_clip
    from diffusers import AutoencoderKL

    d = tmp_path_factory.mktemp("weights")
    (d / "tiny-vit-test.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(str(d / "tiny-vit-test.json"))
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-vit-test")
    torch.save(clip.state_dict(), d / "clip.bin")
    vae = AutoencoderKL(**TINY_VAE)
    vae.save_pretrained(d / "vae")
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in vae.state_dict().items()}
    assert any(".query." in k for k in legacy)
    torch.save(legacy, d / "sd_image_var_autoenc.pth")
    (d / "vae_config.json").write_text(json.dumps(TINY_VAE))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 8, 8), torch.nn.GELU()).eval()  # 224 px -> (6, 28, 28)
    ep = torch.export.export(net, (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, d / "teacher.pt2")
    return {"dir": d, "config": str(d / "tiny-vit-test.json"), "clip": str(d / "clip.bin"), "clip_model": clip.eval(),
            "vae": vae.eval(), "teacher": net}


def _dataset(url, **kw):
    return build_synthetic_dataset("tiny", str(url), 0, n_train=20, n_test=6, max_samples_per_shard=6, progress=False, **kw)


def _field(meta, key):
    st = Storage(meta.url, meta.s3_endpoint)
    vals, imgs = [], []
    for split in meta.splits.values():
        for sh in split.shards:
            for raw in S.read_shard(st, sh.name):
                vals.append(S.load_npy(raw[key]))
                imgs.append(S.decode_image(raw["png"]))
    return np.stack(vals), torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def _norm(x):
    m, s = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - m) / s


def test_clip_mindeye1_tokens_and_the_training_loader_reads_them(weights, tmp_path):
    from mindeye_dist.config import DataConfig
    from mindeye_dist.data import build_eval_loader

    meta = _dataset(tmp_path / "d")
    spec = TargetSpec("clip-l14-mindeye1", weights["clip"], arch="tiny-vit-test", model_config=weights["config"], batch_size=4)
    with pytest.raises(DataError, match="already has field 'targets'.*--replace"):
        T.add_targets(meta.url, spec, progress=False)
    spec.replace = True
    meta = T.add_targets(meta.url, spec, progress=False)
    assert (meta.n_tokens, meta.token_dim) == (17, 24) and meta.raw["fields"]["targets"]["encoder"]["name"] == "clip-l14-mindeye1"
    tokens, images = _field(meta, "targets.npy")
    assert tokens.dtype == np.float16 and tokens.shape == (26, 17, 24)
    np.testing.assert_allclose(np.linalg.norm(tokens[:, 0].astype(np.float32), axis=-1), 1.0, atol=2e-3)  # MindEye1: / ||CLS||
    visual = weights["clip_model"].visual
    visual.output_tokens = True
    with torch.no_grad():  # independent: open_clip's own pooled output and patch tokens
        pooled, patches = visual(_norm(F.interpolate(images, (28, 28), mode="bicubic", antialias=True)))
        want = torch.cat([pooled[:, None], patches @ visual.proj], 1) / pooled.norm(dim=-1)[:, None, None]
    visual.output_tokens = False
    np.testing.assert_allclose(tokens.astype(np.float32), want.numpy(), atol=3e-3)
    cfg = DataConfig(url=meta.url)
    batch = next(iter(build_eval_loader(cfg, "test", 6, meta=read_meta(meta.url))))
    assert batch.targets.shape == (6, 17, 24)


def test_bigg_mindeye2_tokens_keep_its_input_range_quirk(weights, tmp_path):
    meta = _dataset(tmp_path / "d")
    spec = TargetSpec("bigg14-mindeye2", weights["clip"], field="bigg", arch="tiny-vit-test", model_config=weights["config"])
    meta = T.add_targets(meta.url, spec, progress=False)
    assert meta.raw["fields"]["bigg"]["shape"] == [16, 32] and meta.raw["splits"]["train"]["extra_fields"] == ["bigg"]
    assert (meta.n_tokens, meta.token_dim) == (4, 16)  # the training targets are untouched
    tokens, images = _field(meta, "bigg.npy")
    visual = weights["clip_model"].visual
    visual.output_tokens = True
    with torch.no_grad():
        x = F.interpolate(images, (28, 28), mode="bicubic", align_corners=True, antialias=True)
        _, want = visual(_norm((x + 1) / 2))  # [0, 1] images pushed through MindEye2's [-1, 1] -> [0, 1] map
        _, fixed = visual(_norm(x))
    visual.output_tokens = False
    np.testing.assert_allclose(tokens.astype(np.float32), want.numpy(), atol=3e-3)
    assert np.abs(tokens.astype(np.float32) - fixed.numpy()).max() > 0.05  # the quirk is not a no-op


def test_vae_latents_at_both_resolutions_from_a_folder_or_mindeye_pth(weights, tmp_path):
    meta = build_synthetic_dataset("tiny", str(tmp_path / "d"), 0, n_train=2, n_test=1, val_fraction=0.0,
                                   max_samples_per_shard=4, progress=False)
    meta = T.add_targets(meta.url, TargetSpec("sd-vae-mindeye2", str(weights["dir"] / "vae"), replace=True), progress=False)
    lat, images = _field(meta, "vae.npy")
    assert lat.shape == (3, 4, 28, 28) and meta.raw["fields"]["vae"]["shape"] == [4, 28, 28]
    with torch.no_grad():
        x = F.interpolate(images, (224, 224), mode="bilinear", antialias=True)
        want = weights["vae"].encode(2 * x - 1).latent_dist.mode() * 0.18215
    np.testing.assert_allclose(lat.astype(np.float32), want.numpy(), atol=2e-3, rtol=2e-3)
    spec = TargetSpec("sd-vae-mindeye1", str(weights["dir"] / "sd_image_var_autoenc.pth"), field="vae512",
                      model_config=str(weights["dir"] / "vae_config.json"), batch_size=8)
    meta = T.add_targets(meta.url, spec, progress=False)
    lat512, _ = _field(meta, "vae512.npy")
    assert lat512.shape == (3, 4, 64, 64)
    with torch.no_grad():
        want = weights["vae"].encode(2 * F.interpolate(images, (512, 512), mode="bilinear", antialias=True) - 1).latent_dist.mode()
    np.testing.assert_allclose(lat512.astype(np.float32), (want * 0.18215).numpy(), atol=2e-3, rtol=2e-3)


def test_teacher_feature_map_becomes_tokens(weights, tmp_path):
    meta = _dataset(tmp_path / "d")
    meta = T.add_targets(meta.url, TargetSpec("teacher", str(weights["dir"] / "teacher.pt2")), progress=False)
    feats, images = _field(meta, "teacher.npy")
    assert feats.shape == (26, 28 * 28, 6)  # (h*w, F)
    m, s = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.228, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = weights["teacher"]((F.interpolate(images, (224, 224), mode="bilinear", antialias=True) - m) / s)
    np.testing.assert_allclose(feats.astype(np.float32), want.flatten(2).transpose(1, 2).numpy(), atol=3e-3)
    from mindeye_dist.config import DataConfig
    from mindeye_dist.data import build_eval_loader

    batch = next(iter(build_eval_loader(DataConfig(url=meta.url), "test", 6, meta=read_meta(meta.url))))
    assert batch.targets.shape == (6, 4, 16)  # today's loader still reads a dataset that has a teacher field


def test_resume_after_interruption_and_rerun_is_a_no_op(weights, tmp_path, monkeypatch):
    meta = _dataset(tmp_path / "d")
    n_shards = sum(len(s.shards) for s in meta.splits.values())
    spec = TargetSpec("teacher", str(weights["dir"] / "teacher.pt2"), batch_size=4)
    placed = []
    real = S.write_shard

    def die_on_third(storage, name, samples, start, tmp_dir=None):
        if len(placed) == 2:
            raise KeyboardInterrupt("killed")
        placed.append(name)
        return real(storage, name, samples, start, tmp_dir)

    monkeypatch.setattr(S, "write_shard", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        T.add_targets(meta.url, spec, progress=False)
    assert "teacher" not in read_meta(meta.url).raw["fields"]  # meta.json unchanged until the end
    assert len([n for n in os.listdir(meta.url) if n.startswith(".targets-teacher-")]) == 2
    done = list(placed)
    monkeypatch.setattr(S, "write_shard", lambda *a, **k: (placed.append(a[1]), real(*a, **k))[1])
    meta = T.add_targets(meta.url, spec, progress=False)
    assert sorted(placed[2:]) == sorted(set(sh.name for s in meta.splits.values() for sh in s.shards) - set(done))
    assert len(placed) == n_shards and not [n for n in os.listdir(meta.url) if n.startswith(".targets-")]
    shards = {sh["name"]: sh for s in meta.raw["splits"].values() for sh in s["shards"]}
    for name, sh in shards.items():
        assert os.path.getsize(os.path.join(meta.url, name)) == sh["bytes"]
    T.add_targets(meta.url, spec, progress=False)  # complete: nothing recomputed
    assert len(placed) == n_shards
    other = TargetSpec("teacher", str(weights["dir"] / "teacher.pt2"), image_size=112)
    with pytest.raises(DataError, match="already has field 'teacher'"):
        T.add_targets(meta.url, other, progress=False)


def test_bad_target_requests(weights, tmp_path):
    meta = _dataset(tmp_path / "d")
    with pytest.raises(DataError, match="does not exist"):
        T.add_targets(meta.url, TargetSpec("teacher", str(tmp_path / "nope.pt2")), progress=False)
    with pytest.raises(DataError, match="not a torch.export program"):
        T.add_targets(meta.url, TargetSpec("teacher", weights["clip"], field="t2"), progress=False)
    with pytest.raises(DataError, match="ENCODER=WEIGHTS"):
        T.parse_target_specs("clip=/x")
    assert [s.encoder for s in T.parse_target_specs("clip-l14-mindeye1=/a,sd-vae-mindeye1=/b")] == ["clip-l14-mindeye1", "sd-vae-mindeye1"]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_split_the_shards(weights, tmp_path):
    """torchrun --nproc_per_node 2: rank r takes shards r, r+2, ...; the result equals one process."""
    from mindeye_dist.distributed import free_port

    one, two = _dataset(tmp_path / "one"), _dataset(tmp_path / "two")
    spec = TargetSpec("teacher", str(weights["dir"] / "teacher.pt2"))
    T.add_targets(one.url, spec, progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "launchers/prepare_data.py"), "targets", "--data", two.url, "--encoder", "teacher",
           "--weights", spec.weights]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = [sh for s in read_meta(one.url).splits.values() for sh in s.shards]
    counts = [sum(sh.count for sh in shards[k::2]) for k in range(2)]
    for k in range(2):
        assert f"rank {k}/2: 100%" in r.stderr and f"{counts[k]}/{counts[k]}" in r.stderr
    a = {sh["name"]: sh["sha256"] for s in read_meta(one.url).raw["splits"].values() for sh in s["shards"]}
    b = {sh["name"]: sh["sha256"] for s in read_meta(two.url).raw["splits"].values() for sh in s["shards"]}
    assert a == b


@pytest.mark.slow
def test_nsd_download_to_trained_and_evaluated_model(weights, tmp_path):
    """The README path on the miniature NSD tree, every step through its launcher."""
    pytest.importorskip("nibabel")
    from tests.nsd_tree import build_mini_nsd

    tree = build_mini_nsd(tmp_path / "nsd", sessions=(1, 2, 3))
    data, run = tmp_path / "data", tmp_path / "run"

    def launch(script, *args):
        r = subprocess.run([sys.executable, str(ROOT / "launchers" / script), *map(str, args)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    launch("prepare_data.py", "nsd", "--nsd-root", tree.root, "--subject", 1, "--sessions", "1-3", "--out", data,
           "--image-size", 32, "--quiet")
    launch("prepare_data.py", "targets", "--data", data, "--encoder", "clip-l14-mindeye1", "--weights", weights["clip"],
           "--arch", "tiny-vit-test", "--model-config", weights["config"], "--quiet")
    launch("prepare_data.py", "targets", "--data", data, "--encoder", "sd-vae-mindeye2", "--weights", weights["dir"] / "vae", "--quiet")
    meta = read_meta(str(data))
    assert (meta.n_tokens, meta.token_dim, meta.raw["fields"]["vae"]["shape"]) == (17, 24, [4, 28, 28])
    launch("train.py", "--config", ROOT / "launchers/configs/tiny.yaml", f"data.url={data}", f"run.dir={run}",
           "train.max_steps=4", "checkpoint.every_steps=4", "train.micro_batch_size=4")
    out = tmp_path / "test.json"
    launch("evaluate.py", "--run", run, "--split", "test", "--way", 8, "--loops", 2, "--out", out)
    metrics = json.loads(out.read_text())
    assert metrics["n"] == meta.splits["test"].count and 0.0 <= metrics["retrieval"]["image_top1"] <= 1.0


@pytest.mark.slow
@pytest.mark.distributed
def test_nsd_mindeye2_path_pretrain_two_subjects_then_one_session_fine_tune(weights, tmp_path):
    """MindEye2's path on the miniature NSD tree through the launchers: import three subjects,
    pretrain on two at once (2 ranks, per-subject batches), fine-tune the third on its first session
    with a fresh adapter, evaluate it on the shared test images."""
    pytest.importorskip("nibabel")
    from mindeye_dist.distributed import free_port
    from tests.nsd_tree import build_mini_nsd

    tree = build_mini_nsd(tmp_path / "nsd", subjects=(1, 2, 3), sessions=(1, 2, 3), releases=("nifti",))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)

    def launch(*cmd):
        r = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    def prepare(subject, out, *extra):
        launch(sys.executable, ROOT / "launchers/prepare_data.py", "nsd", "--nsd-root", tree.root, "--subject", subject,
               "--out", out, "--image-size", 32, "--quiet", *extra)
        launch(sys.executable, ROOT / "launchers/prepare_data.py", "targets", "--data", out, "--encoder",
               "clip-l14-mindeye1", "--weights", weights["clip"], "--arch",
               "tiny-vit-test", "--model-config", weights["config"], "--quiet")
        return str(out)

    s2, s3 = prepare(2, tmp_path / "s2", "--sessions", "1-3"), prepare(3, tmp_path / "s3", "--sessions", "1-3")
    s1 = prepare(1, tmp_path / "s1_1sess", "--sessions", "1", "--test-sessions", "1-3", "--zscore", "session-nonshared")
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2"]
    tiny = ROOT / "launchers/configs/tiny.yaml"
    pre, ft = tmp_path / "pretrain", tmp_path / "finetune"
    launch(*deepspeed, "--master_port", free_port(), ROOT / "launchers/train.py", "--ds_config", ROOT / "ds_configs/zero2.json",
           "--config", tiny, f"data.url={s2}", f"data.datasets=[{s3}]", f"run.dir={pre}", "train.max_steps=4",
           "train.micro_batch_size=4", "model.lowlevel=false")
    launch(*deepspeed, "--master_port", free_port(), ROOT / "launchers/finetune.py", "--ds_config",
           ROOT / "ds_configs/zero2.json", "--from", pre, "--subject", 1, "--data", s1, "--config", tiny, f"run.dir={ft}",
           "train.max_steps=4", "train.micro_batch_size=4", "model.lowlevel=false")
    out = tmp_path / "test.json"
    launch(sys.executable, ROOT / "launchers/evaluate.py", "--run", ft, "--split", "test", "--way", 8, "--loops", 2,
           "--out", out)
    metrics = json.loads(out.read_text())
    assert metrics["n"] == read_meta(s1).splits["test"].count and 0.0 <= metrics["retrieval"]["brain_top1"] <= 1.0
    from mindeye_dist.config import load_config

    assert load_config(pre / "config.yaml").model.subjects.keys() == {"subj02", "subj03"}
    assert load_config(ft / "config.yaml").model.subjects.keys() == {"subj01"}
