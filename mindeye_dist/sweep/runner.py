"""Running a sweep on Ray: Tune trials that each run a Ray Train job whose workers call ``train.run``.

Layout of ``SWEEP_DIR``::

    sweep.json            the resolved sweep config and the plan (trials, schedules, FLOPs, memory)
    ridge.json            the ridge baseline on the validation split, per data size
    lr.json               the learning rate the search chose per model size
    results.jsonl         one object per finished trial (the contract report.py reads)
    events.log            the progress lines printed while it ran
    trials/ID/run/        each trial's run directory (config, metrics, TensorBoard, checkpoints)
    trials/ID/result.json what results.jsonl is assembled from (written when the trial ends)
    ray/                  Ray Tune's experiment state (Tuner.restore reads it)
    data/                 the synthetic dataset, when the sweep builds one

Phases: (1) per model size, an ASHA search (``ASHAScheduler``, time = samples seen, metric = the
validation loss) over the candidate learning rates, all candidates of a size at once so that its
rungs compare them; the survivor runs its whole budget and is itself the full run for the search's
data size and first seed; (2) every other (size, data size, seed) at its size's winning rate,
first-in-first-out. Nothing is lost when something dies: a failed trial is retried from its own
last checkpoint (``FailureConfig``; ``train.run`` resumes from its run directory), and running
the same command after the driver was killed restores each phase's Tune state
(``Tuner.restore``) - finished trials are not rerun, unfinished ones continue from their
checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from mindeye_dist.sweep.config import SweepConfig
from mindeye_dist.sweep.plan import FINAL, SEARCH, SweepPlan, TrialSpec, base_config

log = logging.getLogger("mindeye_dist.sweep")
TRIAL_CPU = 0.01
"""CPUs of the Tune trial actor itself: it only waits on its Ray Train job (Ray refuses zero)."""


def _write_json(path: Path, obj: Any) -> None:
    from mindeye_dist.fsutil import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=float) + "\n").encode())


def trial_dir(sweep_dir: Path, trial_id: str) -> Path:
    return Path(sweep_dir) / "trials" / trial_id


# ---------------------------------------------------------------------------------------------
# Inside a Ray Train worker: one rank of one trial


def trial_worker(config: dict) -> None:
    """A Ray Train worker's loop: ``train.run`` on this rank, metrics to Tune, the result file."""
    import ray.train
    import torch.distributed as dist

    from mindeye_dist.train import run

    spec = TrialSpec(**config["trial"])
    sweep: SweepConfig = config["sweep"]
    run_dir = trial_dir(Path(config["sweep_dir"]), spec.trial_id) / "run"
    cfg = base_config(sweep, config["data_url"], [*spec.overrides, f"run.dir={run_dir}", "log.progress='off'"])
    started = time.time()
    if ray.train.get_context().get_world_rank() == 0:
        _record_placement_group(trial_dir(Path(config["sweep_dir"]), spec.trial_id))

    def reporter(metrics: dict[str, Any]) -> None:
        # Only validations go to Tune (ASHA's metric must be in every result); every rank calls
        # this with the same all-reduced numbers, as Ray Train's report() requires.
        if "val/loss" in metrics:
            ray.train.report({"samples_seen": spec_samples(spec, metrics["step"]), "step": metrics["step"],
                              "val_loss": metrics["val/loss"], "val_image_top1": metrics["val/image_top1"],
                              "val_brain_top1": metrics["val/brain_top1"], "way": metrics.get("val/way")})

    last = run(cfg, reporter)
    node = ray.get_runtime_context().get_node_id()
    nodes = [None] * dist.get_world_size() if dist.is_initialized() else [node]
    if dist.is_initialized():
        dist.all_gather_object(nodes, node)
    elapsed = time.time() - started
    summary = {"samples_seen": spec.samples, "step": spec.steps, "val_loss": last.get("val/loss"),
               "val_image_top1": last.get("val/image_top1"), "val_brain_top1": last.get("val/brain_top1"),
               "way": last.get("val/way"), "finished": 1}
    if ray.train.get_context().get_world_rank() == 0:
        # wall_s: this attempt (a trial resumed after a failure also spent time before it).
        _write_json(trial_dir(Path(config["sweep_dir"]), spec.trial_id) / "result.json",
                    _result_row(spec, summary, "finished", nodes, elapsed))
    ray.train.report(summary)


PLACEMENT_GROUPS = "placement_groups.txt"
"""Per trial directory: the ids of the placement groups its Ray Train worker groups ran in."""


def _record_placement_group(tdir: Path) -> None:
    """Append this worker group's placement group id to ``tdir/placement_groups.txt``."""
    from ray.util.placement_group import get_current_placement_group

    pg = get_current_placement_group()
    if pg is not None:
        tdir.mkdir(parents=True, exist_ok=True)
        with open(tdir / PLACEMENT_GROUPS, "a") as f:
            f.write(pg.id.hex() + "\n")


def release_placement_groups(tdir: Path) -> int:
    """Remove the recorded placement groups of a trial that has ended; returns how many were still there.

    When Tune stops a trial (ASHA) or it fails, its Ray Train controller dies with it, and Ray Train's
    own ``PlacementGroupCleaner`` only notices through the state API, which needs the dashboard: with
    the dashboard off (our default) the worker group's placement group stayed reserved for good, and
    the next trial waited forever for workers (2026-11-30 and 2026-12-01, after every ASHA stop)."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    path = tdir / PLACEMENT_GROUPS
    if not path.is_file():
        return 0
    released = 0
    for hex_id in dict.fromkeys(path.read_text().split()):
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))
        try:
            state = placement_group_table(pg).get("state")
            if state not in (None, "REMOVED"):
                remove_placement_group(pg)
                released += 1
        except (ray.exceptions.RayError, ValueError, KeyError) as err:  # already gone, or never known here
            log.debug("placement group %s of %s: %s", hex_id, tdir.name, err)
    return released


def spec_samples(spec: TrialSpec, step: int) -> int:
    """Training samples seen after ``step`` optimizer steps of ``spec``."""
    return int(round(spec.samples * step / spec.steps))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _result_row(spec: TrialSpec, metrics: dict, status: str, nodes: list, wall_s: float) -> dict:
    samples = int(metrics.get("samples_seen") or 0)
    return {"trial_id": spec.trial_id, "role": spec.role, "status": status, "size": spec.size, "params": spec.params,
            "data_size": spec.data_size, "seed": spec.seed, "lr": spec.lr, "steps": int(metrics.get("step") or 0),
            "samples_seen": samples, "flops": spec.flops * samples / spec.samples if spec.samples else 0.0,
            "val_loss": metrics.get("val_loss"), "val_image_top1": metrics.get("val_image_top1"),
            "val_brain_top1": metrics.get("val_brain_top1"), "way": metrics.get("way"), "wall_s": wall_s,
            "nodes": nodes, "overrides": dict(o.split("=", 1) for o in spec.overrides)}  # report.py's contract


# ---------------------------------------------------------------------------------------------
# Inside a Tune trial: one Ray Train job


def tune_trial(config: dict) -> None:
    """A Tune trial: a ``TorchTrainer`` with one worker per rank, or the stored result of a trial
    that finished in an earlier life of the driver."""
    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = TrialSpec(**config["trial"])
    sweep: SweepConfig = config["sweep"]
    done = _read_json(trial_dir(Path(config["sweep_dir"]), spec.trial_id) / "result.json")
    if done and done.get("status") == "finished":
        tune.report({"samples_seen": done["samples_seen"], "step": done["steps"], "val_loss": done["val_loss"],
                     "val_image_top1": done["val_image_top1"], "val_brain_top1": done["val_brain_top1"],
                     "finished": 1, "reused": 1})
        return
    res = sweep.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    trainer = TorchTrainer(
        trial_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=res.workers_per_trial, use_gpu=res.gpus_per_worker > 0,
                                     resources_per_worker=per_worker, placement_strategy=res.placement),
        torch_config=TorchConfig(backend="nccl" if res.gpus_per_worker else "gloo",
                                 timeout_s=int(float(os.environ.get("MINDEYE_DIST_TIMEOUT_S", 1800)))),
        run_config=RunConfig(name=f"{spec.trial_id}-{int(time.time())}",
                             storage_path=str(Path(config["sweep_dir"]) / "ray" / "train"),
                             callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# The driver


class _Events:
    """One progress line per trial event, on stderr and in SWEEP_DIR/events.log."""

    def __init__(self, path: Path, echo: Callable[[str], None]):
        self.path, self.echo = path, echo

    def __call__(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.echo(f"[sweep {stamp}] {line}")
        with open(self.path, "a") as f:
            f.write(f"{stamp} {line}\n")


def _progress_callback(events: _Events, sweep_dir: Path, rungs: list[int]):
    from ray.tune import Callback

    class Progress(Callback):
        """started / rung reached / stopped early / finished / failed, one line each."""

        def __init__(self):
            self.reached: dict[str, int] = {}
            self.started: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            spec = TrialSpec(**trial.config["trial"])
            self.started.setdefault(spec.trial_id, time.time())
            events(f"started   {spec.trial_id} ({spec.role}, lr {spec.lr:.3g}, {spec.steps} steps)")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            spec = TrialSpec(**trial.config["trial"])
            seen = int(result.get("samples_seen", 0))
            for rung in rungs:
                if seen >= rung > self.reached.get(spec.trial_id, -1):
                    self.reached[spec.trial_id] = rung
                    events(f"rung      {spec.trial_id}: {seen} samples, val loss {result.get('val_loss', float('nan')):.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            spec = TrialSpec(**trial.config["trial"])
            last = trial.last_result or {}
            done = _read_json(trial_dir(sweep_dir, spec.trial_id) / "result.json") or {}
            if done.get("status") == "finished":  # rank 0 writes it before the trial's last report
                last = {**last, "finished": 1}
                events(f"finished  {spec.trial_id}: val loss {last.get('val_loss', float('nan')):.4f}, image/brain "
                       f"top-1 {last.get('val_image_top1', float('nan')):.3f}/{last.get('val_brain_top1', float('nan')):.3f}"
                       + (" (result of an earlier run)" if last.get("reused") else ""))
                return
            events(f"stopped   {spec.trial_id} early (ASHA) at {int(last.get('samples_seen', 0))} samples, "
                   f"val loss {last.get('val_loss', float('nan')):.4f}")
            self._release(spec)
            wall = time.time() - self.started.get(spec.trial_id, time.time())
            _write_json(trial_dir(sweep_dir, spec.trial_id) / "result.json",
                        _result_row(spec, last, "stopped_early", [], wall))

        def _release(self, spec: TrialSpec) -> None:
            n = release_placement_groups(trial_dir(sweep_dir, spec.trial_id))
            if n:
                events(f"released  {n} placement group(s) of {spec.trial_id} (its workers' CPUs are free again)")

        def on_trial_error(self, iteration, trials, trial, **info):
            spec = TrialSpec(**trial.config["trial"])
            self._release(spec)
            events(f"failed    {spec.trial_id} (attempt {trial.num_failures}); retried from its last checkpoint "
                   f"up to max_failures times; logs in {trial_dir(sweep_dir, spec.trial_id) / 'run' / 'logs'}")

    return Progress()


def _tune_phase(name: str, specs: list[TrialSpec], plan: SweepPlan, sweep_dir: Path, data_url: str,
                scheduler, concurrency: int, events: _Events, rungs: list[int]):
    """One Tune experiment over ``specs`` (restored from SWEEP_DIR/ray/NAME when it exists)."""
    from ray import tune
    from ray.tune import FailureConfig, RunConfig

    trainable = tune.with_resources(tune_trial, {"cpu": TRIAL_CPU})  # the workers hold the real resources
    storage = str((sweep_dir / "ray").resolve())
    path = os.path.join(storage, name)
    param_space = {"trial": tune.grid_search([s.__dict__ for s in specs]), "sweep": plan.sweep,
                   "sweep_dir": str(sweep_dir.resolve()), "data_url": data_url}
    if tune.Tuner.can_restore(path):
        events(f"phase {name}: restoring Ray Tune state from {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrency,
                                        metric="val_loss" if scheduler is None else None,
                                        mode="min" if scheduler is None else None),
            run_config=RunConfig(name=name, storage_path=storage, verbose=0,
                                 failure_config=FailureConfig(max_failures=plan.sweep.max_failures),
                                 callbacks=[_progress_callback(events, sweep_dir, rungs)]),
        )
    return tuner.fit()


def _asha(plan: SweepPlan):
    from ray.tune.schedulers import ASHAScheduler

    spec = plan.sweep.lr
    budget = max(t.samples for t in plan.search)
    # Rungs can only be judged at validations: the first one at or after grace_fraction of the budget.
    interval = min(plan.global_batch * int(o.split("=")[1]) for t in plan.search for o in t.overrides
                   if o.startswith("train.eval_every_steps="))
    grace = max(interval, math.ceil(spec.grace_fraction * budget / interval) * interval)
    # max_t one past the budget: ASHA stops a trial that reaches max_t, and the survivor must run
    # to its end (the summary it reports then is the full run).
    return ASHAScheduler(time_attr="samples_seen", metric="val_loss", mode="min", max_t=budget + 1,
                         grace_period=grace, reduction_factor=spec.reduction_factor), \
        [grace * spec.reduction_factor ** k for k in range(8) if grace * spec.reduction_factor ** k <= budget]


def lr_concurrency(sweep: SweepConfig) -> int:
    """Candidates of one size that train at once."""
    return sweep.lr.concurrency or len(sweep.lr.values)


def search_order(specs: list[TrialSpec]) -> list[TrialSpec]:
    """Candidates nearest the middle of the grid (in log learning rate) first: run one after another,
    the first is promoted past every rung (nothing recorded to trail yet), so it should be the likeliest
    winner, and the extremes, the likeliest losers, meet recorded values at the rung."""
    logs = sorted(math.log(t.lr) for t in specs)
    mid = (logs[(len(logs) - 1) // 2] + logs[len(logs) // 2]) / 2
    return sorted(specs, key=lambda t: (abs(math.log(t.lr) - mid), t.lr))


def choose_lr(plan: SweepPlan, sweep_dir: Path, size: str) -> dict:
    """The candidate of ``size`` that finished its budget with the lowest validation loss (else,
    if none finished, the lowest loss reached)."""
    reported = [r for r in (_read_json(trial_dir(sweep_dir, t.trial_id) / "result.json")
                                for t in plan.search if t.size == size) if r and r.get("val_loss") is not None]
    # A candidate that diverged (inf or NaN loss) can never win; min() over NaN would be order-dependent.
    rows = [r for r in reported if math.isfinite(r["val_loss"])]
    if not rows:
        raise RuntimeError(f"the learning-rate search for size {size!r} produced no finite validation loss; see "
                           f"{sweep_dir / 'events.log'} and the trial logs under {sweep_dir / 'trials'}")
    finished = [r for r in rows if r["status"] == "finished"] or rows
    best = min(finished, key=lambda r: r["val_loss"])
    return {"lr": best["lr"], "trial_id": best["trial_id"], "val_loss": best["val_loss"],
            "finished": best["status"] == "finished", "candidates": {str(r["lr"]): r["val_loss"] for r in reported}}


def ridge_baselines(plan: SweepPlan, sweep_dir: Path) -> dict[str, dict]:
    """Ridge regression on the validation split for every data size (fit on that many training
    rows, alpha chosen on validation): the floor every trial's retrieval must clear."""
    from mindeye_dist.evaluate import retrieval_accuracy, ridge_baseline, split_arrays

    path = sweep_dir / "ridge.json"
    cached = _read_json(path) or {}
    cfg = base_config(plan.sweep, plan.data_url)
    missing = [n for n in plan.data_sizes if str(n) not in cached]
    if missing:
        train_x, train_y = split_arrays(cfg.data, cfg.data.train_split)
        val_x, val_y = split_arrays(cfg.data, cfg.data.val_split)
        way = min(cfg.eval.retrieval_way, len(val_x))
        for n in missing:
            fit = ridge_baseline(train_x[:n], train_y[:n], val_x, val_y, way=way, loops=cfg.eval.retrieval_loops,
                                 seed=cfg.run.seed)
            res = retrieval_accuracy(fit.predict(val_x), val_y, way=way, loops=cfg.eval.retrieval_loops,
                                     seed=cfg.run.seed)
            cached[str(n)] = {"image_top1": float(res["image_top1"]), "brain_top1": float(res["brain_top1"]),
                              "alpha": float(fit.alpha), "way": way, "split": cfg.data.val_split}
        _write_json(path, cached)
    return cached


def final_trials(plan: SweepPlan, chosen: dict) -> list[TrialSpec]:
    """The full runs with their learning rates (those waiting for the search get its choice)."""
    return [t if t.lr is not None else t.with_lr(chosen[t.size]["lr"]) for t in plan.finals if t.lr is not None
            or t.size in chosen]


def assemble_results(plan: SweepPlan, sweep_dir: Path, ridge: dict, chosen: dict) -> list[dict]:
    """results.jsonl from every trial's result.json (search candidates, then full runs); the search
    winner that ran its full budget is also the full run for its (size, data size, seed)."""
    from mindeye_dist.fsutil import atomic_write_bytes

    finals = final_trials(plan, chosen)
    final_ids = {t.trial_id for t in finals}
    rows, seen = [], set()
    for t in [*plan.search, *finals]:
        row = _read_json(trial_dir(sweep_dir, t.trial_id) / "result.json")
        if row is None or t.trial_id in seen:
            continue
        seen.add(t.trial_id)
        row["role"] = FINAL if t.trial_id in final_ids and row["status"] == "finished" else SEARCH
        r = ridge.get(str(row["data_size"]), {})
        row["ridge_image_top1"], row["ridge_brain_top1"] = r.get("image_top1"), r.get("brain_top1")
        row["below_ridge"] = bool(r and row.get("val_image_top1") is not None and (
            row["val_image_top1"] < r["image_top1"] or row["val_brain_top1"] < r["brain_top1"]))
        rows.append(row)
    atomic_write_bytes(sweep_dir / "results.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in rows).encode())
    return rows


def summary_table(rows: list[dict]) -> str:
    head = f"{'trial':34s}{'role':>10s}{'status':>14s}{'params':>13s}{'data':>7s}{'lr':>9s}{'val loss':>10s}" \
           f"{'image':>7s}{'brain':>7s}{'ridge i/b':>12s}{'min':>6s}"
    lines = [head]
    for r in rows:
        ridge = "-" if r.get("ridge_image_top1") is None else f"{r['ridge_image_top1']:.2f}/{r['ridge_brain_top1']:.2f}"
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"{r['trial_id']:34s}{r['role']:>10s}{r['status']:>14s}{r['params']:>13,d}{r['data_size']:>7d}"
                     f"{r['lr']:>9.3g}{fmt(r.get('val_loss'), '>10.4f')}{fmt(r.get('val_image_top1'), '>7.3f')}"
                     f"{fmt(r.get('val_brain_top1'), '>7.3f')}{ridge:>12s}{r['wall_s'] / 60:>6.1f}"
                     + ("  BELOW RIDGE" if r.get("below_ridge") else ""))
    return "\n".join(lines)


def ensure_data(sweep: SweepConfig, sweep_dir: Path, events: _Events) -> str:
    """The dataset URL; builds ``data.synthetic`` into SWEEP_DIR/data when ``data.url`` is empty."""
    if sweep.data.url:
        return sweep.data.url
    from mindeye_dist.data import build_synthetic_dataset
    from mindeye_dist.data.meta import META_NAME
    from mindeye_dist.errors import ConfigError

    spec = dict(sweep.data.synthetic)
    if "preset" not in spec and "member" not in spec:
        raise ConfigError("data.url is empty and data.synthetic has neither a preset nor a member: name a dataset, "
                          "a synthetic preset or a family member (prepare_data.py synthetic --list-members)")
    url = str((sweep_dir / "data").resolve())
    if "member" in spec and not (Path(url) / META_NAME).is_file():
        from mindeye_dist.data.family import build_family_dataset

        member = spec.pop("member")
        events(f"building synthetic family member {member!r}{' ' + str(spec) if spec else ''} at {url}")
        build_family_dataset(member, url, progress=False, overwrite=True, **spec)
    elif not (Path(url) / META_NAME).is_file():
        preset, seed = spec.pop("preset"), int(spec.pop("seed", 0))
        events(f"building synthetic dataset {preset!r} (seed {seed}{', ' + str(spec) if spec else ''}) at {url}")
        build_synthetic_dataset(preset, url, seed, progress=False, overwrite=True, **spec)
    return url


def _start_ray(sweep: SweepConfig, address: Optional[str], plan: SweepPlan, events: _Events) -> bool:
    """Connect to ``address``, or start a local Ray bound to 127.0.0.1; True if we started it."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        events(f"joined the Ray cluster at {address}: {ray.cluster_resources()}")
        return False
    res = sweep.resources
    # Logical CPUs: the machine's, or what one size's ASHA candidates need at once (they share the
    # cores then).
    at_once = max(res.concurrency, lr_concurrency(sweep) if sweep.lr.search == "asha" else 1)
    need = at_once * (res.workers_per_trial * res.cpus_per_worker + TRIAL_CPU)
    # Twice that, as slack: the placement group of a trial that ended is released asynchronously
    # (release_placement_groups for stopped and failed ones). Logical CPUs only book; the cores are
    # shared either way.
    cpus = max(os.cpu_count() or 1, math.ceil(2 * need - 1e-9))
    ray.init(num_cpus=cpus, include_dashboard=sweep.dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    # Ray swaps a 127.0.0.1 node address for the host's routable one and binds there, unless it runs
    # in its single-host mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set by the launchers before Ray
    # is imported), which keeps GCS, raylet and workers on the loopback.
    where = ray.nodes()[0]["NodeManagerAddress"]
    events(f"started a local Ray on {where} with {cpus} logical CPUs"
           + (f" (the machine has {os.cpu_count()})" if cpus != os.cpu_count() else "")
           + ("; dashboard on 127.0.0.1" if sweep.dashboard else "; dashboard off"))
    return True


def run_sweep(sweep: SweepConfig, sweep_dir: str | os.PathLike, *, address: Optional[str] = None,
              dry_run: bool = False, echo: Callable[[str], None] = print) -> int:
    """Plan, search, train, collect. Returns a process exit code (0 when every full run finished)."""
    import ray

    from mindeye_dist.sweep.plan import check_memory, format_plan, make_plan, write_plan

    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    events = _Events(sweep_dir / "events.log", echo)
    data_url = ensure_data(sweep, sweep_dir, events)
    plan = make_plan(sweep, data_url)
    write_plan(plan, sweep_dir)
    too_big = check_memory(plan)
    if dry_run:
        echo(format_plan(plan))
        for line in too_big:
            echo(f"REFUSED {line}")
        return 2 if too_big else 0
    if too_big:
        raise MemoryError("trials that cannot fit:\n" + "\n".join(too_big))
    ridge = ridge_baselines(plan, sweep_dir)
    events("ridge baseline (validation): " + ", ".join(f"{n} stimuli {r['image_top1']:.3f}/{r['brain_top1']:.3f}"
                                                     for n, r in sorted(ridge.items(), key=lambda kv: int(kv[0]))))
    started = _start_ray(sweep, address, plan, events)
    try:
        chosen = _read_json(sweep_dir / "lr.json") or {}
        if plan.search and len(chosen) < len(plan.sizes):
            for size in plan.sizes:
                if size in chosen:
                    continue
                specs = search_order([t for t in plan.search if t.size == size])
                scheduler, rungs = _asha(plan)
                events(f"LR search for {size} ({plan.sizes[size].params:,} parameters): "
                       f"{', '.join(f'{t.lr:.3g}' for t in specs)} with ASHA (rungs at {rungs} samples)")
                _tune_phase(f"lr_{size}", specs, plan, sweep_dir, data_url, scheduler,
                            min(len(specs), lr_concurrency(sweep)), events, rungs)
                chosen[size] = choose_lr(plan, sweep_dir, size)
                events(f"LR for {size}: {chosen[size]['lr']:.3g} (val loss {chosen[size]['val_loss']:.4f})")
                _write_json(sweep_dir / "lr.json", chosen)
        finals = final_trials(plan, chosen)
        todo = [t for t in finals if (_read_json(trial_dir(sweep_dir, t.trial_id) / "result.json") or {}).get("status")
                != "finished"]
        if todo:
            events(f"full runs: {len(todo)} to train ({len(finals) - len(todo)} already finished)")
            _tune_phase("final", todo, plan, sweep_dir, data_url, None, sweep.resources.concurrency, events, [])
    finally:
        if started:
            ray.shutdown()
    rows = assemble_results(plan, sweep_dir, ridge, chosen)
    echo(summary_table(rows))
    missing = [t.trial_id for t in finals if not any(r["trial_id"] == t.trial_id and r["status"] == "finished"
                                                     for r in rows)]
    if missing:
        events(f"{len(missing)} full run(s) did not finish: {', '.join(missing)}; rerun the same command to resume")
        return 1
    events(f"done: {sweep_dir / 'results.jsonl'} ({len(rows)} trials); report: python launchers/report.py "
           f"{sweep_dir} --out {sweep_dir / 'report'}")
    return 0
