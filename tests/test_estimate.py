"""Estimates: FlopCounterMode on meta tensors agrees with real tensors and with analytic counts;
the estimate dict and the CLI (subprocess) print the exact MindEye1 numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mindeye_dist.estimate import estimate, measure_step_flops
from mindeye_dist.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_voxels=40, n_tokens=3, token_dim=16, lowlevel_shape=[4, 8, 8])


def analytic_flops(cfg: ModelConfig) -> dict[str, int]:
    """Training FLOPs per sample from the layer shapes (2 per multiply-add; backward = 2x forward,
    minus input gradients nobody needs: the voxels' and the sinusoidal time features')."""
    v, h, n, out = cfg.input_voxels(), cfg.hidden_dim, cfg.n_blocks, cfg.out_dim()
    per_block = 2 if cfg.arch == "mindeye2" else 1
    backbone_fwd = 2 * (v * h + n * per_block * h * h + h * out)
    t, d, p = cfg.n_tokens, cfg.token_dim, cfg.projector_hidden_dim
    flops = {"backbone": 3 * backbone_fwd - 2 * v * h, "projector": 3 * 2 * t * (d * p + p * p + p * d)}
    if cfg.prior:
        seq, heads, dh, inner = 2 * t + 1, cfg.prior_heads, cfg.prior_dim_head, cfg.prior_ff_mult * d
        layer = 2 * seq * (d * heads * dh + d * 2 * dh + heads * dh * d + d * 2 * inner + inner * d)
        layer += 2 * 2 * heads * seq * (seq + 1) * dh  # q.k and attn.v against N+1 keys (null key)
        transformer_fwd = cfg.prior_depth * layer + 2 * seq * d * d  # + project_out
        time_mlp = 16 * d * d + 16 * d * d + 12 * d * d  # fwd, weight grads, input grads but the first
        flops["prior"] = 3 * transformer_fwd + time_mlp
    return flops


@pytest.mark.parametrize("arch", ["mindeye1", "mindeye2"])
def test_meta_flops_equal_real_tensor_flops_and_analytic(arch):
    cfg = ModelConfig(preset="tiny", arch=arch, hidden_dim=24, n_blocks=2, prior_depth=2)
    with torch.device("meta"):
        meta = build_model(cfg, **TINY)
    real = build_model(cfg, **TINY)
    on_meta = measure_step_flops(meta, batch_size=3, device="meta")
    # On CPU, SDPA without a mask (diffusers' decoder attention) runs a fused flash kernel that
    # FlopCounterMode does not count; on meta it decomposes into counted matmuls. Force the math
    # kernel for the comparison.
    with sdpa_kernel(SDPBackend.MATH):
        on_cpu = measure_step_flops(real, batch_size=3, device="cpu")
    assert on_meta == on_cpu
    assert on_meta["total"] > 0 and on_meta["other"] == 0
    assert on_meta["total"] == sum(on_meta[k] for k in ("backbone", "projector", "prior", "lowlevel", "other"))
    expected = analytic_flops(meta.config)
    for name, value in expected.items():
        assert on_meta[name] == value, name


def test_mindeye1_backbone_flops_are_about_six_n():
    result = estimate(ModelConfig(preset="mindeye1"))
    flops, params = result["flops"], result["params"]
    cfg = ModelConfig(**{k: v for k, v in result["config"].items()})
    assert flops["backbone"] == analytic_flops(cfg)["backbone"]
    assert flops["prior"] == analytic_flops(cfg)["prior"]
    assert abs(flops["backbone"] / (6 * params["backbone"]) - 1) < 0.03  # 6N less the voxels' input grad
    assert 1.5e11 < flops["prior"] < 2e11  # ~T(6N + attention), T = 515 (perf notes section 0)


def test_estimate_dict_layout():
    result = estimate(ModelConfig(preset="tiny"), **TINY)
    assert set(result["params"]) >= {"backbone", "projector", "prior", "lowlevel", "total"}
    assert result["params"]["total"] == sum(result["params"][k] for k in ("backbone", "projector", "prior", "lowlevel"))
    assert "memory" not in result
    assert result["config"]["n_voxels"] == 40 and result["config"]["lowlevel"] is True
    counts_only = estimate(ModelConfig(preset="scale-5b"), flops=False)
    assert counts_only["params"]["total"] >= 5e9 and "flops" not in counts_only


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers" / "estimate.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_exact_mindeye1_numbers():
    proc = _cli("--preset", "mindeye1", "--json")
    assert proc.returncode == 0, proc.stderr
    params = json.loads(proc.stdout)["params"]
    assert params["backbone"] == 940_225_280
    assert params["backbone"] + params["projector"] == 947_579_904
    assert abs(params["prior"] - 56_055_184) / 56_055_184 < 0.02
    table = _cli("--preset", "mindeye1", "--no-flops")
    assert table.returncode == 0 and "940,225,280" in table.stdout and "7,354,624" in table.stdout


def test_cli_overrides_and_errors():
    proc = _cli("--preset", "demo", "--json", "--no-flops", "model.hidden_dim=1024", "n_blocks=4")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)["config"]
    assert config["hidden_dim"] == 1024 and config["n_blocks"] == 4
    bad = _cli("--preset", "demo", "--no-flops", "hidden_dim=-3")
    assert bad.returncode == 2 and "model.hidden_dim" in bad.stderr
