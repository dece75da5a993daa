"""The trainer surface: one step for every caller, best-on-validation checkpoints, early stopping,
one value per step after a resume, faults as a component, the shipped DeepSpeed configs found
from anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindeye_dist import checkpoint as ckpt
from mindeye_dist.faults import NO_FAULTS, InjectedFault, InjectedFaults, faults_from_env
from mindeye_dist.metrics import TensorBoardLogger, truncate_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_url(tiny_dataset) -> str:
    return tiny_dataset(1)


def _train(run_dir, data_url, *overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, str(REPO / "launchers/train.py"), "--config", str(REPO / "launchers/configs/tiny.yaml"),
           f"data.url={data_url}", f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_best_checkpoint_is_marked_and_kept(tmp_path, data_url):
    run = tmp_path / "run"
    _train(run, data_url, "train.max_steps=12", "train.eval_every_steps=3", "checkpoint.select=best",
           "checkpoint.every_steps=0", "checkpoint.keep_last=1", "checkpoint.best_metric=val/loss")
    state = json.loads((run / "checkpoints" / ckpt.tag_for(12) / "train_state.json").read_text())
    best = state["best_val"]
    assert best["metric"] == "val/loss" and best["tag"] == ckpt.tag_for(best["step"])
    vals = {r["step"]: r["val/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val/loss" in r}
    assert sorted(vals) == [3, 6, 9, 12]
    assert best["value"] == min(vals.values()) and vals[best["step"]] == best["value"]
    assert ckpt.read_best(run / "checkpoints") == best["tag"]  # kept although keep_last=1
    assert ckpt.read_latest(run / "checkpoints") == ckpt.tag_for(12)
    # each validation put a picture in TensorBoard: seen | reconstruction rows of the val stimuli
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("val/reconstructions")
    assert [e.step for e in images] == [3, 6, 9, 12]
    assert images[0].width > images[0].height > 0 and images[0].encoded_image_string[:4] == b"\x89PNG"


def test_early_stopping_stops_and_a_rerun_does_not_train_on(tmp_path, data_url):
    # A learning rate too small to move the weights: every validation equals the first, so with
    # patience 1 the run stops at the second one (step 4) instead of training to step 20.
    run = tmp_path / "run"
    args = ("train.max_steps=20", "train.eval_every_steps=2", "train.early_stop_patience=1", "optim.max_lr=1e-30",
            "checkpoint.best_metric=val/loss", "model.prior_cond_drop_prob=0", "model.dropout=0")
    proc = _train(run, data_url, *args)
    assert "stopped early after 1 validations without improvement" in proc.stderr
    assert ckpt.read_latest(run / "checkpoints") == ckpt.tag_for(4)
    proc = _train(run, data_url, *args)  # resumes, sees it had stopped, trains nothing more
    assert ckpt.read_latest(run / "checkpoints") == ckpt.tag_for(4)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


def test_truncate_jsonl_keeps_one_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 9)) + '{"step": 9, "lo')
    assert truncate_jsonl(path, 5) == 4  # steps 6, 7, 8 and the torn line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert truncate_jsonl(tmp_path / "absent.jsonl", 3) == 0


def test_tensorboard_purges_the_steps_a_resumed_run_redoes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardLogger(tmp_path / "tb")
    for step in range(1, 9):
        first.log({"loss": float(step)}, step)
    first.close()
    resumed = TensorBoardLogger(tmp_path / "tb", purge_step=5)  # resumed from the step-4 checkpoint
    for step in range(5, 11):
        resumed.log({"loss": 100.0 + step}, step)
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == list(range(1, 11))
    assert [e.value for e in events] == [1.0, 2.0, 3.0, 4.0] + [100.0 + s for s in range(5, 11)]


def test_faults_are_a_component_with_a_no_op_default(monkeypatch):
    loss = torch.tensor(2.0)
    assert NO_FAULTS.poison(loss, 3, 0) is loss
    monkeypatch.delenv("MINDEYE_FAULTS", raising=False)
    assert faults_from_env() is NO_FAULTS
    faults = InjectedFaults.parse("nan_loss@3@1,raise@5")
    assert torch.isnan(faults.poison(loss, 3, 1)) and faults.poison(loss, 3, 0) == 2.0
    with pytest.raises(InjectedFault, match="rank 0 at step 5"):
        faults.at_step_start(5, 0)
    with pytest.raises(ValueError, match="KIND@STEP"):
        InjectedFaults.parse("explode@3")


def test_benchmark_harness_steps_the_trainer_users_run():
    # The harness holds a Trainer and calls its step(); nothing of train.py's loop is copied.
    import inspect

    from mindeye_dist.bench import training

    source = inspect.getsource(training)
    assert "Trainer" in source and ".step([batch])" in source
    assert "_forward_loss" not in source and "enable_backward_allreduce" not in source


def test_training_code_never_imports_the_measuring_code():
    # What only measures (the harness, the loopback S3 server) is imported by nothing that trains.
    code = ("import sys, mindeye_dist.train, mindeye_dist.trainer, mindeye_dist.sweep, mindeye_dist.evaluate\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('mindeye_dist.bench', 'mindeye_dist.benchmark',"
            " 'mindeye_dist.data.local_s3', 'mindeye_dist.data.benchmark', 'tests')))\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_shipped_ds_configs_are_found_from_any_directory(tmp_path):
    code = ("from mindeye_dist.ds_config import find_ds_config, load_ds_config\n"
            "print(load_ds_config('ds_configs/zero3.json')['zero_optimization']['stage'],"
            " load_ds_config('zero2.json')['zero_optimization']['stage'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["3", "2"], out.stderr[-2000:]
