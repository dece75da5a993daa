"""The scale ladder's parts: rung configs and predictions, finding the rank processes under a
launcher (not their loader workers), reading a run's metrics, the table; and one real rung through
the launcher (distributed, slow):

    pytest -m slow tests/test_ladder.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mindeye_dist.bench.ladder import (VARIANTS, LadderOptions, Rung, _earlier_rows, _losses, _rank_pids, _runs_train_py,
                                       format_markdown, output_tiles, predict, rung_ds_config)

REPO = Path(__file__).resolve().parents[1]


def test_every_variant_config_is_shipped_and_nvme_paths_are_per_run(tmp_path):
    for variant, path in VARIANTS.items():
        assert (REPO / path).is_file(), path
    ds = rung_ds_config("zero3_nvme", tmp_path / "swap")
    zo = ds["zero_optimization"]
    assert zo["offload_optimizer"]["nvme_path"] == zo["offload_param"]["nvme_path"] == str(tmp_path / "swap")
    assert "nvme_path" not in json.dumps(rung_ds_config("zero3_offload", tmp_path))


def test_rung_overrides_and_tiles():
    assert output_tiles(4096) == 16 and output_tiles(1024) == 8 and output_tiles(8192) == 32
    rung = Rung("zero3", 2048, steps=20)
    assert rung.name == "zero3-h2048"
    # another model at the same width has another name (its run directory and its row)
    assert Rung("zero3_nvme", 4096, overrides=("model.lowlevel=true",)).name == "zero3_nvme-h4096-lowlevel=true"
    assert {"model.hidden_dim=2048", "model.output_tiles=8", "train.max_steps=20", "model.lowlevel=false"} <= set(
        rung.config_overrides())


def test_predict_counts_mindeye1_and_its_offload_bytes():
    """Width 4096 is MindEye1's backbone: 940,225,280 + projector + prior; on this CPU host the
    offloaded bytes count towards the same RAM, so ZeRO-3 with CPU offload holds more state per
    rank than ZeRO-3 without (an fp32 gradient partition on top; it only skips the step's fp32
    gradient copy), and NVMe far less."""
    z3, off, nvme = (predict(Rung(v, 4096)) for v in ("zero3", "zero3_offload", "zero3_nvme"))
    assert z3["params_by_component"]["backbone"] == 940_225_280
    assert z3["params"] == 940_225_280 + 7_354_624 + 56_055_168
    states = lambda p: p["estimate_row"]["model_states_bytes"] + p["estimate_row"]["host_bytes"]  # noqa: E731
    assert states(off) - states(z3) == 4 * z3["estimate_row"]["partition_numel"]
    assert nvme["estimate_peak_bytes"] < 0.5 * z3["estimate_peak_bytes"] and nvme["nvme_bytes"] > 0


def test_rank_pids_skip_loader_workers(tmp_path):
    """Two 'ranks' running a launchers/train.py, each forking a child (as a DataLoader worker is):
    only the two ranks are found under the launcher process."""
    script = tmp_path / "launchers" / "train.py"
    script.parent.mkdir()
    script.write_text(textwrap.dedent("""
        import os, sys, time
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
        time.sleep(30)
    """))
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        procs = [subprocess.Popen([sys.executable, {str(script)!r}]) for _ in range(2)]
        time.sleep(30)
    """)], start_new_session=True)
    try:
        deadline = time.time() + 20
        found: list[int] = []
        while time.time() < deadline and len(found) < 2:
            time.sleep(0.2)
            found = _rank_pids(launcher.pid)
        time.sleep(0.5)  # the forked children exist by now too
        found = _rank_pids(launcher.pid)
        assert len(found) == 2
        for pid in found:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            assert parent not in found
    finally:
        os.killpg(launcher.pid, 9)
        launcher.wait()


def test_a_rank_is_the_script_not_the_launcher_that_names_it():
    rank = [b"/v/bin/python", b"-u", b"/r/launchers/train.py", b"--local_rank=0", b"--ds_config", b"x.json", b""]
    launch = [b"/v/bin/python", b"-u", b"-m", b"deepspeed.launcher.launch", b"--world_info=e30=", b"/r/launchers/train.py"]
    runner = [b"/v/bin/python", b"/v/bin/deepspeed", b"--num_accelerators", b"2", b"/r/launchers/train.py"]
    assert _runs_train_py(rank) and not _runs_train_py(launch) and not _runs_train_py(runner)


def test_losses_and_step_times_from_metrics(tmp_path):
    rows = [{"step": s, "loss/total": 2.0 - 0.05 * s, "perf/step_time_s": 1.0 + (s == 1) * 9} for s in range(1, 7)]
    rows.insert(3, {"step": 3, "val/loss": 1.0})  # validation rows carry no training loss
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    losses, times = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 7)) and losses[6] == pytest.approx(1.7)
    assert times == [1.0] * 4  # steps 3..6: the first two include warm-up


def test_markdown_table_lists_rungs_and_what_was_not_run():
    rung = {"variant": "zero3", "ds_config": "ds_configs/zero3.json", "hidden_dim": 2048, "params": 512_000_000,
            "status": "trained", "loss_first3": 3.0, "loss_last3": 2.0, "steps": 20, "peak_rss_bytes_per_rank": 5 * 2**30,
            "estimate_peak_bytes_per_rank": 4.5 * 2**30, "estimate_vs_measured": 0.9, "step_time_s": 12.5,
            "load_avg_start": 3.0, "load_avg_end": 4.0}
    skipped = {"rung": "zero3-h4096", "params": 1.0e9, "estimate_peak_bytes_per_rank": 9 * 2**30,
               "reason": "needs 2 x 9.0 GiB + 3 GiB margin; 12.0 GiB available"}
    md = format_markdown({"rungs": [rung], "skipped": [skipped], "baseline": {"baseline_bytes": 0.6 * 2**30,
                                                                               "peak_rss_bytes_per_rank": 0.7 * 2**30}})
    assert "| zero3 (`ds_configs/zero3.json`) | 2048 | 0.512B | trained | 3.000 → 2.000 (20 steps) | 5.00 | 4.50 (0.90) |" in md
    assert "zero3-h4096: 1.00B parameters, predicted 9.00 GiB per rank: needs" in md
    assert "0.60 GiB" in md
    with_overrides = {**rung, "overrides": ["model.lowlevel=false", "train.host_memory=system"]}
    md = format_markdown({"rungs": [with_overrides], "skipped": [], "baseline": {}})
    assert "| zero3 (`ds_configs/zero3.json`), `train.host_memory=system` | 2048 |" in md  # the default is not shown


def test_a_rerun_keeps_the_results_of_the_same_settings(tmp_path):
    """The ladder can run a variant at a time into one OUT: trained rungs and a trained baseline are
    kept; failed rungs and those the memory guard or the timeout ended are tried again; other
    settings start afresh."""
    options = LadderOptions(out=str(tmp_path))
    opts = {"steps": options.steps, "micro_batch": options.micro_batch, "precision": options.precision,
            "activation_checkpointing": True, "n_train": options.n_train}
    rows = [{"rung": "zero2-h2048", "trained": True, "status": "trained"},
            {"rung": "zero3-h4096", "trained": False, "status": "failed (exit 1)"},
            {"rung": "zero3-h3072", "trained": False, "status": "aborted: memory guard"},
            {"rung": "zero3_offload-h4096", "trained": False, "status": "timeout"}]
    (tmp_path / "ladder.json").write_text(json.dumps({"options": opts, "rungs": rows,
                                                        "baseline": {"baseline_bytes": 7, "trained": True}}))
    kept = _earlier_rows(tmp_path, options)
    assert sorted(kept) == ["_baseline", "zero2-h2048"]
    assert _earlier_rows(tmp_path, LadderOptions(out=str(tmp_path), steps=options.steps + 1)) == {}
    assert _earlier_rows(tmp_path / "missing", options) == {}


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rung_through_the_launcher(tmp_path):
    """The baseline rung (64-wide backbone, no prior) on MindEye1-sized synthetic data: 2 ranks
    found and measured, every step logged, the loss falls, the estimate is filled in."""
    from mindeye_dist.bench.ladder import make_dataset, measure_baseline

    options = LadderOptions(out=str(tmp_path), n_train=48, timeout_s=900)
    url = make_dataset(tmp_path, options.n_train)
    row = measure_baseline(url, tmp_path, options)
    assert row["status"] == "trained", row["log_tail"]
    assert len(row["peak_rss_bytes_ranks"]) == 2 and row["peak_rss_bytes_per_rank"] > 100 * 2**20
    assert row["steps"] == 6 and row["loss_last3"] < row["loss_first3"]
    assert 0 < row["baseline_bytes"] < row["peak_rss_bytes_per_rank"]


def test_nvme_rungs_get_swap_buffers_sized_to_their_largest_parameter(tmp_path):
    """DeepSpeed gives every swapped-in parameter partition a buffer of its own: an NVMe rung gets
    NVME_PARAM_BUFFERS buffers, each as large as its largest parameter's partition at 2 ranks (the
    shipped 5 x 1e8 ran out in the first forward), and the estimate counts those buffers."""
    from mindeye_dist.bench.ladder import NVME_PARAM_BUFFERS, _rung_ds_config, nvme_param_buffer_size

    small, big = Rung("zero3_nvme", 1024, steps=20), Rung("zero3_nvme", 2048, steps=20)
    # the largest parameter is the adapter (15,724 x hidden) or an output tile (hidden x 257*768/tiles):
    # half of it per rank, rounded up to 2**20
    for rung in (small, big):
        size, h = nvme_param_buffer_size(rung), rung.hidden_dim
        half = max(15724 * h, h * -(-257 * 768 // output_tiles(h))) / 2
        assert size >= half and size % 2**20 == 0 and size - 2**20 < half
        par = _rung_ds_config(rung, tmp_path)["zero_optimization"]["offload_param"]
        assert par["buffer_size"] == size and par["buffer_count"] == NVME_PARAM_BUFFERS
    assert "buffer_size" not in json.dumps(_rung_ds_config(Rung("zero3_offload", 1024, steps=20), tmp_path))
    # the estimate grows with the buffers it is told about
    assert predict(big)["estimate_peak_bytes"] > predict(small)["estimate_peak_bytes"]
