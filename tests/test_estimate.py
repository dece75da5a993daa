"""Estimates: FlopCounterMode on meta tensors agrees with real tensors and with analytic counts;
the estimate dict and the CLI (its main, in process) print the exact MindEye1 numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mindeye_dist.bench.attention import sdpa_everywhere
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
    # kernel for the comparison, and SDPA for the prior (its CPU attention recomputes the scores
    # in the backward: one more product than the model FLOPs counted here).
    with sdpa_kernel(SDPBackend.MATH), sdpa_everywhere():
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
    assert 1.5e11 < flops["prior"] < 2e11  # ~T(6N + attention), T = 515 (MindEye1's prior attends over 257 + 1 + 257 tokens)


def test_estimate_dict_layout():
    result = estimate(ModelConfig(preset="tiny"), **TINY)
    assert set(result["params"]) >= {"backbone", "projector", "prior", "lowlevel", "total"}
    assert result["params"]["total"] == sum(result["params"][k] for k in ("backbone", "projector", "prior", "lowlevel"))
    assert "memory" not in result
    assert result["config"]["n_voxels"] == 40 and result["config"]["lowlevel"] is True
    counts_only = estimate(ModelConfig(preset="scale-5b"), flops=False)
    assert counts_only["params"]["total"] >= 5e9 and "flops" not in counts_only


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``launchers/estimate.py ARGS`` in this process (its ``main``), stdout and stderr captured apart."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("launcher_estimate", ROOT / "launchers" / "estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = module.main(list(args))
        except SystemExit as exit_:  # argparse errors
            rc = exit_.code
    return subprocess.CompletedProcess(["estimate.py", *args], rc, out.getvalue(), err.getvalue())


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
    ZERO_DEFAULTS, _stage12_partitions, estimate_memory, largest_layer, leaf_output_elements,
    measure_activation_elements, model_states_per_rank, optimizer_group_numels, stage_variants, zero_settings,
)


def _zero(stage: int, **zo) -> dict:
    return zero_settings({"zero_optimization": {"stage": stage, **zo}}, stage)


def test_model_states_hand_computed():
    """Ψ = 1000, largest layer 100, 4 ranks, one parameter group (ideal partitions of 250),
    100-element buckets; the terms DeepSpeed 0.19 allocates, by hand."""
    def run(stage, precision, **kw):
        zero = _zero(stage, reduce_bucket_size=100, stage3_prefetch_bucket_size=50, stage3_max_live_parameters=300)
        return model_states_per_rank(1000, 100, 4, stage, precision=precision, zero=zero, **kw)

    #                 params  grads  fp32 master  moments  buffers
    expected = {
        ("bf16", 0): (2000, 2000, 4000, 8000, 0),  # FP16_UnfusedOptimizer's fp32 copy of every parameter
        ("bf16", 1): (2000, 500, 1000, 2000, 0),
        ("bf16", 2): (2000, 500, 1000, 2000, 0),
        ("bf16", 3): (500, 500, 1000, 2000, 200),  # + the persistent 100-element ipg bucket
        ("fp32", 0): (4000, 4000, 0, 8000, 0),  # the optimizer updates the fp32 parameters themselves
        ("fp32", 1): (4000, 1000, 1000, 2000, 0),  # ...but ZeRO clones an fp32 master even in fp32
        ("fp32", 2): (4000, 1000, 1000, 2000, 0),
        ("fp32", 3): (1000, 1000, 1000, 2000, 400),
    }
    for (precision, stage), (p, g, m, mo, b) in expected.items():
        got = run(stage, precision)
        assert (got["params_bytes"], got["grads_bytes"], got["master_bytes"], got["optimizer_bytes"] - got["master_bytes"],
                got["buffers_bytes"]) == (p, g, m, mo, b), (precision, stage)
        assert got["model_states_bytes"] == p + g + m + mo + b and got["host_bytes"] == 0
    assert [run(s, "bf16")["model_states_bytes"] for s in range(4)] == [16000, 5500, 5500, 4200]
    # transients: ZeRO-0's all-reduce bucket (none in a world of one) and bf16's fp32 gradient copies
    assert run(0, "bf16")["transient"] == {"allreduce_bucket": 2000, "fp32_grads": 4000}
    assert run(0, "fp32")["transient"] == {"allreduce_bucket": 4000}
    assert model_states_per_rank(1000, 100, 1, 0, precision="fp32")["transient"] == {}
    # ZeRO-1: every unreduced gradient + the bucket - the kept gradients (allocated after);
    # the step flattens the kept gradients (250 x 2) and casts them to fp32 (250 x 4)
    assert run(1, "bf16")["transient"] == {"backward": 2000 + 200 - 500, "step": 500 + 1000}
    # ZeRO-2 (overlap_comm off unless set): one bucket + the largest gradient; with it, two buckets
    assert run(2, "bf16")["transient"] == {"backward": 200 + 200, "step": 1500}
    two = model_states_per_rank(1000, 100, 4, 2, precision="bf16", zero=_zero(2, reduce_bucket_size=100, overlap_comm=True))
    assert two["transient"]["backward"] == 400 + 200
    # ZeRO-3: max(L, max_live) gathered; backward + prefetch (50) + the layer's gradient (100)
    t3 = run(3, "bf16")
    assert t3["transient"] == {"gathered_params": 600, "backward": (300 + 50 + 100) * 2, "step": 1500}
    assert t3["gathered_layer_bytes"] == 600 and t3["transient_bytes"] == 1500
    assert run(3, "fp32")["transient"]["step"] == 1000  # the fp32 "cast" is a no-op
    # partitions round up: ceil(1001 / 4) = 251 elements
    assert model_states_per_rank(1001, 0, 4, 3, zero=_zero(3, contiguous_gradients=False))["model_states_bytes"] == 251 * 16
    # offload: the fp32 master, the moments and an fp32 gradient partition go to the host
    # (ZeRO-1/2 also keep a bf16 copy of the partition (250 x 2) and the largest gradient (100 x 2) on the
    # host, and the largest gradient once more on the device: tests/test_estimate_deepspeed.py measures it)
    off2 = model_states_per_rank(1000, 100, 4, 2, offload_optimizer=True)
    assert (off2["params_bytes"], off2["grads_bytes"], off2["optimizer_bytes"], off2["host_bytes"]) == (2000, 0, 0, 4700)
    assert off2["buffers_bytes"] == 200
    off1 = model_states_per_rank(1000, 100, 4, 1, offload_optimizer=True)
    assert (off1["grads_bytes"], off1["model_states_bytes"], off1["host_bytes"]) == (0, 2200, 4700)
    off3 = model_states_per_rank(1000, 100, 4, 3, offload_optimizer=True, offload_param=True,
                                 zero=_zero(3, reduce_bucket_size=100))
    assert (off3["params_bytes"], off3["grads_bytes"], off3["optimizer_bytes"], off3["buffers_bytes"]) == (0, 0, 0, 200)
    assert off3["host_bytes"] == 3000 + 1000 + 500 + 500  # master + moments, fp32 grads, bf16 grads, bf16 params
    with pytest.raises(ValueError):
        model_states_per_rank(1000, 100, 4, 0, offload_optimizer=True)
    with pytest.raises(ValueError):
        model_states_per_rank(1000, 100, 4, 2, offload_param=True)


def test_stage12_ranks_keep_whole_gradients_of_straddling_parameters():
    # group 1: 100 elements, padded to a multiple of 2N = 4 -> 50 per rank; 30 | 50 | 20: the 50
    # straddles the boundary and both ranks keep all of it. Group 2: 4 elements -> 2 per rank.
    sizes, kept = _stage12_partitions([[30, 50, 20], [4]], 2)
    assert sizes == [50, 2] and kept == max(30 + 50 + 4, 50 + 20 + 4)
    # three ranks: padded to 102, 34 each: [30, 50] | [50] | [50, 20]
    assert _stage12_partitions([[30, 50, 20]], 3) == ([34], 80)
    got = model_states_per_rank(104, 50, 2, 2, precision="fp32", param_groups=[[30, 50, 20], [4]])
    assert (got["params_bytes"], got["grads_bytes"], got["master_bytes"], got["partition_numel"]) == (416, 84 * 4, 52 * 4, 52)


def test_stage3_persistent_parameters_and_bucket_from_config():
    zero = _zero(3, stage3_param_persistence_threshold=10, reduce_bucket_size=10**9)
    got = model_states_per_rank(1020, 1000, 4, 3, precision="bf16", param_groups=[[1000, 10, 10]], zero=zero)
    assert got["partition_numel"] == 250 + 3 + 3
    assert got["params_bytes"] == 256 * 2 + 20 * 2  # partitions + the two small parameters kept whole
    assert got["buffers_bytes"] == (1020 - 20) * 2  # the bucket fills with at most the partitioned gradients
    assert got["grads_bytes"] == 256 * 2 and got["optimizer_bytes"] == 256 * 12


def test_zero3_over_zero0_floors_at_two_ranks():
    """fp32: DeepSpeed's fp32 master clone makes ZeRO-3 20 bytes per partitioned element against
    ZeRO-0's 16 per element: 0.625 at 2 ranks; bf16: 16 against 16, 0.5 (buckets off)."""
    zero = _zero(3, contiguous_gradients=False)
    for precision, floor in (("fp32", 0.625), ("bf16", 0.5)):
        z0 = model_states_per_rank(2000, 100, 2, 0, precision=precision)["model_states_bytes"]
        z3 = model_states_per_rank(2000, 100, 2, 3, precision=precision, zero=zero)["model_states_bytes"]
        assert z3 / z0 == floor
    # the shipped zero3.json adds its 2e7-element bucket: B / (4 Ψ) in fp32 at 2 ranks
    shipped = zero_settings(load_ds_config(ROOT / "ds_configs" / "zero3.json"), 3)
    psi = 200_000_000
    z3 = model_states_per_rank(psi, 10**7, 2, 3, precision="fp32", zero=shipped)["model_states_bytes"]
    assert z3 / (16 * psi) == pytest.approx(0.625 + 2e7 / (4 * psi))


def test_zero_defaults_match_deepspeed_and_shipped_configs():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds_defaults = DeepSpeedZeroConfig()
    for key, value in ZERO_DEFAULTS.items():
        if key != "overlap_comm":
            assert getattr(ds_defaults, key) == value, key
    assert DeepSpeedZeroConfig(stage=3).overlap_comm is True and DeepSpeedZeroConfig(stage=2).overlap_comm is False
    assert zero_settings(None, 2)["overlap_comm"] is False and zero_settings(None, 3)["overlap_comm"] is True
    shipped = {s: zero_settings(load_ds_config(ROOT / "ds_configs" / f"zero{s}.json"), s) for s in (1, 2, 3)}
    assert shipped[1]["reduce_bucket_size"] == shipped[2]["reduce_bucket_size"] == 50_000_000
    assert (shipped[1]["overlap_comm"], shipped[2]["overlap_comm"]) == (False, True)
    z3 = shipped[3]
    assert (z3["reduce_bucket_size"], z3["prefetch_bucket_size"], z3["max_live_parameters"], z3["max_reuse_distance"]) \
        == (20_000_000, 20_000_000, 100_000_000, 100_000_000)


def _meta_model(preset: str = "tiny", **dims):
    with torch.device("meta"):
        return build_model(ModelConfig(preset=preset), nominal=True, **dims)


def test_memory_tiny_preset_four_ranks_exact():
    model = _meta_model()
    zero = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000, "reduce_bucket_size": 5000,
                                  "stage3_max_live_parameters": 10**6}}
    mem = estimate_memory(model, world_size=4, micro_batch_size=5, precision="bf16")
    psi, layer = sum(p.numel() for p in model.parameters()), mem["largest_layer_params"]
    assert mem["total_params"] == psi and (mem["largest_layer"], layer) == largest_layer(model)
    assert layer == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()) > 0
    groups = optimizer_group_numels(model)
    assert sum(map(sum, groups)) == psi and len(groups) == 2  # decayed weights, then biases and norms
    stages = mem["stages"]
    assert list(stages) == ["0", "1", "2", "3"]
    assert stages["0"]["model_states_bytes"] == 16 * psi
    sizes, kept = _stage12_partitions(groups, 4)
    for s in ("1", "2"):
        assert stages[s]["model_states_bytes"] == 2 * psi + 12 * sum(sizes) + 2 * kept
    z3 = estimate_memory(model, world_size=4, micro_batch_size=5, precision="bf16", ds_config=zero)["stages"]["3"]
    parts = sum(-(-n // 4) for g in groups for n in g)
    small = sum(n for g in groups for n in g if n <= 1000)
    assert z3["model_states_bytes"] == 16 * parts + 2 * small + 2 * min(5000, psi - small)
    assert z3["zero"]["max_live_parameters"] == 10**6 and z3["gathered_layer_bytes"] == 2 * (psi - small)
    for s in stages.values():
        assert s["peak_bytes"] == s["model_states_bytes"] + s["transient_bytes"] + s["activations_bytes"]
    # activations: bf16 bytes x (batch-independent + per sample x micro-batch), measured at batch 5 too
    assert mem["activations_bytes"] == 2 * measure_activation_elements(model, 5) > 0
    assert mem["activations_bytes"] == mem["activations_fixed_bytes"] + 5 * mem["activations_bytes_per_sample"]
    for s in stages.values():
        assert s["total_bytes"] == s["model_states_bytes"] + mem["activations_bytes"]
    fp32 = estimate_memory(model, world_size=4, micro_batch_size=5, precision="fp32")
    assert fp32["activations_bytes"] == 2 * mem["activations_bytes"]


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
    # zero_init: the trainer builds ZeRO-3 models under deepspeed.zero.Init
    assert stages["3"]["deepspeed_estimate"]["zero_init"] is True
    assert stages["3"]["deepspeed_estimate"]["host_bytes_per_node"] == int(layer * 4 * 4 * 1.5)
    offload = estimate_memory(model, world_size=8, ds_config=load_ds_config(ROOT / "ds_configs" / "zero3_offload.json"))
    assert list(offload["stages"]) == ["3", "3+offload_optimizer", "3+offload_optimizer+offload_param"]
    both = offload["stages"]["3+offload_optimizer+offload_param"]
    assert both["deepspeed_estimate_bytes"] == 4 * layer
    assert both["grads_bytes"] == both["optimizer_bytes"] == 0 and both["host_bytes"] > 16 * -(-psi // 8)


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


def test_cli_memory_json_for_mindeye1():
    # output_tiles=1: the reference's single 0.8B-parameter output Linear (test_tiled_output_linear_*
    # covers the preset's 8 tiles)
    proc = _cli("--preset", "mindeye1", "--json", "--no-flops", "--world-size", "8", "--micro-batch-size", "32",
                "--precision", "bf16", "output_tiles=1")
    assert proc.returncode == 0, proc.stderr
    mem = json.loads(proc.stdout)["memory"]  # stdout holds only the JSON (DeepSpeed's log goes to stderr)
    assert (mem["world_size"], mem["micro_batch_size"], mem["precision"]) == (8, 32, "bf16")
    assert mem["largest_layer"] == "backbone.to_tokens" and mem["largest_layer_params"] == (4096 + 1) * 257 * 768  # weight + bias
    stages = mem["stages"]
    # ZeRO-1 and ZeRO-2 keep the same states after the reduction (they differ during backward);
    # a rank keeps the whole gradient of every parameter overlapping its partition, and the
    # 0.8B-parameter to_tokens spans most ranks' partitions, so ranks keep its entire gradient
    assert stages["2"]["total_bytes"] == stages["1"]["total_bytes"] < stages["0"]["total_bytes"]
    assert stages["2"]["grads_bytes"] >= 2 * mem["largest_layer_params"] > 2 * stages["2"]["partition_numel"]
    # ...and ZeRO-3 less in its states, but its step peak holds the gathered 0.8B-parameter
    # to_tokens Linear and its gradient (2 bytes each in bf16) on top
    psi, layer = mem["total_params"], mem["largest_layer_params"]
    assert stages["3"]["model_states_bytes"] < stages["2"]["model_states_bytes"]
    assert stages["3"]["transient"]["backward"] >= 2 * 2 * layer
    assert stages["3"]["peak_bytes"] > stages["2"]["model_states_bytes"]
    assert stages["2"]["deepspeed_estimate_bytes"] > 0 and stages["3"]["deepspeed_estimate_bytes"] > 0


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


# ---- output Linear in tiles, activation checkpointing (issue 14) ------------------------------


def test_tiled_output_linear_is_no_longer_the_largest_layer():
    """ZeRO-3 gathers a module's parameters at once: in the mindeye1 preset's 8 tiles the largest
    layer is a tile (1/8 of 4096 x 197,376), so the gathered-parameter transient shrinks with it."""
    from mindeye_dist.ds_config import load_ds_config

    ds = load_ds_config(ROOT / "ds_configs" / "zero3.json")  # stage3_max_live_parameters 1e8
    tiled = estimate(ModelConfig(preset="mindeye1"), flops=False, world_size=2, precision="bf16", micro_batch_size=2,
                     ds_config=ds)
    whole = estimate(ModelConfig(preset="mindeye1", output_tiles=1), flops=False, world_size=2, precision="bf16",
                     micro_batch_size=2, ds_config=ds)
    mt, mw = tiled["memory"], whole["memory"]
    assert mw["largest_layer"] == "backbone.to_tokens" and mw["largest_layer_params"] == (4096 + 1) * 257 * 768
    assert mt["largest_layer"] == "backbone.to_tokens.tiles.0" and mt["largest_layer_params"] == 4096 * 257 * 768 // 8
    assert mt["total_params"] == mw["total_params"]
    t3, w3 = mt["stages"]["3"], mw["stages"]["3"]
    assert t3["model_states_bytes"] == w3["model_states_bytes"]
    # the backward holds the gathered layer (beyond max_live 1e8) and its unreduced gradient: 2 x 2 bytes x L
    delta = mw["largest_layer_params"] - mt["largest_layer_params"]
    assert w3["transient"]["backward"] - t3["transient"]["backward"] == 2 * 2 * delta
    assert w3["gathered_layer_bytes"] - t3["gathered_layer_bytes"] == 2 * delta


def _backbone_only(checkpointing: bool):
    cfg = ModelConfig(preset="tiny", hidden_dim=32, n_blocks=3, prior=False, lowlevel=False,
                      activation_checkpointing=checkpointing)
    with torch.device("meta"):
        return build_model(cfg, **TINY)


def test_activation_checkpointing_terms_exact_for_the_backbone():
    """Each MindEye2-layout block keeps 5 leaf outputs of width h (LN, Linear, GELU, Dropout,
    Linear) without checkpointing; with it, only its input h (the first block's input is the stem's
    output, kept anyway), plus one block's 5h while that block is recomputed: 3 blocks save
    15h - (2h + 5h) = 8h elements per sample. The recompute runs the blocks' forward again up to the
    last tensor the backward needs (non-reentrant checkpointing stops there): the first Linear of each
    block, 3 x 2h^2 FLOPs per sample, reported apart from the model FLOPs."""
    from mindeye_dist.estimate import activation_elements

    h = 32
    off_per_sample, off_fixed = activation_elements(_backbone_only(False))
    on_per_sample, on_fixed = activation_elements(_backbone_only(True))
    assert off_per_sample - on_per_sample == 8 * h and on_fixed == off_fixed
    off, on = measure_step_flops(_backbone_only(False)), measure_step_flops(_backbone_only(True))
    assert on["total"] == off["total"] and off["recompute"] == 0
    assert on["recompute"] == 3 * 2 * h * h


def test_activation_checkpointing_shrinks_mindeye1_activations():
    on = estimate(ModelConfig(preset="mindeye1", activation_checkpointing=True), flops=False, world_size=2,
                  micro_batch_size=32)["memory"]
    off = estimate(ModelConfig(preset="mindeye1"), flops=False, world_size=2, micro_batch_size=32)["memory"]
    # the prior's 6 layers over 515 tokens hold most of it; checkpointed, each keeps its input only
    assert on["activations_bytes_per_sample"] < 0.5 * off["activations_bytes_per_sample"]
    assert on["activations_fixed_bytes"] == off["activations_fixed_bytes"]  # the position bias, counted once
    assert on["stages"]["3"]["peak_bytes"] < off["stages"]["3"]["peak_bytes"]


def test_checkpointed_activation_elements_by_hand():
    """Units' inputs once each (a tensor passed to two units, or a view of a counted leaf output,
    is not new), leaf outputs outside units, plus the largest unit's own outputs."""
    from mindeye_dist.estimate import checkpointed_activation_elements
    from mindeye_dist.models.layers import mark_checkpoint_unit

    class Unit(torch.nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, width), torch.nn.Linear(width, 4)

        def forward(self, x, shared):
            return self.b(self.a(x)) + shared.sum()

    stem, big, small = torch.nn.Linear(4, 4), mark_checkpoint_unit(Unit(10)), mark_checkpoint_unit(Unit(6))
    model = torch.nn.ModuleList([stem, big, small])
    x = torch.randn(2, 4)

    def run():
        h = stem(x)  # outside: 8
        shared = h.view(8)  # a view of stem's output: not a new input
        extra = torch.randn(3)
        y = big(h, extra)  # inputs h (counted as stem's output already) and extra (3)
        small(y, extra)  # input y (8); extra again: not new

    # outside 8 + inputs 3 + 8 + largest unit: big's 2x10 + 2x4 = 28
    assert checkpointed_activation_elements(model, run) == 8 + 3 + 8 + 28


def test_cpu_attention_keeps_no_score_tensors_so_the_estimate_holds_on_the_cpu():
    """The estimate counts leaf-module outputs; attention's (heads x queries x keys) scores are not
    one. GPU kernels keep none; on a CPU, SDPA's math path would keep two per layer (4.6 GiB at
    MindEye1's prior, micro-batch 32), so the prior's CPU attention must keep none either: nothing
    autograd saves in a CPU forward of the layer or of the tiny model's prior scales with
    queries x keys, and the CPU's activation count is the meta device's."""
    from mindeye_dist.estimate import measure_activation_elements
    from mindeye_dist.models.prior import Attention

    attn = Attention(dim=32, heads=3, dim_head=4).train()  # dim_head differs from the key count (8)
    x, bias = torch.randn(2, 7, 32), torch.randn(3, 7, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    def scores(shapes, batch, heads, queries):
        return [s for s in shapes if len(s) >= 2 and s[-1] == queries + 1 and math.prod(s) >= batch * heads * queries * (queries + 1)]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attn(x, bias).sum()
    assert saved and not scores(saved, 2, 3, 7), saved
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_everywhere():
        saved.clear()
        attn(x, bias).sum()
    assert len(scores(saved, 2, 3, 7)) == 2  # the check sees what SDPA's math path keeps

    dims = {k: v for k, v in TINY.items() if k != "lowlevel_shape"}
    cfg = ModelConfig(preset="tiny", lowlevel=False, prior_depth=2, prior_dim_head=4)  # head dim != key count
    model = build_model(cfg, **dims).train()
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    lengths = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: lengths.append(inp[0].shape[1])) for m in layers]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randn(4, dims["n_voxels"]), subject=0)
        model.prior.loss(out.backbone, torch.randn(4, dims["n_tokens"], dims["token_dim"]))
    for h in hooks:
        h.remove()
    assert len(lengths) == 2 and not scores(saved, 4, layers[0].heads, lengths[0])
    with torch.device("meta"):
        meta = build_model(cfg, **dims)
    assert measure_activation_elements(model, 4, "cpu") == measure_activation_elements(meta, 4, "meta")
