"""Loggers, throughput meter, FLOP counting, peaks, memory and progress bar (mindeye_dist.metrics)."""

import io
import json
import math

import numpy as np
import pytest
import torch

from mindeye_dist.metrics import (
    JsonlLogger,
    Logger,
    MultiLogger,
    ProgressBar,
    TensorBoardLogger,
    ThroughputMeter,
    build_loggers,
    device_peak_flops,
    measure_flops,
    measure_matmul_peak,
    memory_stats,
    peak_flops_from_name,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------------------------
# Loggers
# --------------------------------------------------------------------------------------------


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_logger_writes_and_appends_on_reopen(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with JsonlLogger(path, clock=FakeClock(100.0)) as logger:
        logger.log({"loss": torch.tensor(0.5), "lr": np.float32(0.25), "step": 999}, step=1)
        logger.log({"loss": 0.25, "retrieval": {"image_top1": 0.5}}, step=2)
        assert len(read_jsonl(path)) == 2  # flushed per call, readable while open
    with JsonlLogger(path) as logger:  # a resumed run appends to the same file
        logger.log({"loss": float("nan")}, step=3)
        logger.log_text("note", "resumed", step=3)
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3, 3]  # the logger's step wins over a metric key
    assert records[0] == {"step": 1, "time": 100.0, "loss": 0.5, "lr": 0.25}
    assert records[1]["retrieval"] == {"image_top1": 0.5}
    assert math.isnan(records[2]["loss"]) and isinstance(records[2]["time"], float)
    assert records[3]["note"] == "resumed"


def test_tensorboard_logger_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log({"loss": 0.5, "lr": torch.tensor(1e-3), "name": "skip me", "mfu": None, "eval": {"top1": 0.75}}, 1)
    logger.log({"loss": 0.25, "steps": np.int64(7)}, 2)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr", "eval/top1", "steps"}
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert acc.Scalars("lr")[0].value == pytest.approx(1e-3)
    assert acc.Scalars("eval/top1")[0].value == 0.75
    assert acc.Scalars("steps")[0].value == 7.0


def test_noop_logger_and_multi_logger(tmp_path):
    noop = Logger()
    noop.log({"loss": 1.0, "anything": object()}, step=0)
    noop.log_text("k", "v", step=0)
    noop.flush()
    noop.close()
    a, b = JsonlLogger(tmp_path / "a.jsonl"), JsonlLogger(tmp_path / "b.jsonl")
    with MultiLogger([a, Logger(), b]) as multi:
        multi.log({"x": 1}, step=5)
    assert read_jsonl(tmp_path / "a.jsonl")[0]["x"] == 1 and read_jsonl(tmp_path / "b.jsonl")[0]["x"] == 1


def test_build_loggers_real_only_on_rank_zero(tmp_path):
    other = build_loggers(tmp_path / "r1", rank=1)
    assert type(other) is Logger and not (tmp_path / "r1").exists()
    main = build_loggers(tmp_path / "r0", rank=0)
    main.log({"loss": 1.0}, step=1)
    main.close()
    assert isinstance(main, MultiLogger)
    assert read_jsonl(tmp_path / "r0" / "metrics.jsonl")[0]["loss"] == 1.0
    assert any((tmp_path / "r0" / "tb").glob("events.out.tfevents.*"))
    assert isinstance(build_loggers(tmp_path / "r2", rank=0, tensorboard=False), JsonlLogger)


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def test_throughput_meter_arithmetic_with_fake_clock():
    clock = FakeClock()
    meter = ThroughputMeter(world_size=4, flops_per_sample=100.0, peak_flops=1000.0, clock=clock)
    for _ in range(2):  # each step: 1 s waiting for data, 3 s computing, 8 local samples
        with meter.data_wait():
            clock.t += 1.0
        clock.t += 3.0
        meter.step(8)
    stats = meter.report()
    assert stats["steps"] == 2 and stats["samples"] == 64
    assert stats["elapsed_s"] == 8.0 and stats["step_time_s"] == 4.0
    assert stats["data_wait_s"] == 1.0 and stats["compute_s"] == 3.0
    assert stats["data_wait_share"] == 0.25
    assert stats["samples_per_s_per_device"] == 2.0 and stats["samples_per_s"] == 8.0
    assert stats["flops_per_s_per_device"] == 200.0 and stats["flops_per_s"] == 800.0
    assert stats["mfu"] == pytest.approx(0.2)

    # New window: evaluation under excluded() does not count; no data wait this time.
    with meter.excluded():
        clock.t += 10.0
    clock.t += 2.0
    meter.step(8)
    stats = meter.report()
    assert stats["elapsed_s"] == 2.0 and stats["data_wait_share"] == 0.0 and stats["samples_per_s"] == 16.0
    assert meter.report() == {}  # no steps since the last report


def test_throughput_meter_unknowns_stay_none():
    clock = FakeClock()
    meter = ThroughputMeter(clock=clock)  # no FLOPs, no peak
    clock.t += 2.0
    meter.step(4)
    stats = meter.report(sync_device="cpu")
    assert stats["samples_per_s"] == 2.0
    assert stats["flops_per_s"] is None and stats["mfu"] is None
    meter = ThroughputMeter(flops_per_sample=10.0, peak_flops=None, clock=clock)
    clock.t += 1.0
    meter.step(1)
    stats = meter.report()
    assert stats["flops_per_s_per_device"] == 10.0 and stats["mfu"] is None


# --------------------------------------------------------------------------------------------
# FLOPs and peaks
# --------------------------------------------------------------------------------------------


def test_measure_flops_linear_forward_and_backward():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    forward = 2 * 4 * 16 * 8  # one addmm
    assert measure_flops(layer, x) == forward

    def train_step(inp):
        layer(inp).sum().backward()

    # Backward of a Linear is two matmuls of forward size: dW = dYᵀX always, dX = dY W only when
    # the input needs a gradient (inside a network it does; a leaf batch does not). The bias
    # gradient is a reduction, which FlopCounterMode does not count.
    assert measure_flops(train_step, x) == 2 * forward
    assert measure_flops(train_step, x.clone().requires_grad_(True)) == 3 * forward
    # Counting works on the meta device without computing anything.
    with torch.device("meta"):
        meta_layer, meta_x = torch.nn.Linear(16, 8), torch.empty(4, 16)
    assert measure_flops(meta_layer, meta_x) == forward


def test_peak_table():
    assert device_peak_flops("cpu", torch.bfloat16) is None  # CPU peaks are measured, not tabled
    assert peak_flops_from_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_from_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_from_name("NVIDIA H100 NVL") == 835e12
    assert peak_flops_from_name("NVIDIA H200") == 989e12
    assert peak_flops_from_name("NVIDIA B200") == 2250e12
    assert peak_flops_from_name("NVIDIA A100-SXM4-80GB", torch.float16) == 312e12
    assert peak_flops_from_name("NVIDIA L4") == 121e12 and peak_flops_from_name("NVIDIA L40S") == 362e12
    assert peak_flops_from_name("NVIDIA A10G") is None  # no datasheet: unknown, not guessed
    assert peak_flops_from_name("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 on Volta
    assert peak_flops_from_name("Some Future GPU") is None
    assert peak_flops_from_name("NVIDIA A100-SXM4-80GB", torch.float64) is None
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops_from_name("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5e12
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores allowed
        assert peak_flops_from_name("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    finally:
        torch.set_float32_matmul_precision(previous)


def test_measure_matmul_peak_is_positive_and_finite():
    flops = measure_matmul_peak(torch.float32, n=128, repeats=3, warmup=1)
    assert flops > 0 and math.isfinite(flops)
    with pytest.raises(ValueError, match="fp16"):
        measure_matmul_peak(torch.float16, n=8)


def test_memory_stats_cpu():
    stats = memory_stats("cpu")
    assert set(stats) == {"rss_bytes", "peak_rss_bytes"}
    assert stats["rss_bytes"] > 0 and stats["peak_rss_bytes"] > 0
    assert stats["peak_rss_bytes"] > 1 << 20  # bytes, not KiB: a Python process with torch is > 1 MiB


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------


def _run_bar(**kwargs):
    file = io.StringIO()  # not a terminal
    bar = ProgressBar(10, file=file, **kwargs)
    for _ in range(5):
        bar.update(1, loss=0.5, samples_per_s=100.0)
    bar.close()
    return file.getvalue()


def test_progress_bar_quiet_when_off_or_not_a_terminal(capsys):
    assert _run_bar(enabled="off", rank=0) == ""
    assert _run_bar(enabled="auto", rank=0) == ""
    assert _run_bar(enabled="on", rank=1) == ""  # never on other ranks
    assert "5/10" in _run_bar(enabled="on", rank=0)  # the same stream does see a forced bar
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_bar_compact_line():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(10, enabled="off", rank=0, line_file=out, clock=clock)
    bar.update(5)
    clock.t = 50.0
    line = bar.print_line(5, {"loss": 0.123456, "samples_per_s": 512.0, "mfu": None})
    assert line == "step 5/10 | loss 0.1235 | samples_per_s 512 | eta 0:00:50"
    assert out.getvalue() == line + "\n"
    other = ProgressBar(10, enabled="on", rank=1, line_file=out)
    assert other.print_line(5, {"loss": 1.0}) is None and out.getvalue() == line + "\n"
