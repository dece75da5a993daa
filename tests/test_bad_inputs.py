"""Bad inputs to evaluation, export and resume: each ends non-zero with the cause and the fix.

One tiny run (ZeRO-2, one process, checkpoints at steps 2 and 4) is trained once per module and
copied into each test, which then damages the copy and runs the real launcher (or, where a
subprocess adds nothing, the library function the launcher calls). Subprocess timeouts are
guards, not measurements: every case here ends in seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindeye_dist import checkpoint as ckpt
from mindeye_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GUARD_S = 60
TRAIN_ARGS = ["train.max_steps=4", "checkpoint.every_steps=2", "train.eval_every_steps=0"]
LAST, FIRST = "step_0000004", "step_0000002"


def _launch(script: str, *args: str, guard_s: int = GUARD_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "launchers" / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=guard_s)


def _train(data: Path, run: Path, *extra: str, guard_s: int = GUARD_S) -> subprocess.CompletedProcess:
    return _launch("train.py", "--config", REPO / "launchers/configs/tiny.yaml", f"data.url={data}", f"run.dir={run}",
                   *TRAIN_ARGS, *extra, guard_s=guard_s)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mindeye_dist.data import build_synthetic_dataset

    root = tmp_path_factory.mktemp("bad_inputs")
    data = root / "data"
    build_synthetic_dataset("tiny", str(data), seed=3, progress=False)
    run = root / "run"
    # log.progress=off unquoted: YAML 1.1 would read it as False and the config would reject it.
    proc = _train(data, run, "log.progress=off", guard_s=300)  # the setup, not a case: no 60 s guard
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt.complete_tags(run / "checkpoints") == [FIRST, LAST]
    return data, run


@pytest.fixture
def run_copy(trained, tmp_path):
    data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return data, copy


def _truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


class _Payload:
    """Pickles as a call to os.system: what a hostile run directory could ship."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_payload(path: Path, marker: Path) -> None:
    """Replace a checkpoint file with one that keeps its keys but runs a command when unpickled."""
    torch.save({"optimizer_state_dict": _Payload(marker), "module": _Payload(marker)}, path)


# --------------------------------------------------------------------------------------------
# Truncated checkpoint files


def test_evaluate_names_a_truncated_file_and_the_complete_tags(run_copy):
    _, run = run_copy
    bad = run / "checkpoints" / LAST / "mp_rank_00_model_states.pt"
    _truncate(bad)
    proc = _launch("evaluate.py", "--run", run, "--way", 8, "--loops", 2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(bad) in proc.stderr and "truncated or corrupt" in proc.stderr
    assert f"--checkpoint {FIRST}" in proc.stderr  # the fix: an older complete checkpoint
    assert "Traceback" not in proc.stderr
    from mindeye_dist.evaluate import evaluate_run

    assert evaluate_run(str(run), checkpoint=FIRST, way=8, loops=2)["checkpoint"] == FIRST  # the advice works


def test_resume_names_a_truncated_file_and_how_to_resume_from_an_older_tag(run_copy):
    data, run = run_copy
    bad = run / "checkpoints" / LAST / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _truncate(bad, keep=0.9)
    proc = _train(data, run)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "truncated or corrupt" in proc.stderr
    assert f"echo {FIRST} > {run / 'checkpoints' / 'latest'}" in proc.stderr


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.999])
def test_every_truncation_is_caught_before_loading(run_copy, keep):
    _, run = run_copy
    for name in ("mp_rank_00_model_states.pt", "train_state_rank00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        target = run / "checkpoints" / LAST / name
        backup = target.read_bytes()
        _truncate(target, keep)
        with pytest.raises(ckpt.CheckpointError, match=re.escape(str(target))):
            ckpt.verify_checkpoint_files(run / "checkpoints", LAST)
        with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
            ckpt.read_rank_state(run / "checkpoints", LAST, 0)  # the resume path
        target.write_bytes(backup)
    assert len(ckpt.verify_checkpoint_files(run / "checkpoints", LAST, unpickle=True)) == 3


# --------------------------------------------------------------------------------------------
# Config or dataset that disagrees with the checkpoint


def test_evaluate_on_a_dataset_with_other_voxels_names_n_voxels(run_copy, tmp_path):
    from mindeye_dist.data import build_synthetic_dataset

    _, run = run_copy
    other = tmp_path / "other"
    build_synthetic_dataset("tiny", str(other), seed=3, progress=False, n_voxels=80)
    proc = _launch("evaluate.py", "--run", run, "--data", other, "--way", 8, "--loops", 2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # The run's config.yaml fixes the subject table {subj01: 96}: the message names both widths.
    assert re.search(r"n_voxels[^\n]*(checkpoint 96, dataset 80|subj01': 96\}[^\n]*n_voxels=80)", proc.stderr), proc.stderr
    assert "config.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_with_another_width_names_the_setting(run_copy):
    data, run = run_copy
    from mindeye_dist.config import load_config
    from mindeye_dist.data import read_meta

    # Through the launcher: the setting that differs (checked before anything is built), not a raw
    # state_dict size mismatch; the run's config.yaml is left as it was.
    before = (run / "config.yaml").read_text()
    proc = _train(data, run, "model.hidden_dim=48")
    assert proc.returncode != 0
    assert "model.hidden_dim: checkpoint 32, now 48" in proc.stderr, proc.stderr[-2000:]
    assert "does not fit the model configured now" in proc.stderr and "size mismatch" not in proc.stderr
    assert (run / "config.yaml").read_text() == before
    # The library check names the setting from the config the checkpoint itself keeps.
    cfg = load_config(REPO / "launchers/configs/tiny.yaml", [f"data.url={data}", "model.hidden_dim=48"])
    dims = ckpt.data_dims(read_meta(str(data)))
    with pytest.raises(ConfigError) as err:
        ckpt.check_model_matches(run, cfg.model, dims, data_url=str(data), tag=LAST)
    assert "model.hidden_dim: checkpoint 32, now 48" in str(err.value)
    assert f"{LAST}/config.yaml" in str(err.value) and "new run.dir" in str(err.value)


def test_matching_config_passes_the_check(trained):
    data, run = trained
    from mindeye_dist.config import load_config
    from mindeye_dist.data import read_meta

    cfg = load_config(run / "config.yaml")
    ckpt.check_model_matches(run, cfg.model, ckpt.data_dims(read_meta(str(data))), data_url=str(data), tag=LAST)


# --------------------------------------------------------------------------------------------
# Output places: checked first, named by their flag, files get the umask's mode


def test_evaluate_checks_out_and_predictions_before_any_work(run_copy, tmp_path):
    _, run = run_copy
    # A checkpoint that does not exist would fail the evaluation: the output error must come first.
    proc = _launch("evaluate.py", "--run", run, "--checkpoint", "step_9999999", "--out", tmp_path)
    assert proc.returncode == 2 and "--out" in proc.stderr and "is a directory" in proc.stderr, proc.stderr
    from mindeye_dist.evaluate import evaluate_run

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"--save-predictions .*pred.npy.* its directory .*a_file' is a file, not a directory"):
        evaluate_run(str(run), checkpoint="step_9999999", save_predictions=str(blocker / "pred.npy"))


def test_export_to_an_unwritable_place_names_out(run_copy, tmp_path):
    _, run = run_copy
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _launch("export.py", "--run", run, "--out", blocker / "w.safetensors")
    assert proc.returncode == 2
    assert "--out" in proc.stderr and str(blocker / "w.safetensors") in proc.stderr and ".tmp" not in proc.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_export_follows_the_umask(trained, tmp_path, umask, mode):
    from mindeye_dist.export import export_run, load_exported

    _, run = trained
    out = tmp_path / "w.safetensors"
    old = os.umask(umask)
    try:
        export_run(run, out)
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(mode)  # 0644 under 022, as the checkpoints
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left beside it
    assert load_exported(out) is not None


# --------------------------------------------------------------------------------------------
# Advice that can be followed


def test_split_smaller_than_way_gives_a_way_the_cli_accepts(trained):
    _, run = trained
    proc = _launch("evaluate.py", "--run", run, "--way", 300, "--loops", 2)
    assert proc.returncode == 2 and "way=None" not in proc.stderr
    advised = re.search(r"Pass (--way \d+)", proc.stderr)
    assert advised, proc.stderr
    from mindeye_dist.evaluate import evaluate_run

    assert evaluate_run(str(run), way=int(advised.group(1).split()[1]), loops=2)["retrieval"]["way"] == 48


# --------------------------------------------------------------------------------------------
# Untrusted run directories: pickles that would run code are refused, not executed


def test_payload_is_live_under_plain_torch_load(tmp_path):
    """The control: the planted file really runs its command when loaded without weights_only."""
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    _plant_payload(path, marker)
    torch.load(path, weights_only=False)  # what DeepSpeed's loaders do; the payload only touches a file
    assert marker.exists()


@pytest.mark.parametrize("entry", ["evaluate", "export.py", "train.py"])
def test_a_hostile_checkpoint_is_refused_by_every_entry_point(run_copy, tmp_path, entry):
    data, run = run_copy
    marker = tmp_path / "payload_ran"
    # DeepSpeed reads this file with weights_only=False in its checkpoint engine and zero_to_fp32.
    bad = run / "checkpoints" / LAST / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _plant_payload(bad, marker)
    if entry == "evaluate":  # shares export's reader; in-process keeps the module's time down
        from mindeye_dist.evaluate import evaluate_run

        with pytest.raises(ckpt.CheckpointError) as err:
            evaluate_run(str(run), way=8, loops=2)
        message = str(err.value)
    else:
        proc = _train(data, run) if entry == "train.py" else _launch(entry, "--run", run, "--out", tmp_path / "w.safetensors")
        assert proc.returncode != 0
        message = proc.stderr
    assert f"refused to load {bad}" in message and "posix.system" in message, message[-2000:]
    assert not marker.exists()


def test_deepspeed_loaders_are_weights_only_inside_the_guard(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    _plant_payload(path, marker)
    with ckpt.weights_only_loading(), pytest.raises(Exception, match="unsupported GLOBAL posix.system"):
        TorchCheckpointEngine().load(str(path), map_location="cpu")  # asks for weights_only=False
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.safe_torch_load(path)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the guard is lifted afterwards


# --------------------------------------------------------------------------------------------
# The "best" marker


def test_best_is_the_default_checkpoint_and_can_be_named(run_copy, tmp_path):
    _, run = run_copy
    from mindeye_dist.evaluate import evaluate_run
    from mindeye_dist.export import export_run

    ckpt_dir = run / "checkpoints"
    assert ckpt.resolve_tag(ckpt_dir) == LAST  # no marker: latest
    with pytest.raises(ckpt.CheckpointError, match="--checkpoint latest"):
        ckpt.resolve_tag(ckpt_dir, "best")
    (ckpt_dir / "best").write_text(FIRST + "\n")  # as the trainer writes it
    assert ckpt.resolve_tag(ckpt_dir) == FIRST
    assert ckpt.resolve_tag(ckpt_dir, "latest") == LAST
    assert evaluate_run(str(run), way=8, loops=2)["checkpoint"] == FIRST
    assert export_run(run, tmp_path / "w.safetensors")["checkpoint"] == FIRST
    assert evaluate_run(str(run), checkpoint="latest", way=8, loops=2)["checkpoint"] == LAST
    (ckpt_dir / "best").write_text("step_0000001")
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_tag(ckpt_dir)
