"""The low-level objective, complete: SoftCont computed from teacher tokens stored in the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindeye_dist.config import load_config
from mindeye_dist.data import build_synthetic_dataset, read_meta

REPO = Path(__file__).resolve().parents[1]


def _teacher(path: Path, channels: int, grid: int) -> str:
    """A tiny teacher exported as users export VICRegL ConvNeXt: 224 px -> (channels, grid, grid)."""
    k = 224 // grid
    net = torch.nn.Sequential(torch.nn.Conv2d(3, channels, k, k), torch.nn.GELU()).eval()
    ep = torch.export.export(net, (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mindeye_dist.data.targets import TargetSpec, add_targets

    root = tmp_path_factory.mktemp("softcont")
    url = str(root / "tiny")
    build_synthetic_dataset("tiny", url, 0, progress=False)
    # tiny's low-level head: a 4x4 map (latents 4x8x8, one upsampling), 16 feature channels
    add_targets(url, TargetSpec("teacher", _teacher(root / "t.pt2", 16, 4)), progress=False)
    return url


def _train(run, url, *overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, str(REPO / "launchers/train.py"), "--config", str(REPO / "launchers/configs/tiny.yaml"),
           f"data.url={url}", f"run.dir={run}", "train.max_steps=4", "train.log_every_steps=1", "train.eval_every_steps=0",
           *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_softcont_is_computed_from_stored_teacher_tokens(tmp_path, data):
    assert read_meta(data).field_shape("teacher") == (16, 16)
    proc = _train(tmp_path / "run", data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cont = [r["loss/lowlevel_cont"] for r in rows]
    assert len(cont) == 4 and all(c > 0 and c == c for c in cont)
    # lowlevel = l1 / l1_scale + cont_weight * cont, as logged
    r = rows[-1]
    assert r["loss/lowlevel"] == pytest.approx(r["loss/lowlevel_l1"] + 0.1 * r["loss/lowlevel_cont"], rel=1e-4)


def test_softcont_trains_the_feature_projector():
    from mindeye_dist.losses import soft_cont_loss
    from mindeye_dist.models import build_model

    cfg = load_config(None, ["model.preset=tiny"]).model
    model = build_model(cfg, n_voxels=96, n_tokens=4, token_dim=16, lowlevel_shape=[4, 8, 8])
    out = model(torch.randn(6, 96))
    teacher = torch.randn(6, 16, 16)
    soft_cont_loss(out.lowlevel_features, teacher, teacher, 0.2).backward()
    grads = [p.grad for p in model.lowlevel.features.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_teacher_tokens_that_do_not_fit_the_head_are_refused(tmp_path, data):
    proc = _train(tmp_path / "run", data, "model.lowlevel_feature_dim=8")
    assert proc.returncode != 0
    assert "teacher tokens are (16, 16)" in proc.stderr and "(16, 8)" in proc.stderr


def test_mindeye1_lowlevel_recipe_loads():
    cfg = load_config(REPO / "launchers/configs/mindeye1_lowlevel.yaml")
    assert cfg.loss.mixup_pct == 0 and cfg.loss.lowlevel_cont_temp == 0.075 and cfg.loss.lowlevel_l1_scale == 0.18215
