"""The demo's YAML and preset stay loadable and within the demo's contract (no data, no training)."""

import importlib.util
from pathlib import Path

from mindeye_dist.config import load_config
from mindeye_dist.models import build_model

REPO = Path(__file__).resolve().parents[1]


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_launcher", REPO / "launchers" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_yaml_loads_and_keeps_the_contract():
    cfg = load_config(REPO / "launchers" / "configs" / "demo.yaml", ["data.url=/tmp/x", "run.dir=/tmp/r"])
    assert cfg.model.preset == "demo"
    assert cfg.data.val_split == "val" and cfg.data.num_workers >= 1
    assert 0 < cfg.train.eval_every_steps <= cfg.train.max_steps
    assert cfg.train.log_every_steps <= 25
    assert cfg.checkpoint.every_steps > 0


def test_demo_preset_builds_the_full_objective_at_synthetic_dims():
    cfg = load_config(REPO / "launchers" / "configs" / "demo.yaml", [])
    model = build_model(cfg.model, n_voxels=2000, n_tokens=16, token_dim=64, lowlevel_shape=(4, 16, 16))
    assert model.prior is not None and getattr(model, "lowlevel", None) is not None


def test_demo_table_has_every_row():
    res = {"chance": 1 / 300, "retrieval": {"image_top1": 0.5, "brain_top1": 0.6},
           "baselines": {"ridge": {"image_top1": 0.4, "brain_top1": 0.5}},
           "ceiling": {"image_top1": 0.8, "brain_top1": 0.9}}
    text, rows = _demo_module().table(res)
    for name in ("chance", "ridge baseline", "mindeye_dist (ours)", "ceiling (best possible)", "ours / ceiling"):
        assert name in text and name in rows
    assert abs(rows["ours / ceiling"]["image_top1"] - 0.625) < 1e-9
