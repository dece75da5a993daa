"""``launchers/gpu_check.sh`` on the CPU (``--device cpu --quick``): every part that does not need
CUDA runs the code a GPU run runs (optimizer pick, the bf16 step at micro-batch 2 and 4, ZeRO-3
memory against the estimate) and the CUDA-only part (NCCL) is skipped with its reason. The
numbers of a real run come from a lent GPU (README, Performance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_script_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHON=sys.executable, OUT=str(tmp_path / "check"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "launchers/gpu_check.sh"), "--device", "cpu", "--quick"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "check.json").read_text())
    assert r["duration_s"] < 480 and r["environment"]["status"] == "ok" and r["environment"]["device"] == "cpu"
    opt = r["optimizer"]
    assert opt["status"] == "ok" and opt["picked"] == "torch.AdamW(fused, cpu)"
    assert {"apex.FusedAdam", "deepspeed.FusedAdam", "torch.AdamW(fused)"} <= set(opt["usable"])
    assert r["nccl"]["status"] == "skipped" and "needs a CUDA device" in r["nccl"]["reason"]
    mfu = r["mfu"]
    assert mfu["status"] == "ok" and [x["micro_batch"] for x in mfu["rows"]] == [2, 4]
    assert all(x["samples_per_s"] > 0 and x["mfu_datasheet"] is None for x in mfu["rows"])
    assert mfu["goal_met"] is None and "no datasheet peak" in mfu["goal_note"] and "bf16" in mfu["engine"]
    z = r["zero3"]
    assert z["status"] == "ok" and z["measured_states_bytes"] > 0 and z["estimate_states_bytes"] > 0
    assert z["estimate_vs_measured_states"] > 0  # at the tiny preset DeepSpeed's fixed buffers dominate: no ratio asserted
    md = (tmp_path / "check.md").read_text()
    assert "nccl: skipped" in md and "ZeRO-3" in md and "optimizer picked" in md


@pytest.mark.gpu
def test_gpu_check_script_on_cuda(tmp_path):
    """On a GPU host: the readiness check passes its own goals (bf16 MFU, fused optimizer, NCCL, ZeRO-3)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "DS_ACCELERATOR")}
    env.update(PYTHON=sys.executable, OUT=str(tmp_path / "check"))
    proc = subprocess.run(["bash", str(REPO / "launchers/gpu_check.sh"), "--device", "cuda", "--quick"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "check.json").read_text())
    assert r["environment"]["device"] == "cuda" and r["optimizer"]["status"] == "ok"
    assert r["nccl"]["status"] == "ok" and r["mfu"]["status"] == "ok"
    assert all(x["samples_per_s"] > 0 for x in r["mfu"]["rows"])
