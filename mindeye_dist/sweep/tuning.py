"""Tuning mode: a better configuration for one dataset within a stated budget.

When the recipe for a new dataset (``launchers/configs/demo.yaml``) is not enough, a Ray Tune
search with ASHA over learning rate, temperature, width, dropout and mixup, judged on the
validation split only (never test), writes its winner as a ready config file::

    python launchers/tune.py --data URL --out TUNE_DIR --budget-min 60 [--trials 24] [key=value ...]
    deepspeed launchers/train.py --ds_config ds_configs/zero2.json --config TUNE_DIR/best.yaml

Every trial is the sweep's: a Ray Train job whose workers call ``train.run`` (the recipe applied
to the dataset first, then the trial's values), reporting the validation loss against samples
seen, which ASHA uses to stop the weak early (cheap rungs first). The budget is wall time on the
cluster the search runs on (``--budget-min``), split as Tune's ``time_budget_s``; trials still
running at the end are stopped and judged on what they reached. The winner is the trial with the
best validation retrieval (mean of image and brain top-1) among those that reached the last rung,
ties to the lower validation loss.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mindeye_dist.config import _check
from mindeye_dist.sweep.config import BaseSpec, DataSpec, LRSpec, ModelSize, ResourceSpec, SweepConfig

SPACE_KEYS = {"lr": "optim.max_lr", "temperature": None, "width": "model.hidden_dim", "dropout": "model.dropout",
              "mixup": "loss.mixup_pct"}


@dataclass
class TuneSpace:
    lr: list[float] = field(default_factory=lambda: [1e-4, 1e-2])
    """Peak learning rate range, searched log-uniformly."""
    temperature: list[float] = field(default_factory=lambda: [0.01, 0.3])
    """Contrastive temperature range (log-uniform); BiMixCo and SoftCLIP use the same value."""
    width: list[int] = field(default_factory=lambda: [256, 512, 1024])
    """Backbone widths to choose from."""
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.5])
    """Dropout range inside the residual blocks (uniform)."""
    mixup: list[float] = field(default_factory=lambda: [0.0, 0.5])
    """Share of training in the BiMixCo phase (uniform)."""

    def __post_init__(self) -> None:
        for key in ("lr", "temperature", "dropout", "mixup"):
            value = getattr(self, key)
            _check(len(value) == 2 and 0 <= value[0] <= value[1], f"space.{key}", value, "[low, high] with low <= high")
        _check(self.lr[0] > 0 and self.temperature[0] > 0, "space.lr/temperature", (self.lr, self.temperature),
               "positive ranges (searched on a log scale)")
        _check(len(self.width) >= 1 and all(w > 0 for w in self.width), "space.width", self.width, "positive widths")

    def tune_space(self) -> dict[str, Any]:
        from ray import tune

        return {"lr": tune.loguniform(*self.lr), "temperature": tune.loguniform(*self.temperature),
                "width": tune.choice(list(self.width)), "dropout": tune.uniform(*self.dropout),
                "mixup": tune.uniform(*self.mixup)}


def trial_overrides(values: dict[str, Any]) -> list[str]:
    """The experiment overrides of one point of the search space."""
    t = values["temperature"]
    return [f"optim.max_lr={values['lr']!r}", f"model.hidden_dim={int(values['width'])}",
            f"model.dropout={values['dropout']!r}", f"loss.mixup_pct={values['mixup']!r}",
            f"loss.bimixco_temp={t!r}", f"loss.softclip_temp_start={t!r}", f"loss.softclip_temp_end={t!r}"]


def run_tuning(data_url: str, out: str | os.PathLike, *, base: BaseSpec, space: TuneSpace, trials: int,
               budget_min: float, steps: Optional[int] = None, resources: Optional[ResourceSpec] = None,
               address: Optional[str] = None, seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    """Search, then write ``OUT/best.yaml`` (and ``OUT/tuning.json`` with every trial). Returns the winner."""
    import ray
    from ray import tune
    from ray.tune import FailureConfig, RunConfig
    from ray.tune.schedulers import ASHAScheduler

    from mindeye_dist.config import dump_config
    from mindeye_dist.sweep.plan import TrialSpec, base_config
    from mindeye_dist.sweep.runner import TRIAL_CPU, _Events, _progress_callback, _read_json, _start_ray, tune_trial

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    events = _Events(out / "events.log", echo)
    resources = resources or ResourceSpec()
    sweep = _sweep_for(base, data_url, resources)
    cfg = base_config(sweep, data_url)
    steps = steps or cfg.train.max_steps
    world = resources.workers_per_trial
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    evals = min(10, steps)
    every = max(1, steps // evals)
    grace = every * global_batch * max(1, evals // 9)
    scheduler = ASHAScheduler(time_attr="samples_seen", metric="val_loss", mode="min", max_t=steps * global_batch + 1,
                              grace_period=grace, reduction_factor=3)
    common = [f"train.max_steps={steps}", f"train.eval_every_steps={every}", f"run.seed={seed}"]

    def point(values: dict) -> dict:
        spec = TrialSpec(f"tune-{values['__id']}", "tuning", "tune", 0, seed, values["lr"], steps,
                         steps * global_batch, 0.0, 0, [*common, *trial_overrides(values)])
        return spec.__dict__

    space = space.tune_space()
    param_space = {**space, "sweep": sweep, "sweep_dir": str(out.resolve()), "data_url": data_url,
                   "trial": tune.sample_from(lambda c: point({**{k: c[k] for k in SPACE_KEYS}, "__id": _short_hash(c)}))}
    started = _start_ray(sweep, address, None, events)
    t0 = time.time()
    try:
        path = str((out / "ray" / "tuning").resolve())
        if tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, tune.with_resources(tune_trial, {"cpu": TRIAL_CPU}),
                                       resume_unfinished=True, restart_errored=True)
        else:
            tuner = tune.Tuner(
                tune.with_resources(tune_trial, {"cpu": TRIAL_CPU}), param_space=param_space,
                tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=trials, time_budget_s=budget_min * 60,
                                            max_concurrent_trials=max(1, resources.concurrency)),
                run_config=RunConfig(name="tuning", storage_path=str((out / "ray").resolve()), verbose=0,
                                     failure_config=FailureConfig(max_failures=1),
                                     callbacks=[_progress_callback(events, out, [grace * 3 ** k for k in range(6)])]))
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    rows = []
    for result in grid:
        trial = result.config.get("trial") or {}
        metrics = result.metrics or {}
        done = _read_json(out / "trials" / trial.get("trial_id", "?") / "result.json") or {}
        rows.append({"trial_id": trial.get("trial_id"), "overrides": trial.get("overrides"),
                     "values": {k: result.config.get(k) for k in SPACE_KEYS},
                     "samples_seen": metrics.get("samples_seen"), "val_loss": metrics.get("val_loss"),
                     "val_image_top1": metrics.get("val_image_top1"), "val_brain_top1": metrics.get("val_brain_top1"),
                     "status": done.get("status", "stopped")})
    scored = [r for r in rows if r["val_image_top1"] is not None]
    if not scored:
        raise RuntimeError(f"no tuning trial reached a validation; see {out / 'events.log'}")
    reach = max(r["samples_seen"] or 0 for r in scored)
    top = [r for r in scored if (r["samples_seen"] or 0) >= reach]
    best = max(top, key=lambda r: (r["val_image_top1"] + r["val_brain_top1"], -(r["val_loss"] or math.inf)))
    winner_cfg = base_config(sweep, data_url, [o for o in best["overrides"] if not o.startswith("train.eval_every")])
    header = (f"# Written by launchers/tune.py on {time.strftime('%Y-%m-%d %H:%M')}: the best of {len(rows)} trials "
              f"(ASHA, {budget_min:g} min budget, {time.time() - t0:.0f} s used) on the validation split of\n"
              f"# {data_url}: image/brain top-1 {best['val_image_top1']:.3f}/{best['val_brain_top1']:.3f}, "
              f"val loss {best['val_loss']:.4f}. Train it with --config {out / 'best.yaml'}\n")
    (out / "best.yaml").write_text(header + dump_config(winner_cfg))
    (out / "tuning.json").write_text(json.dumps({"best": best, "trials": rows, "budget_min": budget_min,
                                                 "seconds": time.time() - t0}, indent=2, default=float) + "\n")
    events(f"best: {best['trial_id']} {best['values']} -> image/brain {best['val_image_top1']:.3f}/"
           f"{best['val_brain_top1']:.3f}; config written to {out / 'best.yaml'}")
    return best


def _short_hash(config: dict) -> str:
    import hashlib

    text = json.dumps({k: config[k] for k in SPACE_KEYS}, sort_keys=True, default=float)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _sweep_for(base: BaseSpec, data_url: str, resources: ResourceSpec) -> SweepConfig:
    """The sweep config the trial code reads (base experiment, data, resources); models are unused."""
    return SweepConfig(name="tune", base=base, data=DataSpec(url=data_url), models=[ModelSize("tune", [])],
                       resources=resources, lr=LRSpec(search="none", values=[1e-3]))
