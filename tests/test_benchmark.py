"""Smoke test of the benchmark harness (launchers/benchmark.py): every section with tiny sizes.

Asserts the JSON schema (headline ratios at the top level, per-section keys) and that the numbers
are positive and finite. Timings are never asserted: this is a 2-core CI box.
"""

from __future__ import annotations

import json
import math

import pytest

from mindeye_dist.benchmark import HEADLINES, TARGETS, BenchmarkOptions, format_markdown, run_benchmark

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}


ME1_TINY = {"n_voxels": 64, "n_tokens": 4, "token_dim": 16, "projector_hidden": 16, "prior_depth": 1, "prior_heads": 2,
            "prior_dim_head": 8}
"""MindEye1's layout (BrainNetwork, 2T+1-token prior) at toy sizes: the section's plumbing, not its numbers."""


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import open_clip
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core box makes 2-thread OpenMP regions of tiny ops crawl

    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "bench-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(tmp / "bench-tiny-clip.json"))
    opts = BenchmarkOptions(
        presets=["tiny", "tiny:hidden_dim=64"], micro_batch_sizes=[2, 4], repeats=2, warmup=1, step_budget_s=5.0,
        variant_repeats=1, real_loader_preset="tiny", real_loader_micro_batch=4, real_loader_steps=3,
        reference_preset="tiny", reference_micro_batch=2, reference_steps=1, reference_encoder="bench-tiny-clip",
        consumption_preset="tiny:hidden_dim=64", data_train_samples=24, data_repeats=1, data_workers=1, data_batch_size=4,
        data_dims={"n_voxels": 96, "n_tokens": 4, "token_dim": 16}, memory_preset="tiny", memory_micro_batch=2,
        memory_stages=(0, 3), memory_small_bucket_stages=(3,), matmul_n=256, matmul_repeats=3, work_dir=str(tmp / "work"),
        mindeye1_hidden=32, mindeye1_micro_batch=4, mindeye1_rounds=1, mindeye1_steps=1, mindeye1_shape=ME1_TINY,
        mindeye1_encoder_config=str(tmp / "bench-tiny-clip.json"), command="pytest")
    try:
        yield run_benchmark(opts)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # every section of the harness through one ~2-minute fixture (make test-slow)
def test_headlines_are_positive_and_finite(result):
    for key in HEADLINES:
        assert key in result, key
    assert isinstance(result["device"], str) and result["device"]
    for key in HEADLINES[:-1]:
        assert _positive(result[key]), (key, result[key])
    assert set(result["targets"]) == set(TARGETS)
    for t in result["targets"].values():
        assert _positive(t["value"]) and isinstance(t["met"], bool)


@pytest.mark.slow  # every section of the harness through one ~2-minute fixture (make test-slow)
def test_sections_schema(result):
    assert _positive(result["peak"]["matmul_flops_per_s"])
    presets = result["train"]["presets"]
    assert list(presets) == ["tiny", "tiny:hidden_dim=64"]
    for p in presets.values():
        assert _positive(p["params"]) and _positive(p["flops_per_sample"])
        assert [r["micro_batch"] for r in p["rows"]] == [2, 4]
        for r in p["rows"]:
            for k in ("step_time_s", "samples_per_s", "flops_per_s", "fraction_of_peak"):
                assert _positive(r[k]), (k, r[k])
            assert r["data_wait_share"] == 0.0
            assert all(v >= 0 and math.isfinite(v) for v in r["phase_s"].values())
    large = presets["tiny:hidden_dim=64"]
    assert large["is_large"] and large["profile"]["top_ops"] and large["profile"]["categories"]
    rows = large["variants"]["rows"]
    assert {"as shipped", "off: system_malloc", "off: world1_allreduce", "off: fused_update"} <= set(rows)
    assert all(_positive(r["step_time_s"]) for r in rows.values())
    assert result["host_memory"] == "reuse"
    from mindeye_dist import hostmem

    assert hostmem.current() == "reuse"  # the variant runs put the shipped setting back
    hostmem.system_defaults()  # the rest of the pytest process runs as before
    real = presets["tiny"]["real_loader"]
    assert 0.0 <= real["data_wait_share"] <= 1.0 and _positive(real["samples_per_s"])
    ref = result["reference"]
    assert _positive(ref["samples_per_s"]) and _positive(ref["encoder"]["seconds_per_step"])
    for src in ("local", "s3"):
        assert _positive(result["data"][src]["samples_per_s"]) and _positive(result["data"][src]["mb_per_s"])
    me1 = result["mindeye1"]
    assert me1["hidden"] == 32 and me1["params"]["ours"] > 0 and me1["params"]["reference"] > 0
    for k in ("ratio_vs_reference_with_encoder", "ratio_vs_reference_cached_targets", "flops_per_s_ours"):
        assert _positive(me1[k]), (k, me1[k])
    assert result["train_vs_reference_ratio"] == me1["ratio_vs_reference_with_encoder"]
    assert result["train_vs_cached_reference_ratio"] == me1["ratio_vs_reference_cached_targets"]
    assert _positive(me1["memory"]["ours_peak_rss_bytes"]) and _positive(me1["memory"]["reference_peak_rss_bytes"])
    assert set(me1["components_s"]["ours"]) == set(me1["components_s"]["reference"])
    assert all(_positive(v) for side in me1["components_s"].values() for v in side.values())
    assert me1["profile"]["ours"]["top_ops"] and me1["profile"]["reference_cached_targets"]["top_ops"]
    mem = result["memory"]
    assert set(mem["stages"]) == {"0", "3", "3+small_buckets"}
    for s in mem["stages"].values():
        assert _positive(s["measured_model_state_bytes_per_rank"]) and _positive(s["estimate_model_state_bytes_per_rank"])
        assert len(s["ranks"]) == 2


@pytest.mark.slow  # every section of the harness through one ~2-minute fixture (make test-slow)
def test_json_and_markdown(result):
    text = json.dumps(result, allow_nan=False, default=str)
    assert json.loads(text)["train_vs_reference_ratio"] == result["train_vs_reference_ratio"]
    md = format_markdown(result)
    for heading in ("Headline ratios", "Training step", "Reference-style loop", "Reference comparison at MindEye1 size",
                    "Data loader", "ZeRO model-state memory"):
        assert heading in md


def test_cli_peak_only(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "launchers" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("_benchmark_launcher", path)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    main = launcher.main
    out = tmp_path / "b.json"
    assert main(["--quick", "--sections", "peak", "--json", str(out), "--markdown", str(tmp_path / "b.md")]) == 0
    data = json.loads(out.read_text())
    assert _positive(data["peak"]["matmul_flops_per_s"]) and all(k in data for k in HEADLINES)


def test_cpu_attention_equals_sdpa_layer():
    """The prior's CPU attention (models.prior.multi_query_attention, blockwise, hand-written
    backward): gradcheck in float64 with several blocks per sample and queries in either layout,
    then the whole layer against SDPA's (bench/attention.py): output and every gradient, the
    relative-position bias's included, equal to fp32 rounding."""
    import torch

    from mindeye_dist.bench.attention import compare
    from mindeye_dist.models import prior

    q, k, v = torch.randn(2, 3, 7, 5, dtype=torch.double), torch.randn(2, 8, 5, dtype=torch.double), torch.randn(2, 8, 5, dtype=torch.double)
    bias = torch.randn(3, 7, 8, dtype=torch.double)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))
    block_bytes = prior.CPU_ATTENTION_BLOCK_BYTES
    try:
        prior.CPU_ATTENTION_BLOCK_BYTES = 3 * 8 * 4 * 3  # blocks of 3 queries: 3 + 3 + 1
        assert torch.autograd.gradcheck(lambda *a: prior.multi_query_attention(*a, 1.7), inputs)
        q_heads_last = torch.randn(2, 7, 3, 5, dtype=torch.double).transpose(1, 2).requires_grad_()  # the layer's layout
        assert torch.autograd.gradcheck(lambda q_: prior.multi_query_attention(q_, k, v, bias, 1.7), (q_heads_last,))
    finally:
        prior.CPU_ATTENTION_BLOCK_BYTES = block_bytes
    r = compare(batch=2, tokens=41, dim=32, heads=2, dim_head=40, rounds=1)
    diffs = r["max_relative_difference"]["SDPA math path"]
    assert diffs.keys() >= {"out", "x", "rel", "to_q.weight", "null_kv"}
    assert max(diffs.values()) < 1e-5, diffs
