"""launchers/evaluate.py on a real (tiny, single-process) run: the contract's keys and files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mindeye_dist.data import build_synthetic_dataset

    root = tmp_path_factory.mktemp("evalcli")
    data = root / "data"
    build_synthetic_dataset("tiny", str(data), seed=5, progress=False)
    run = root / "run"
    proc = subprocess.run([sys.executable, str(REPO / "launchers/train.py"), "--config", str(REPO / "launchers/configs/tiny.yaml"),
                           f"data.url={data}", f"run.dir={run}", "train.max_steps=8", "checkpoint.every_steps=4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


def _evaluate(*args):
    return subprocess.run([sys.executable, str(REPO / "launchers/evaluate.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_contract_output_and_predictions(trained, tmp_path):
    data, run = trained
    out, pred = tmp_path / "m.json", tmp_path / "pred.npy"
    proc = _evaluate("--run", str(run), "--data", str(data), "--split", "test", "--out", str(out),
                     "--save-predictions", str(pred), "--way", "16", "--loops", "5", "--baseline", "ridge")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    for key in ("image_top1", "brain_top1"):
        assert 0.0 <= metrics["retrieval"][key] <= 1.0
        assert 0.0 <= metrics["baselines"]["ridge"][key] <= 1.0
    assert metrics["retrieval"]["way"] == 16 and metrics["retrieval"]["loops"] == 5
    assert metrics["checkpoint"] == "step_0000008" and metrics["n"] == 48
    assert set(metrics["ceiling"]) >= {"image_top1", "brain_top1"}

    # Predictions: retrieval-submodule outputs for the split in row order, [n, tokens, dim].
    preds = np.load(pred)
    assert preds.shape == (48, 4, 16)
    from mindeye_dist.evaluate import load_run_model
    from mindeye_dist.data import build_eval_loader

    model, cfg, _, _ = load_run_model(str(run))
    batch = next(iter(build_eval_loader(cfg.data, "test", batch_size=48)))
    assert torch.equal(batch.index, torch.arange(48))
    with torch.no_grad():
        again = model(batch.voxels, batch.subject).projector.numpy()
    assert np.allclose(preds, again, atol=1e-6)

    # Same numbers from an earlier checkpoint differ (the tag is honoured).
    proc = _evaluate("--run", str(run), "--checkpoint", "step_0000004", "--way", "16", "--loops", "5")
    assert proc.returncode == 0 and json.loads(proc.stdout)["checkpoint"] == "step_0000004"


def test_ridge_without_a_run_and_clear_errors(trained, tmp_path):
    data, _ = trained
    proc = _evaluate("--data", str(data), "--baseline", "ridge", "--way", "16", "--loops", "3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["retrieval"]["image_top1"] >= 0
    proc = _evaluate("--run", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "not a run directory" in proc.stderr
    proc = _evaluate("--data", str(data), "--way", "300")
    assert proc.returncode == 2 and "--run" in proc.stderr
