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


# ----------------------------------------------------------------------------------------------
# Memory per rank


from mindeye_dist.ds_config import load_ds_config  # noqa: E402
from mindeye_dist.estimate import (  # noqa: E402
    estimate_memory, largest_layer, leaf_output_elements, measure_activation_elements, model_states_per_rank,
    stage_variants,
)


def test_model_states_hand_computed():
    """Ψ = 1000, largest layer 100, 4 ranks, by hand from the ZeRO paper's bytes per parameter."""
    bf16 = {s: model_states_per_rank(1000, 100, 4, s, precision="bf16") for s in range(4)}
    #            params  grads  optimizer  gathered (2 + 2 bytes x 100 at stage 3)
    expected = {0: (2000, 2000, 12000, 0), 1: (2000, 2000, 3000, 0), 2: (2000, 500, 3000, 0),
                3: (500, 500, 3000, 400)}
    for stage, (p, g, o, gathered) in expected.items():
        got = bf16[stage]
        assert (got["params_bytes"], got["grads_bytes"], got["optimizer_bytes"], got["gathered_layer_bytes"]) \
            == (p, g, o, gathered), stage
        assert got["model_states_bytes"] == p + g + o + gathered and got["host_bytes"] == 0
    assert [bf16[s]["model_states_bytes"] for s in range(4)] == [16000, 7000, 5500, 4400]
    # fp32: 4 + 4 + 8 (no separate master copy); the gathered layer is 4 + 4 bytes per parameter
    fp32 = [model_states_per_rank(1000, 100, 4, s, precision="fp32")["model_states_bytes"] for s in range(4)]
    assert fp32 == [16000, 4000 + 4000 + 2000, 4000 + 1000 + 2000, 1000 + 1000 + 2000 + 800]
    # partitions round up: ceil(1001 / 4) = 251 elements
    assert model_states_per_rank(1001, 0, 4, 3)["model_states_bytes"] == 251 * 16
    # offload: the optimizer partition + an fp32 gradient partition go to the host
    off2 = model_states_per_rank(1000, 100, 4, 2, offload_optimizer=True)
    assert (off2["params_bytes"], off2["grads_bytes"], off2["optimizer_bytes"], off2["host_bytes"]) == (2000, 0, 0, 4000)
    off1 = model_states_per_rank(1000, 100, 4, 1, offload_optimizer=True)
    assert (off1["grads_bytes"], off1["model_states_bytes"], off1["host_bytes"]) == (2000, 4000, 4000)
    off3 = model_states_per_rank(1000, 100, 4, 3, offload_optimizer=True, offload_param=True)
    assert (off3["model_states_bytes"], off3["gathered_layer_bytes"], off3["host_bytes"]) == (400, 400, 500 + 3000 + 1000)
    with pytest.raises(ValueError):
        model_states_per_rank(1000, 100, 4, 0, offload_optimizer=True)
    with pytest.raises(ValueError):
        model_states_per_rank(1000, 100, 4, 2, offload_param=True)


def _meta_model(preset: str = "tiny", **dims):
    with torch.device("meta"):
        return build_model(ModelConfig(preset=preset), nominal=True, **dims)


def test_memory_tiny_preset_four_ranks_exact():
    model = _meta_model()
    mem = estimate_memory(model, world_size=4, micro_batch_size=5, precision="bf16")
    psi, layer = sum(p.numel() for p in model.parameters()), mem["largest_layer_params"]
    assert mem["total_params"] == psi and (mem["largest_layer"], layer) == largest_layer(model)
    assert layer == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()) > 0
    shard = -(-psi // 4)
    stages = mem["stages"]
    assert list(stages) == ["0", "1", "2", "3"]
    assert stages["0"]["model_states_bytes"] == 16 * psi
    assert stages["1"]["model_states_bytes"] == 4 * psi + 12 * shard
    assert stages["2"]["model_states_bytes"] == 2 * psi + 14 * shard
    assert stages["3"]["model_states_bytes"] == 16 * shard + 4 * layer
    totals = [stages[k]["total_bytes"] for k in "0123"]
    assert totals[3] <= totals[2] <= totals[1] <= totals[0]
    # activations: bf16 bytes x (batch-independent + per sample x micro-batch), measured at batch 5 too
    assert mem["activations_bytes"] == 2 * measure_activation_elements(model, 5) > 0
    assert mem["activations_bytes"] == mem["activations_fixed_bytes"] + 5 * mem["activations_bytes_per_sample"]
    for s in stages.values():
        assert s["total_bytes"] == s["model_states_bytes"] + mem["activations_bytes"]
    fp32 = estimate_memory(model, world_size=4, micro_batch_size=5, precision="fp32")
    assert fp32["activations_bytes"] == 2 * mem["activations_bytes"]


def test_zero3_over_zero0_at_two_ranks_is_half_plus_largest_layer():
    model = _meta_model("mindeye1")
    mem = estimate_memory(model, world_size=2, micro_batch_size=1)
    psi, layer = mem["total_params"], mem["largest_layer_params"]
    ratio = mem["stages"]["3"]["model_states_bytes"] / mem["stages"]["0"]["model_states_bytes"]
    assert ratio == pytest.approx(0.5 + 4 * layer / (16 * psi), abs=1e-9)
    assert 0.5 < ratio < 1.5  # mindeye1's to_tokens Linear is most of the model


def test_deepspeed_estimates_present_and_match_its_formulas():
    model = _meta_model()
    mem = estimate_memory(model, world_size=8, gpus_per_node=4)
    psi, layer = mem["total_params"], mem["largest_layer_params"]
    assert (mem["num_nodes"], mem["gpus_per_node"]) == (2, 4)
    stages = mem["stages"]
    assert stages["0"]["deepspeed_estimate_bytes"] is None and stages["1"]["deepspeed_estimate"] is None
    for key in ("2", "3"):
        ds = stages[key]["deepspeed_estimate"]
        assert stages[key]["deepspeed_estimate_bytes"] == ds["device_bytes"] > 0 and ds["host_bytes_per_node"] > 0
        assert ds["additional_buffer_factor"] == 1.5
    assert stages["2"]["deepspeed_estimate_bytes"] == 2 * psi + int(18 * psi / 8)
    assert stages["3"]["deepspeed_estimate_bytes"] == 4 * layer + int(18 * psi / 8)
    assert stages["3"]["deepspeed_estimate"]["host_bytes_per_node"] == int(psi * 4 * 4 * 1.5)  # zero_init off
    offload = estimate_memory(model, world_size=8, ds_config=load_ds_config(ROOT / "ds_configs" / "zero3_offload.json"))
    assert list(offload["stages"]) == ["3", "3+offload_optimizer", "3+offload_optimizer+offload_param"]
    both = offload["stages"]["3+offload_optimizer+offload_param"]
    assert both["deepspeed_estimate_bytes"] == 4 * layer == both["model_states_bytes"]
    assert both["host_bytes"] == 18 * -(-psi // 8)


def test_stage_variants_follow_the_ds_config():
    keys = {name: [v for v in stage_variants(load_ds_config(ROOT / "ds_configs" / f"{name}.json"))]
            for name in ("zero0", "zero1", "zero2", "zero2_offload", "zero3")}
    assert keys == {"zero0": [(0, False, False)], "zero1": [(1, False, False)], "zero2": [(2, False, False)],
                    "zero2_offload": [(2, False, False), (2, True, False)], "zero3": [(3, False, False)]}
    assert stage_variants(None) == [(s, False, False) for s in range(4)]
    ds = {"train_micro_batch_size_per_gpu": 7, "bf16": {"enabled": False}, "fp16": {"enabled": False},
          "zero_optimization": {"stage": 1}}
    mem = estimate_memory(_meta_model(), ds_config=ds)  # micro-batch and precision from the config
    assert (mem["world_size"], mem["micro_batch_size"], mem["precision"], mem["ds_config_stage"]) == (1, 7, "fp32", 1)
    with pytest.raises(ValueError, match="gpus-per-node"):
        estimate_memory(_meta_model(), world_size=12)


def test_activation_estimate_exact_for_a_toy_module():
    class Pair(torch.nn.Module):  # a leaf with a tuple output: a float and an integer tensor
        def forward(self, x):
            return x * 2, x.argmax(-1)

    toy = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.Linear(5, 2), Pair()))
    for device in ("cpu", "meta"):
        toy = toy.to(device)
        x = torch.randn(7, 3, device=device)
        # Linear 5 + ReLU 5 + Linear 2 + Pair's float output 2 (its argmax is not counted) = 14 per sample;
        # the inner Sequential is not a leaf
        assert leaf_output_elements(toy, lambda: toy[2](toy[1](toy[0](x)))) == 7 * 14
    shared = torch.nn.Linear(4, 4)  # a leaf called twice is counted twice
    assert leaf_output_elements(shared, lambda: shared(shared(torch.randn(3, 4)))) == 2 * 3 * 4


def test_cli_memory_json_for_mindeye1_is_fast():
    import time

    start = time.perf_counter()
    proc = _cli("--preset", "mindeye1", "--json", "--no-flops", "--world-size", "8", "--micro-batch-size", "32",
                "--precision", "bf16")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    mem = json.loads(proc.stdout)["memory"]  # stdout holds only the JSON (DeepSpeed's log goes to stderr)
    assert (mem["world_size"], mem["micro_batch_size"], mem["precision"]) == (8, 32, "bf16")
    assert mem["largest_layer"] == "backbone.to_tokens" and mem["largest_layer_params"] == (4096 + 1) * 257 * 768  # weight + bias
    stages = mem["stages"]
    assert stages["2"]["total_bytes"] < stages["1"]["total_bytes"] < stages["0"]["total_bytes"]
    # ...but not ZeRO-3: gathering the 0.8B-parameter to_tokens Linear (4 bytes each) outweighs
    # partitioning the bf16 params across 8 ranks
    psi, layer = mem["total_params"], mem["largest_layer_params"]
    assert stages["3"]["model_states_bytes"] == 16 * -(-psi // 8) + 4 * layer > stages["2"]["model_states_bytes"]
    assert stages["2"]["deepspeed_estimate_bytes"] > 0 and stages["3"]["deepspeed_estimate_bytes"] > 0
    assert elapsed < 60, elapsed  # meta device: seconds (import-dominated), even on a loaded 2-core box


def test_cli_memory_table_and_errors_in_process(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimate_cli", ROOT / "launchers" / "estimate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--preset", "tiny", "--no-flops", "--ds-config", str(ROOT / "ds_configs" / "zero2_offload.json"),
                     "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank, GiB: world size 2" in out and "2+offload_optimizer" in out
    assert cli.main(["--preset", "tiny", "--no-flops", "--world-size", "12"]) == 2
    assert "--gpus-per-node" in capsys.readouterr().err
    assert cli.main(["--preset", "tiny", "--no-flops", "--ds-config", "nope.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--preset", "tiny", "--precision", "fp32"])  # memory flags need --world-size
