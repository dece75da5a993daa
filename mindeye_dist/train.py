"""``run(cfg, reporter=None)``: the one training function every launcher calls.

Rank and world come from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``), so the ``deepspeed`` launcher, ``torchrun``, SLURM and Ray Train drive the same
code; a plain ``python`` process runs as a world of one. The step itself is
:class:`mindeye_dist.trainer.Trainer`'s (the benchmarks call the same one); this module is the
loop around it: data, logging, validation, best-checkpoint selection, early stopping,
checkpoints, resume, the reporter (Ray Tune), and failing fast.

Preemption: SIGTERM (SLURM, Kubernetes, spot instances, the launchers forwarding it) makes every
rank finish its current step (and the validation due at it), agree on that step
(:mod:`mindeye_dist.preemption`: one all-reduced flag per step), write a checkpoint and return
normally, so the process exits 0; the same command resumes. On another number of ranks the run
resumes from DeepSpeed's universal copy of the checkpoint and reshards the rest of the epoch
(:mod:`mindeye_dist.data.reshard`).

Failing fast: an exception on any rank ends that rank at once without waiting for its peers (the
launcher then stops them); a rank whose peers stop answering for ``MINDEYE_DIST_TIMEOUT_S``
seconds ends itself (:class:`mindeye_dist.distributed.StallWatchdog`). Fault injection for the
tests comes from ``MINDEYE_FAULTS`` (:mod:`mindeye_dist.faults`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mindeye_dist import checkpoint as ckpt
from mindeye_dist.config import ExperimentConfig, dump_config
from mindeye_dist.distributed import StallWatchdog, dist_timeout_s, init_distributed, teardown_distributed
from mindeye_dist.errors import ConfigError
from mindeye_dist.trainer import ModelDims, Trainer

log = logging.getLogger("mindeye_dist.train")

Reporter = Callable[[dict[str, Any]], None]
SHOWN = ("loss/total", "loss/contrastive", "loss/prior", "loss/lowlevel", "lr", "perf/samples_per_s",
         "perf/data_wait_share", "perf/flops_per_s", "skipped_steps")
"""Metrics on the one-line progress print; everything goes to metrics.jsonl and TensorBoard."""
LOWER_IS_BETTER = ("val/loss",)
SAMPLE_LOG_ENV = "MINDEYE_SAMPLE_LOG"
"""Set (to anything) to write every micro-batch's sample ids to RUN_DIR/logs/samples_rank{R}.jsonl."""


def setup_logging(run_dir: Path, rank: int) -> None:
    """Per-rank log file in RUN_DIR/logs; rank 0 also logs to stderr."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("mindeye_dist")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_mindeye", False):
            root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    fh.setFormatter(fmt)
    fh._mindeye = True
    root.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("[mindeye] %(message)s"))
        sh._mindeye = True
        root.addHandler(sh)
    root.propagate = False


def _flops_per_sample(cfg: ExperimentConfig, dims: ModelDims) -> Optional[float]:
    """Training FLOPs per sample, counted once on the meta device (no memory, no side effects)."""
    try:
        from mindeye_dist.estimate import estimate

        kwargs = {k: v for k, v in dims.kwargs().items() if k != "nominal"}  # estimate() always fills nominal dims
        return float(estimate(cfg.model, **kwargs)["flops"]["total"])
    except Exception as err:  # never fail a run over a metric
        log.warning("could not count FLOPs per sample (%s); TFLOP/s and MFU will not be logged", err)
        return None


def _datasets(cfg: ExperimentConfig) -> tuple[list, tuple[str, ...]]:
    """The run's datasets (data.url, then data.datasets; one subject each) and the shards to skip.

    Every shard is checked for presence and size before anything starts (a stat each, or one S3
    listing per 1,000): under data.on_corrupt=fail every rank raises the same list of bad shards.
    """
    from mindeye_dist.data import check_shards, read_meta
    from mindeye_dist.data.subset import limit_split

    metas, skip = [], []
    for url in [cfg.data.url, *cfg.data.datasets]:
        meta = read_meta(url, s3_endpoint=cfg.data.s3_endpoint or None)
        meta.check_config(cfg.data)
        if cfg.data.train_subset is not None:
            meta = limit_split(meta, cfg.data.train_split, cfg.data.train_subset)
        check = check_shards(meta, (cfg.data.train_split, cfg.data.val_split), on_corrupt=cfg.data.on_corrupt)
        metas.append(meta)
        skip += list(check.skip_shards)
    return metas, tuple(skip)


def _data_positions(cfg: ExperimentConfig, state: ckpt.TrainState, n_datasets: int, world_size: int,
                    saved_world: int, micro: int) -> list:
    """Each dataset's position to resume from, continued under this run's layout: unchanged on the
    same ranks, workers and micro-batch (bit-exact); else the epoch's stretch so far is closed and
    the rest of it is resharded (data/reshard.py)."""
    from mindeye_dist.data.reshard import DataPosition, Layout

    layout = Layout(world_size, cfg.data.num_workers, micro, cfg.data.shuffle_buffer)
    if state.data:
        saved = [DataPosition.from_dict(d) for d in state.data]
    else:  # a checkpoint from before positions recorded their layout: it was read like this run reads
        old = Layout(saved_world, cfg.data.num_workers, micro, cfg.data.shuffle_buffer)
        pairs = state.positions or [(state.epoch, state.batch_in_epoch)] * (1 if n_datasets == 1 else 0)
        saved = [DataPosition(int(e), int(b), old, (), cfg.run.seed) for e, b in pairs] or \
            [DataPosition(0, 0, layout, (), cfg.run.seed)] * n_datasets
    if len(saved) != n_datasets:
        raise ConfigError(f"the checkpoint was written by a run over {len(saved)} datasets; this run names "
                          f"{n_datasets} (data.url + data.datasets must stay the same to resume)")
    return [p.resumed_under(layout, cfg.run.seed) for p in saved]


def _train_loader(cfg: ExperimentConfig, metas: list, skip_shards: tuple, rank: int, world_size: int,
                  state: ckpt.TrainState, saved_world: int):
    """One exact, resumable stream; several subjects: an equal share of each in every micro-batch."""
    from mindeye_dist.data import build_train_loader
    from mindeye_dist.data.multi import MultiSubjectLoader, per_subject_batch
    from mindeye_dist.data.reshard import describe

    micro = cfg.train.micro_batch_size if len(metas) == 1 else per_subject_batch(cfg.train.micro_batch_size, len(metas))
    positions = _data_positions(cfg, state, len(metas), world_size, saved_world, micro)
    loaders = []
    for meta, pos in zip(metas, positions):
        loader = build_train_loader(cfg.data, micro_batch_size=micro, seed=cfg.run.seed, rank=rank, world_size=world_size,
                                    start_epoch=pos.epoch, start_batch=pos.batch, meta=meta, skip_shards=skip_shards,
                                    legs=pos.legs)
        if pos.legs and rank == 0:
            plan = loader.epoch_plan(pos.epoch)
            log.info("%s: the rest of epoch %d (read so far by %s) is resharded: %d batch(es) per rank%s", meta.url,
                     pos.epoch, describe(pos.legs), plan.n_batches,
                     f", {plan.dropped} sample(s) that do not split evenly left out" if plan.dropped else "")
        loaders.append(loader)
    if len(loaders) == 1:
        return loaders[0]
    return MultiSubjectLoader(loaders, width=max(m.n_voxels for m in metas))


def _fit_ridge_skip(trainer: Trainer, cfg: ExperimentConfig, metas: list, rank: int) -> None:
    """Fill the model's ridge skip (model.ridge_skip_rank) from the training split before step 0:
    rank 0 reads the train and validation splits (repetitions averaged) and fits, every rank gets
    the buffers by broadcast. A resumed run takes them from its checkpoint instead."""
    from mindeye_dist.evaluate import split_arrays
    from mindeye_dist.models.ridge_skip import fit_ridge_skip

    module = trainer.model.ridge_skip
    if len(metas) != 1:
        raise ConfigError(f"model.ridge_skip_rank needs one dataset, this run has {len(metas)}; "
                          f"set model.ridge_skip_rank=0")
    meta = metas[0]
    if cfg.data.val_split not in meta.splits or meta.splits[cfg.data.val_split].count < 2:
        raise ConfigError(f"model.ridge_skip_rank chooses ridge's alpha on the validation split, and "
                          f"{cfg.data.url} has no {cfg.data.val_split!r} split of >= 2 stimuli; "
                          f"write one (prepare_data.py --val-fraction) or set model.ridge_skip_rank=0")
    arrays = None
    if rank == 0:
        train_x, train_y = split_arrays(cfg.data, cfg.data.train_split, meta=meta)
        val_x, val_y = split_arrays(cfg.data, cfg.data.val_split, meta=meta)
        arrays = (train_x, train_y, val_x, val_y)
    info = fit_ridge_skip(module, arrays, rank=rank, way=cfg.eval.retrieval_way, loops=cfg.eval.retrieval_loops,
                          seed=cfg.run.seed)
    if rank == 0:
        log.info("ridge skip fitted on %d training stimuli: alpha %.4g, rank %d of %d (%.4f of the predictions' "
                 "energy), validation top-1 image %.3f / brain %.3f", len(arrays[0]), info["alpha"], info["rank"],
                 module.down.shape[1], info["energy_kept"], info["val_image_top1"], info["val_brain_top1"])


def _improved(metric: str, value: float, best: Optional[float]) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


class _Selection:
    """Best-on-validation bookkeeping (kept in TrainState.best_val so it survives resume)."""

    def __init__(self, cfg: ExperimentConfig, state: ckpt.TrainState):
        self.metric = cfg.checkpoint.best_metric
        self.patience = cfg.train.early_stop_patience
        self.state = state

    def update(self, val: dict[str, float], step: int) -> bool:
        """Record a validation; True when it is the best so far."""
        value = val.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        best = self.state.best_val
        if _improved(self.metric, value, best.get("value")):
            best.update({"metric": self.metric, "value": value, "step": step, "tag": ckpt.tag_for(step),
                         "stale": 0, **{k: v for k, v in val.items() if k.startswith("val/")}})
            return True
        best["stale"] = best.get("stale", 0) + 1
        return False

    def should_stop(self) -> bool:
        return self.patience > 0 and self.state.best_val.get("stale", 0) >= self.patience


def answer_errors(work: Callable[[], Any]) -> int:
    """Run ``work()`` for a launcher: 0, or 1 after one line naming a user-facing error (config, DeepSpeed
    JSON, data, checkpoint, aborted training). An answer, not a traceback: these name the cause and the
    fix. Every rank that hits one says so (the launcher interleaves their stderr), prefixed with its rank."""
    import os

    from mindeye_dist.data.errors import DataError
    from mindeye_dist.ds_config import DSConfigError
    from mindeye_dist.trainer import TrainingAborted

    try:
        work()
    except (ConfigError, DSConfigError, DataError, TrainingAborted, ckpt.CheckpointError) as err:
        print(f"[rank {os.environ.get('RANK', '0')}] {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


def run(cfg: ExperimentConfig, reporter: Optional[Reporter] = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (resuming from ``run.dir`` if it has a checkpoint).

    ``reporter`` (Ray Tune) is called with the logged metrics on every log and validation step.
    Returns the final metrics on every rank (with ``best/*`` when validation ran).
    """
    from mindeye_dist.preemption import Preemption

    if not cfg.data.url:
        raise ConfigError("data.url is empty: point it at a dataset written by launchers/prepare_data.py (local path or s3://)")
    preemption = Preemption().install()  # first: a SIGTERM during setup still ends in a clean exit
    rank, world_size, device = init_distributed()
    failed = True
    watchdog = StallWatchdog(dist_timeout_s(), rank) if world_size > 1 else None
    try:
        result = _run(cfg, reporter, rank, world_size, device, watchdog, preemption)
        failed = False
        return result
    except BaseException as err:
        log.error("rank %d failed: %s: %s", rank, type(err).__name__, err)
        raise
    finally:
        if watchdog is not None:
            watchdog.close()
        teardown_distributed(failed=failed)
        preemption.restore()


def _run(cfg: ExperimentConfig, reporter: Optional[Reporter], rank: int, world_size: int, device: torch.device,
         watchdog: Optional[StallWatchdog], preemption) -> dict[str, Any]:
    from mindeye_dist import hostmem
    from mindeye_dist.ds_config import load_ds_config, offloads_optimizer, resolve_ds_config, write_ds_config, zero_stage
    from mindeye_dist.faults import faults_from_env
    from mindeye_dist.metrics import ProgressBar, build_loggers, device_peak_flops, truncate_jsonl

    from mindeye_dist.fsutil import check_writable_dir

    beat = watchdog.beat if watchdog is not None else (lambda: None)
    run_dir = Path(cfg.run.dir)
    check_writable_dir(run_dir, key="run.dir")  # a file, or not writable: named, before anything starts
    setup_logging(run_dir, rank)
    ds = resolve_ds_config(load_ds_config(cfg.run.ds_config), cfg, world_size)  # fails before allocating
    # before the first large allocation; ZeRO-3 and offloads (memory-bound runs) keep glibc's defaults
    hostmem.apply(cfg.train.host_memory, device.type, memory_bound=zero_stage(ds) == 3 or offloads_optimizer(ds))
    if cfg.train.precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision=fp16 is not supported on CPU (DeepSpeed refuses it, matmuls crawl); use fp32 or bf16")
    metas, skip_shards = _datasets(cfg)
    dims = ModelDims.from_metas(metas)
    ckpt_dir = run_dir / "checkpoints"
    tag = ckpt.read_latest(ckpt_dir)
    if tag is not None:  # resuming with another model or dataset: name each differing setting
        ckpt.check_model_matches(run_dir, cfg.model, dims, data_url=cfg.data.url, tag=tag)
    trainer = Trainer(cfg, dims, rank=rank, world_size=world_size, device=device, ds_config=ds,
                      faults=faults_from_env(), skip_shards=skip_shards)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # The subject table (name -> voxels, in adapter order) is part of the model: it goes with the
        # run so evaluate/export/fine-tune route each dataset to its own adapter.
        table = trainer.model.config.subject_table()
        dump_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, subjects=table)), run_dir / "config.yaml")
        write_ds_config(ds, run_dir / "ds_config.resolved.json")
    resume_rng = None
    if tag is not None:
        resume_rng = trainer.load(ckpt_dir, tag)
        state = trainer.state
        log.info("resumed from %s (step %d, epoch %d, batch %d)", tag, state.step, state.epoch, state.batch_in_epoch)
        if trainer.resumed_from_world != world_size and rank == 0:
            log.warning("the checkpoint was written by %d rank(s), this run has %d: the global batch is now %d samples "
                        "(train.micro_batch_size x train.grad_accum_steps x ranks; scale train.grad_accum_steps to keep "
                        "it); resume is exact in weights, optimizer and data position, not bit-exact",
                        trainer.resumed_from_world, world_size,
                        cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size)
        best_tag = state.best_val.get("tag")
        if rank == 0 and best_tag and ckpt.read_best(ckpt_dir) != best_tag and (ckpt_dir / best_tag / ckpt.COMPLETE).is_file():
            ckpt.mark_best(ckpt_dir, best_tag)  # a kill between writing latest and best
    if tag is None and getattr(trainer.model, "ridge_skip", None) is not None:
        _fit_ridge_skip(trainer, cfg, metas, rank)
    state = trainer.state
    if rank == 0 and cfg.log.jsonl:
        # Steps after the checkpoint were logged by the run that died; they are about to be redone.
        truncate_jsonl(run_dir / "metrics.jsonl", state.step)

    loader = _train_loader(cfg, metas, skip_shards, rank, world_size, state, trainer.resumed_from_world or world_size)
    trainer.attach_loader(loader)
    if os.environ.get(SAMPLE_LOG_ENV):
        trainer.sample_log = SampleLog(run_dir / "logs", rank, world_size, state.step)
    if trainer.resumed_from_world not in (None, world_size) and cfg.train.eval_every_steps:
        # Proof that the conversion kept the model: the same weights give the same validation loss
        # on any number of ranks (what the run that wrote the checkpoint logged at this step).
        val = trainer.validate(metas)
        if val and rank == 0:
            log.info("restored model on %d rank(s) at step %d: val/loss %.6f", world_size, state.step, val["val/loss"])
    trainer.meter.flops_per_sample = _flops_per_sample(cfg, dims)
    trainer.meter.peak_flops = device_peak_flops(device, trainer.engine.dtype) if device.type == "cuda" else None
    loggers = build_loggers(run_dir, rank=rank, tensorboard=cfg.log.tensorboard, jsonl=cfg.log.jsonl,
                            purge_step=state.step + 1 if state.step else None)
    total_steps = cfg.train.max_steps
    bar = ProgressBar(total_steps, enabled=cfg.log.progress, initial=state.step, rank=rank)
    selection = _Selection(cfg, state)
    if rank == 0:
        log.info("%s: %d parameters, %d ranks on %s, ZeRO-%d, %s, %d batches/epoch/rank, %s", run_dir, trainer.n_params,
                 world_size, device, trainer.engine.zero_stage, cfg.train.precision, loader.batches_per_epoch,
                 trainer.engine.optimizer_name)

    def report(metrics: dict[str, Any], step: int) -> None:
        loggers.log(metrics, step)
        if reporter is not None:
            reporter(dict(metrics, step=step))

    trainer.engine.train()
    if resume_rng is not None:
        trainer.restore_rng(resume_rng)  # last thing before the loop
    trainer.meter.start()
    last: dict[str, Any] = {}
    stopped_early = selection.should_stop()  # a resumed run that had already stopped early
    saved_step = state.step if tag is not None else None
    if tag is None and getattr(trainer.model, "ridge_skip", None) is not None and cfg.train.eval_every_steps:
        # Step 0: ridge blended with the untrained MLP (β ~ 1, i.e. the ridge baseline) is a candidate
        # for the best checkpoint, so the selected checkpoint is never below ridge's validation score.
        with trainer.meter.excluded():
            val = trainer.validate(metas)
            if val:
                is_best = selection.update(val, 0)
                report(val, 0)
                bar.print_line(0, val)
                last.update(val)
                if is_best and cfg.checkpoint.select == "best":
                    trainer.save(ckpt_dir, cfg.checkpoint.keep_last, best=True)
                    saved_step = 0
    preempted = False
    while state.step < total_steps and not stopped_early:
        beat()
        if preemption.agreed():  # once per step, every rank: all stop after the same step
            preempted = True
            break
        result = trainer.step()
        bar.update(1)
        step = result.step
        is_last = step == total_steps
        if step % cfg.train.log_every_steps == 0 or is_last:
            metrics = trainer.step_metrics(result)  # collectives: every rank, same steps
            metrics.update(loader.skipped.counts(across_ranks=True, device=device).as_metrics())
            report(metrics, step)
            bar.update(0, loss=metrics.get("loss/total"))
            bar.print_line(step, {k: metrics[k] for k in SHOWN if k in metrics})
            last = metrics
        is_best = False
        if cfg.train.eval_every_steps and (step % cfg.train.eval_every_steps == 0 or is_last):
            beat()
            with trainer.meter.excluded():
                val = trainer.validate(metas)
                if cfg.log.tensorboard and cfg.log.recon_grid:
                    grid = trainer.reconstruction_grid(metas[0], cfg.log.recon_grid)
                    if grid is not None:
                        loggers.log_image("val/reconstructions", grid, step)
            beat()
            if val:
                is_best = selection.update(val, step)
                stopped_early = selection.should_stop()
                report(val, step)
                bar.print_line(step, val)
                last.update(val)
        periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if periodic or is_last or stopped_early or (is_best and cfg.checkpoint.select == "best"):
            with trainer.meter.excluded():
                trainer.save(ckpt_dir, cfg.checkpoint.keep_last, best=is_best and cfg.checkpoint.select == "best")
            saved_step = step
            beat()
    if preempted:
        _checkpoint_on_preemption(trainer, ckpt_dir, cfg, saved_step, preemption)
        last["preempted"] = 1
    bar.close()
    loggers.close()
    if trainer.sample_log is not None:
        trainer.sample_log.close()
    if state.best_val:
        last.update({f"best/{k}": v for k, v in state.best_val.items() if isinstance(v, (int, float))})
    counts = loader.skipped.counts(across_ranks=True, device=device)
    last.update(counts.as_metrics())
    if rank == 0:
        skipped = (f", skipped {counts.shards} corrupt shard(s) ({', '.join(counts.shard_names)}) and "
                   f"{counts.samples} bad sample(s) (data.on_corrupt=skip)") if counts.shards or counts.samples else ""
        early = f", stopped early after {cfg.train.early_stop_patience} validations without improvement" \
            if stopped_early else ""
        best = f", best {state.best_val['metric']} {state.best_val['value']:.4f} at step {state.best_val['step']}" \
            if state.best_val.get("metric") else ""
        stop = (f", stopped by SIGTERM (checkpoint {ckpt.tag_for(state.step)}; the same command resumes)"
                if preempted else "")
        log.info("done: %d steps, %d skipped%s%s%s%s, run dir %s", state.step, state.skipped_steps, skipped, early, best,
                 stop, run_dir)
    return last


def _checkpoint_on_preemption(trainer: Trainer, ckpt_dir: Path, cfg: ExperimentConfig, saved_step: Optional[int],
                              preemption) -> None:
    """Checkpoint the step the ranks agreed to stop after (unless it already is), then say how long it took."""
    step = trainer.state.step
    if step and saved_step != step:
        trainer.save(ckpt_dir, cfg.checkpoint.keep_last)
        what = f"checkpoint {ckpt.tag_for(step)} written"
    else:
        what = f"checkpoint {ckpt.tag_for(step)} already on disk" if step else "no step trained, nothing to save"
    since = preemption.seconds_since()
    log.warning("SIGTERM: stopped after step %d, %s%s; exiting 0", step, what,
                f", {since:.1f} s after the signal reached this rank" if since is not None else " (a peer got the signal)")


class SampleLog:
    """The sample ids of every micro-batch a rank draws, one JSON line each, in
    ``RUN_DIR/logs/samples_rank{R}.jsonl``: ``step``, ``rank``, ``ids`` (``Batch.index``, rows of
    each dataset's split), ``subjects`` (the dataset subject of each id) and ``epochs`` (each
    dataset's epoch before the draw). What exactly-once tests and data audits read; lines of
    steps a resumed run redoes are dropped when it resumes (as metrics.jsonl's are)."""

    def __init__(self, logs: Path, rank: int, world_size: int, resume_step: int = 0):
        from mindeye_dist.metrics import truncate_jsonl

        logs.mkdir(parents=True, exist_ok=True)
        # Steps after the checkpoint are redone: drop them from this rank's file and from those of
        # ranks this run no longer has (rank r also takes ranks r + W, r + 2W, ... of a larger
        # earlier run), so each file is truncated by exactly one rank.
        for path in logs.glob("samples_rank*.jsonl"):
            old = int(path.stem.removeprefix("samples_rank"))
            if old != rank and old >= world_size and old % world_size == rank:
                truncate_jsonl(path, resume_step)
        path = logs / f"samples_rank{rank}.jsonl"
        truncate_jsonl(path, resume_step)
        self._file = open(path, "a", encoding="utf-8")

    def record(self, step: int, rank: int, batch, epochs) -> None:
        import json

        self._file.write(json.dumps({"step": step, "rank": rank, "ids": batch.index.tolist(),
                                     "subjects": batch.subject.tolist(), "epochs": epochs}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
