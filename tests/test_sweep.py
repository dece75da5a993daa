"""Sweeps: the typed sweep config, the plan and --dry-run, and the smoke sweep on a real
two-node Ray cluster (``ray start --head`` on 127.0.0.1 plus a second ``ray start`` node) with the
driver killed mid-sweep and resumed by running the same command again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mindeye_dist.config import ConfigError
from mindeye_dist.distributed import free_port
from mindeye_dist.sweep.config import load_sweep_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SWEEPS = REPO / "launchers" / "configs" / "sweeps"
REQUIRED = ("trial_id", "params", "data_size", "samples_seen", "flops", "lr", "val_loss", "val_image_top1",
            "val_brain_top1", "wall_s", "overrides")


@pytest.mark.parametrize("name", ["smoke", "scaling_cpu", "scaling_gpu"])
def test_shipped_sweep_configs_load(name):
    sweep = load_sweep_config(SWEEPS / f"{name}.yaml")
    assert len(sweep.models) >= 2 and sweep.lr.values


@pytest.mark.parametrize("override,key", [
    ("lr.values=[]", "lr.values"),
    ("budget.flops=1e12", "budget"),  # samples and flops both set
    ("resources.workers_per_trial=0", "resources.workers_per_trial"),
    ("models[0]=1", "models"),
    ("lr.grace_fraction=2", "lr.grace_fraction"),
    ("data_sizes=[0.5, -1]", "data_sizes"),
    ("lr.data_size=0.3", "lr.data_size"),
])
def test_bad_sweep_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_sweep_config(SWEEPS / "smoke.yaml", [override])


def _sweep(out, *args, address=None, timeout=1500, **popen):
    cmd = [sys.executable, str(REPO / "launchers/sweep.py"), "--config", str(SWEEPS / "smoke.yaml"), "--out", str(out),
           *(["--address", address] if address else []), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_plan_and_refuses_what_cannot_fit(tmp_path):
    proc = _sweep(tmp_path / "sw", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for trial in ("h16-d144-s0-lr0.001", "h64-d144-s0-lr0.01", "h16-d144-s0 ", "h64-d144-s0 "):
        assert trial in proc.stderr
    assert "mem/rank" in proc.stderr and "FLOPs" in proc.stderr
    plan = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [t["trial_id"] for t in plan["finals"]] == ["h16-d144-s0", "h64-d144-s0"]
    assert not (tmp_path / "sw" / "ray").exists()  # nothing started

    proc = _sweep(tmp_path / "sw", "--dry-run", "resources.device_memory_gb=0.0001")
    assert proc.returncode == 2
    assert "REFUSED h64" in proc.stderr and "resources.device_memory_gb=0.0001" in proc.stderr


def test_scaling_gpu_dry_run_covers_100m_to_5b_and_1_to_40_sessions(tmp_path):
    sweep = load_sweep_config(SWEEPS / "scaling_gpu.yaml")
    assert sweep.data.url and len(sweep.data_sizes) >= 3
    from mindeye_dist.sweep.plan import check_memory, make_plan

    # The GPU sweep names an NSD dataset; plan it against a tiny stand-in with the same dims.
    from mindeye_dist.data import build_synthetic_dataset

    url = str(tmp_path / "nsd")
    build_synthetic_dataset("tiny", url, 0, progress=False, n_voxels=15724, n_tokens=257, token_dim=768, n_train=60,
                            n_test=8, vae_size=64)
    sweep.data.url = url
    sweep.data_sizes = [d for d in sweep.data_sizes if d <= 1.0] or [1.0]
    plan = make_plan(sweep, url)
    params = sorted(info.params for info in plan.sizes.values())
    assert params[0] < 2e8 and params[-1] >= 5e9, params
    assert check_memory(plan) == []  # every size fits the declared 80 GB per GPU


@pytest.fixture
def ray_cluster():
    """A real two-node Ray cluster on this machine: ``ray start --head`` and a second ``ray start``
    node with its own resources. Ray refuses a multi-node cluster on the loopback address (it swaps
    127.0.0.1 for the host's routable address), so the nodes use that; the sweep's own local Ray,
    a single node, stays on 127.0.0.1 (sweep.runner._start_ray)."""
    import re
    import shutil
    import tempfile

    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    ray = str(BIN / "ray")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's AF_UNIX socket paths must stay under 108 bytes

    def start(*args) -> str:
        proc = subprocess.run([ray, "start", *args, "--num-cpus=3", "--disable-usage-stats"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    head = start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}")
    address = re.search(r"ray start --address='([^']+)'", head).group(1)
    try:
        start(f"--address={address}", '--resources={"second_node": 1}')
        yield address
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_smoke_sweep_on_two_nodes_survives_a_killed_driver(tmp_path, ray_cluster):
    out = tmp_path / "sw"
    driver = _sweep(out, "resources.placement=SPREAD", address=ray_cluster, popen=True)
    events = out / "events.log"
    deadline = time.time() + 1200
    while time.time() < deadline and driver.poll() is None:
        if events.is_file() and "finished" in events.read_text():
            break
        time.sleep(2)
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-sweep (its trials with it)
    driver.wait(60)
    finished = {line.split()[2].rstrip(":") for line in events.read_text().splitlines()
                if line.split()[1:2] == ["finished"]}
    assert finished
    stamps = {t: (out / "trials" / t / "result.json").stat().st_mtime for t in finished}

    proc = _sweep(out, "resources.placement=SPREAD", address=ray_cluster)  # the same command resumes
    assert proc.returncode == 0, proc.stderr[-4000:]
    for trial, stamp in stamps.items():  # finished before the kill: not rerun
        assert (out / "trials" / trial / "result.json").stat().st_mtime == stamp
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    finals = [r for r in rows if r["role"] == "final"]
    assert sorted(r["size"] for r in finals) == ["h16", "h64"]
    for r in rows:
        assert all(k in r for k in REQUIRED), r
    for r in finals:
        assert r["status"] == "finished" and r["samples_seen"] == 192 and r["flops"] > 0
        assert r["params"] > 0 and r["val_loss"] > 0 and 0 <= r["val_image_top1"] <= 1
        assert len(set(r["nodes"])) == 2, r["nodes"]  # SPREAD: the trial's two ranks on both nodes
    assert json.loads((out / "lr.json").read_text()).keys() == {"h16", "h64"}
    assert (out / "trials" / finals[0]["trial_id"] / "run" / "checkpoints" / "latest").is_file()


def test_tuning_space_and_overrides():
    from mindeye_dist.sweep.tuning import TuneSpace, trial_overrides

    with pytest.raises(ConfigError, match="space.lr"):
        TuneSpace(lr=[1e-2, 1e-4])
    overrides = trial_overrides({"lr": 1e-3, "temperature": 0.05, "width": 512, "dropout": 0.1, "mixup": 0.3})
    from mindeye_dist.config import load_config

    cfg = load_config(None, overrides)  # every override is a valid experiment key
    assert cfg.optim.max_lr == 1e-3 and cfg.model.hidden_dim == 512 and cfg.loss.mixup_pct == 0.3
    assert cfg.loss.bimixco_temp == cfg.loss.softclip_temp_start == cfg.loss.softclip_temp_end == 0.05


@pytest.mark.slow
def test_tuning_mode_writes_a_config_that_trains(tmp_path):
    from mindeye_dist.data import build_synthetic_dataset

    data = tmp_path / "data"
    build_synthetic_dataset("tiny", str(data), 0, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, str(REPO / "launchers/tune.py"), "--data", str(data), "--out", str(tmp_path / "tune"),
           "--config", str(REPO / "launchers/configs/tiny.yaml"), "--budget-min", "10", "--trials", "3", "--steps", "12",
           "base.model.prior=false", "base.model.lowlevel=false", "base.data.num_workers=0", "space.width=[16,32]"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "tune" / "tuning.json").read_text())
    assert len(report["trials"]) >= 2 and report["best"]["val_image_top1"] is not None
    from mindeye_dist.config import load_config

    best = load_config(tmp_path / "tune" / "best.yaml")  # a ready config: loads, trains with --config
    assert best.model.hidden_dim in (16, 32) and best.train.max_steps == 12
    assert best.optim.max_lr == pytest.approx(report["best"]["values"]["lr"])
    assert "started a local Ray on 127.0.0.1" in proc.stderr


def test_a_trial_row_the_sweep_writes_is_what_the_report_reads(tmp_path):
    """The contract between runner (results.jsonl) and report (load_results), on a row built by the runner."""
    from mindeye_dist.scaling.results import load_results
    from mindeye_dist.sweep.plan import TrialSpec
    from mindeye_dist.sweep.runner import _result_row

    spec = TrialSpec(trial_id="h32-d5400-s0-lr0.003", role="final", size="h32", data_size=5400, seed=0, lr=0.003,
                     steps=235, samples=60160, flops=1.2e12, params=202208,
                     overrides=["model.hidden_dim=32", "optim.max_lr=0.003"])
    row = _result_row(spec, {"samples_seen": 60160, "step": 235, "val_loss": 3.69, "val_image_top1": 0.95,
                             "val_brain_top1": 0.98, "way": 300}, "finished", ["127.0.0.1"], 420.0)
    row.update(role="final", ridge_image_top1=0.61, ridge_brain_top1=0.84)
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    trial, = load_results(tmp_path).trials
    assert trial.overrides == {"model.hidden_dim": "32", "optim.max_lr": "0.003"}
    assert trial.params == 202208 and trial.val_loss == 3.69 and trial.samples_seen == 60160


def test_a_diverged_candidate_never_wins_the_lr_search(tmp_path):
    """choose_lr picks the lowest finite validation loss among finished candidates; a NaN (diverged
    learning rate) is listed among the candidates but never chosen, whatever order it comes in."""
    from types import SimpleNamespace

    from mindeye_dist.sweep.plan import TrialSpec
    from mindeye_dist.sweep.runner import _result_row, choose_lr, trial_dir

    specs = []
    for lr, loss in [(0.03, float("nan")), (0.003, 4.2), (0.01, 3.9), (0.1, float("inf"))]:
        spec = TrialSpec(trial_id=f"h8-d100-s0-lr{lr}", role="lr_search", size="h8", data_size=100, seed=0, lr=lr,
                         steps=10, samples=1000, flops=1.0, params=10, overrides=[f"optim.max_lr={lr}"])
        specs.append(spec)
        row = _result_row(spec, {"samples_seen": 1000, "step": 10, "val_loss": loss, "val_image_top1": 0.5,
                                 "val_brain_top1": 0.5, "way": 30}, "finished", ["127.0.0.1"], 1.0)
        trial_dir(tmp_path, spec.trial_id).mkdir(parents=True, exist_ok=True)
        (trial_dir(tmp_path, spec.trial_id) / "result.json").write_text(json.dumps(row))
    chosen = choose_lr(SimpleNamespace(search=specs), tmp_path, "h8")
    assert chosen["lr"] == 0.01 and chosen["val_loss"] == 3.9
    assert set(chosen["candidates"]) == {"0.03", "0.003", "0.01", "0.1"}
    for spec in specs[1:3]:
        (trial_dir(tmp_path, spec.trial_id) / "result.json").unlink()
    with pytest.raises(RuntimeError, match="no finite validation loss"):
        choose_lr(SimpleNamespace(search=specs), tmp_path, "h8")


def test_sequential_lr_search_starts_from_the_middle_of_the_grid():
    """With lr.concurrency 1 the first candidate always runs its full budget (ASHA has nothing
    recorded to compare it with), so the middle of the grid goes first and the extremes meet it at
    the rung; an even grid starts from its two middle values."""
    from mindeye_dist.sweep.plan import TrialSpec
    from mindeye_dist.sweep.runner import lr_concurrency, search_order

    def specs(lrs):
        return [TrialSpec(trial_id=f"t{lr}", role="lr_search", size="h8", data_size=10, seed=0, lr=lr, steps=1,
                          samples=1, flops=1.0, params=1, overrides=[]) for lr in lrs]

    assert [t.lr for t in search_order(specs([3e-3, 1e-2, 3e-2]))] == [1e-2, 3e-2, 3e-3]  # 3e-2 is nearer in log
    assert [t.lr for t in search_order(specs([3e-2, 1e-3, 1e-2, 3e-3]))][:2] == [3e-3, 1e-2]
    sweep = load_sweep_config(REPO / "launchers/configs/sweeps/scaling_cpu.yaml")
    assert lr_concurrency(sweep) == 1
    assert lr_concurrency(load_sweep_config(REPO / "launchers/configs/sweeps/smoke.yaml")) == len(
        load_sweep_config(REPO / "launchers/configs/sweeps/smoke.yaml").lr.values)
    with pytest.raises(ConfigError, match="lr.concurrency"):
        load_sweep_config(REPO / "launchers/configs/sweeps/smoke.yaml", ["lr.concurrency=0"])


def test_the_placement_group_of_a_stopped_trial_is_released(tmp_path):
    """A worker records its placement group in the trial directory; once the trial has ended,
    release_placement_groups removes it (Ray Train's own cleaner needs the dashboard's state API and
    never fired with the dashboard off: the next trial waited forever for its workers), and a
    second call finds nothing left to remove."""
    script = tmp_path / "pg.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        from mindeye_dist.sweep.runner import _record_placement_group, release_placement_groups

        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        tdir = Path({str(tmp_path / "trial")!r})
        pg = placement_group([{{"CPU": 1}}, {{"CPU": 1}}])
        ray.get(pg.ready(), timeout=120)

        @ray.remote(num_cpus=1)
        def worker():
            _record_placement_group(tdir)

        ray.get(worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote(), timeout=120)
        assert (tdir / "placement_groups.txt").read_text().split() == [pg.id.hex()]
        assert placement_group_table(pg)["state"] == "CREATED"
        first = release_placement_groups(tdir)
        import time
        for _ in range(100):
            if placement_group_table(pg)["state"] == "REMOVED":
                break
            time.sleep(0.1)
        print("RESULT", first, placement_group_table(pg)["state"], release_placement_groups(tdir),
              release_placement_groups(tdir / "missing"))
        ray.shutdown()
    """))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert "RESULT 1 REMOVED 0 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_sweep_trials_fit_the_networks_own_loss_without_ridge_stacking(tmp_path):
    """recipe: auto derives ridge stacking for default.yaml; a sweep's trials leave it off (the
    scaling report fits the network's validation loss), unless the sweep turns it on."""
    from mindeye_dist.config import load_config
    from mindeye_dist.data import build_synthetic_dataset
    from mindeye_dist.sweep.plan import base_config

    data = tmp_path / "tiny"
    build_synthetic_dataset("tiny", str(data), seed=1, progress=False)
    assert load_config(str(REPO / "launchers/configs/default.yaml"), [f"data.url={data}"]).model.ridge_skip_rank > 0
    sweep = load_sweep_config(SWEEPS / "scaling_cpu.yaml")
    assert base_config(sweep, str(data)).model.ridge_skip_rank == 0
    assert base_config(sweep, str(data), ["model.ridge_skip_rank=16"]).model.ridge_skip_rank == 16
