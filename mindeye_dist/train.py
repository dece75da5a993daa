"""``run(cfg, reporter=None)``: the one training function every launcher calls.

Rank and world come from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``), so the ``deepspeed`` launcher, ``torchrun``, SLURM and Ray Train drive the same
code; a plain ``python`` process runs as a world of one.

Per step: one micro-batch per rank per accumulation step -> (BiMixCo mixup while the schedule
says so) -> engine forward (MindEye + the prior's loss inside one forward, so ZeRO-3's hooks see
every parameter) -> losses -> backward -> step. Non-finite steps are skipped on every rank
together and counted; ``train.max_bad_steps`` in a row abort the run on every rank with the
same message. Metrics are synced to the host only on log steps.

Fault injection for the tests of skipping and resume: ``MINDEYE_FAULTS="nan_loss@3@1,kill@7"``
makes step 3's loss NaN on rank 1 and SIGKILLs every rank at the start of step 7;
``kill_in_save@N`` SIGKILLs after the step-N checkpoint's shards are written but before it is
committed. Steps are numbered from 1, as in metrics.jsonl. Unset in normal runs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from mindeye_dist import checkpoint as ckpt
from mindeye_dist.config import ConfigError, ExperimentConfig, dump_config
from mindeye_dist.distributed import init_distributed, teardown_distributed
from mindeye_dist.ds_config import load_ds_config, resolve_ds_config, write_ds_config

log = logging.getLogger("mindeye_dist.train")

Reporter = Callable[[dict[str, Any]], None]
SHOWN = ("loss/total", "loss/contrastive", "loss/prior", "loss/lowlevel", "lr", "perf/samples_per_s",
         "perf/data_wait_share", "perf/flops_per_s", "skipped_steps")
"""Metrics on the one-line progress print; everything goes to metrics.jsonl and TensorBoard."""
REPO_ROOT = Path(__file__).resolve().parents[1]


class TrainingAborted(RuntimeError):
    """Raised on every rank together when training cannot continue (e.g. too many bad steps)."""


# --------------------------------------------------------------------------------------------
# Setup helpers


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the working directory, then in the repository."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


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


@dataclass
class Faults:
    nan_loss: dict[int, Optional[int]]
    kill: set[int]
    kill_in_save: set[int]

    @classmethod
    def from_env(cls) -> "Faults":
        faults = cls({}, set(), set())
        for item in filter(None, os.environ.get("MINDEYE_FAULTS", "").split(",")):
            kind, *rest = item.strip().split("@")
            step = int(rest[0])
            if kind == "nan_loss":
                faults.nan_loss[step] = int(rest[1]) if len(rest) > 1 else None
            elif kind == "kill":
                faults.kill.add(step)
            elif kind == "kill_in_save":
                faults.kill_in_save.add(step)
            else:
                raise ValueError(f"MINDEYE_FAULTS: unknown fault {kind!r}")
        return faults

    def poison(self, step: int, rank: int) -> bool:
        return step in self.nan_loss and self.nan_loss[step] in (None, rank)


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of a dict of floats (one collective)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


# --------------------------------------------------------------------------------------------
# What the engine runs


class TrainingModel(nn.Module):
    """MindEye plus its prior's loss in one forward.

    ZeRO-3 gathers a module's parameters in that module's forward hooks, so the prior's loss
    must run inside a forward the engine calls. Export strips the ``model.`` prefix.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, voxels: torch.Tensor, subject: torch.Tensor, prior_target: Optional[torch.Tensor] = None):
        out = self.model(voxels, subject)
        prior_loss = None
        if getattr(self.model, "prior", None) is not None and prior_target is not None:
            prior_loss, _ = self.model.prior(out.backbone, prior_target)
        return out, prior_loss

    def no_weight_decay_names(self) -> set[str]:
        inner = getattr(self.model, "no_weight_decay_names", None)
        return {f"model.{n}" for n in inner()} if callable(inner) else set()


def build_model_for_engine(model_cfg, ds: dict[str, Any], precision: str, **build_kwargs: Any) -> nn.Module:
    """The MindEye model as the engine trains it; ``build_kwargs`` go to ``models.build_model``.

    Call it after seeding torch identically on every rank. For ZeRO-3 (``ds`` is the resolved
    DeepSpeed config) the model is built under ``deepspeed.zero.Init``: right after each module's
    ``__init__`` its parameters are broadcast from rank 0 and partitioned, so no rank ever holds
    the whole model. Without it every rank builds the full fp32 model (4 bytes per parameter,
    20 GiB per rank at scale-5b) and DeepSpeed partitions it only inside ``deepspeed.initialize``;
    under ``train.host_memory=reuse`` (the CPU default) that build peak also stays in the
    process's resident memory for the whole run. Initial weights are unchanged: the same
    constructors run in the same order on the same RNG, and each rank keeps its slice of rank 0's
    tensor (the path without zero.Init broadcasts from rank 0 too).

    ``tensor_overrides=[]`` keeps construction itself unchanged: by default zero.Init also
    creates every floating tensor made during ``__init__`` (``torch.tensor``, ``torch.arange``, ...)
    in the training dtype, which would turn the prior's noise schedule (diffusers'
    ``alphas_cumprod``, not a parameter) into bf16. The partitions are cast to the training dtype
    afterwards instead, exactly the cast ``DeepSpeedEngine`` applies to a model built without
    zero.Init (fp32 values rounded once). The config's ``memory_efficient_linear`` (DeepSpeed's
    default: on) applies as it does when the engine partitions the model itself: it swaps
    ``torch.nn.functional.linear`` for a version whose backward does not keep the gathered weight
    alive (without it the fp32 step peak of scale-200m at 2 ranks grows by 0.4 GiB).
    """
    from mindeye_dist.ds_config import zero_stage
    from mindeye_dist.models import build_model

    if zero_stage(ds) != 3:
        return build_model(model_cfg, **build_kwargs)
    import deepspeed
    from deepspeed.runtime.zero.utils import is_zero_param

    from mindeye_dist.engine import compute_dtype

    with deepspeed.zero.Init(config_dict_or_path=ds, tensor_overrides=[]):
        model = build_model(model_cfg, **build_kwargs)
    dtype = compute_dtype(precision)
    for param in model.parameters():
        if not is_zero_param(param):
            raise RuntimeError("deepspeed.zero.Init left a parameter unpartitioned")
        if param.ds_tensor.dtype != dtype and param.ds_tensor.is_floating_point():
            # ds_tensor is this rank's partition; param.data is an empty placeholder whose dtype
            # DeepSpeed uses for the all-gather buffers, so both change together.
            param.ds_tensor.data = param.ds_tensor.data.to(dtype)
            param.data = param.data.to(dtype)
    return model


# --------------------------------------------------------------------------------------------
# The run


def run(cfg: ExperimentConfig, reporter: Optional[Reporter] = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (resuming from ``run.dir`` if it has a checkpoint).

    ``reporter`` (Ray Tune) is called with the logged metrics on every log and eval step.
    Returns the final metrics on every rank.
    """
    from mindeye_dist.data import build_train_loader, read_meta
    from mindeye_dist.losses import MindEyeLoss
    from mindeye_dist.metrics import ProgressBar, ThroughputMeter, build_loggers, device_peak_flops, memory_stats

    if not cfg.data.url:
        raise ConfigError("data.url is empty: point it at a dataset written by launchers/prepare_data.py (local path or s3://)")
    run_dir = Path(cfg.run.dir)
    rank, world_size, device = init_distributed()
    try:
        setup_logging(run_dir, rank)
        from mindeye_dist import hostmem

        hostmem.apply(cfg.train.host_memory, device.type)  # before the first large allocation
        ds_raw = load_ds_config(resolve_path(cfg.run.ds_config))
        ds = resolve_ds_config(ds_raw, cfg, world_size)  # fails before anything is allocated
        if cfg.train.precision == "fp16" and device.type == "cpu":
            raise ConfigError("train.precision=fp16 is not supported on CPU (DeepSpeed refuses it, matmuls crawl); use fp32 or bf16")
        meta = read_meta(cfg.data.url, s3_endpoint=cfg.data.s3_endpoint or None)
        meta.check_config(cfg.data)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")
            write_ds_config(ds, run_dir / "ds_config.resolved.json")
        _barrier()

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = build_model_for_engine(cfg.model, ds, cfg.train.precision, n_voxels=meta.n_voxels,
                                       n_tokens=meta.n_tokens, token_dim=meta.token_dim,
                                       lowlevel_shape=meta.field_shape("vae"))
        train_model = TrainingModel(model)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: ZeRO-3 partitioned
        total_steps = cfg.train.max_steps
        from mindeye_dist.engine import DeepSpeedEngine

        engine = DeepSpeedEngine(train_model, cfg, ds, total_steps, device)
        loss_fn = MindEyeLoss(cfg.loss, total_steps)
        loss_gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + rank)
        ckpt_dir = run_dir / "checkpoints"

        state = ckpt.TrainState(total_steps=total_steps, world_size=world_size)
        resume_rng = None
        tag = ckpt.read_latest(ckpt_dir)
        if tag is not None:
            state, rng = ckpt.read_rank_state(ckpt_dir, tag, rank)
            if state.world_size != world_size:
                raise ConfigError(f"checkpoint {tag} was written by {state.world_size} ranks; this run has {world_size}. "
                                  "Resume with the same number of ranks.")
            if state.total_steps != total_steps:
                raise ConfigError(f"train.max_steps={total_steps} but the run in {run_dir} was started with "
                                  f"{state.total_steps}: the LR and loss schedules cannot be stretched. Use a new run.dir.")
            engine.load(ckpt_dir, tag)
            engine.load_scheduler_state(rng.pop("scheduler"))
            resume_rng = rng
            log.info("resumed from %s (step %d, epoch %d, batch %d)", tag, state.step, state.epoch, state.batch_in_epoch)

        loader = build_train_loader(cfg.data, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed, rank=rank,
                                    world_size=world_size, start_epoch=state.epoch, start_batch=state.batch_in_epoch)
        batches_per_epoch = loader.batches_per_epoch
        if batches_per_epoch < 1:
            raise ConfigError(f"train split has too few samples for micro_batch_size={cfg.train.micro_batch_size} "
                              f"× {world_size} ranks: lower train.micro_batch_size")
        flops_per_sample = _flops_per_sample(cfg, meta)
        peak = device_peak_flops(device, engine.dtype) if device.type == "cuda" else None
        meter = ThroughputMeter(world_size=world_size, flops_per_sample=flops_per_sample, peak_flops=peak)
        loggers = build_loggers(run_dir, rank=rank, tensorboard=cfg.log.tensorboard, jsonl=cfg.log.jsonl)
        bar = ProgressBar(total_steps, enabled=cfg.log.progress, initial=state.step, rank=rank)
        faults = Faults.from_env()
        if rank == 0:
            log.info("%s: %d parameters, %d ranks on %s, ZeRO-%d, %s, %d batches/epoch/rank, %s", run_dir, n_params,
                     world_size, device, engine.zero_stage, cfg.train.precision, batches_per_epoch, engine.optimizer_name)

        def save(step: int) -> None:
            with meter.excluded():
                tag_ = ckpt.tag_for(step)
                if rank == 0:
                    ckpt.prepare_tag_dir(ckpt_dir, tag_)
                _barrier()
                engine.save(ckpt_dir, tag_)
                rng_ = ckpt.rng_state({"loss": loss_gen})
                rng_["scheduler"] = engine.scheduler_state()
                ckpt.write_rank_state(ckpt_dir, tag_, rank, state, rng_)
                _barrier()
                if step in faults.kill_in_save:
                    _kill_self()
                if rank == 0:
                    removed = ckpt.commit(ckpt_dir, tag_, cfg.checkpoint.keep_last)
                    log.info("checkpoint %s saved%s", tag_, f" (pruned {', '.join(removed)})" if removed else "")
                _barrier()

        engine.train()
        data_iter = iter(loader)
        if resume_rng is not None:
            # Last thing before the loop: setup (loader, FLOP count, loggers) may draw random numbers.
            ckpt.set_rng_state(resume_rng, {"loss": loss_gen})
        meter.start()
        last: dict[str, Any] = {}
        while state.step < total_steps:
            step = state.step  # 0-based: drives the loss schedule; logs and faults use step + 1
            if step + 1 in faults.kill:
                _kill_self()
            applied = True
            for _ in range(cfg.train.grad_accum_steps):
                with meter.data_wait():
                    batch = next(data_iter).to(device)
                state.batch_in_epoch += 1
                if state.batch_in_epoch >= batches_per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                state.samples_seen += len(batch) * world_size
                terms = _forward_loss(engine, loss_fn, batch, step, loss_gen)
                loss = terms.total
                if faults.poison(step + 1, rank):
                    loss = loss * float("nan")
                engine.backward(loss)
                applied = engine.step()
            meter.step(len(batch) * cfg.train.grad_accum_steps)
            state.step += 1
            if applied:
                state.consecutive_bad = 0
            else:
                state.skipped_steps += 1
                state.consecutive_bad += 1
                log.warning("step %d skipped: non-finite loss or gradients on some rank (%d in a row)", state.step, state.consecutive_bad)
                if state.consecutive_bad >= cfg.train.max_bad_steps:
                    raise TrainingAborted(
                        f"{state.consecutive_bad} consecutive steps had non-finite loss or gradients (train.max_bad_steps="
                        f"{cfg.train.max_bad_steps}); stopping at step {state.step}. Lower optim.max_lr, check the data "
                        f"for NaN/inf, or resume from {ckpt_dir / 'latest'}.")
            bar.update(1)
            is_last = state.step == total_steps
            if state.step % cfg.train.log_every_steps == 0 or is_last:
                metrics = _all_mean({k: float(v) for k, v in terms.as_dict().items()}, device)
                metrics.update({f"perf/{k}": v for k, v in meter.report(sync_device=device).items() if isinstance(v, (int, float))})
                metrics.update({"lr": engine.lr(), "grad_norm": engine.grad_norm() or 0.0, "epoch": state.epoch,
                                "samples_seen": state.samples_seen, "skipped_steps": state.skipped_steps,
                                "loss/phase_bimixco": float(terms.phase == "bimixco")})
                metrics.update({f"mem/{k}": v for k, v in memory_stats(device).items()})
                loggers.log(metrics, state.step)
                bar.update(0, loss=metrics.get("loss/total"))
                bar.print_line(state.step, {k: metrics[k] for k in SHOWN if k in metrics})
                last = metrics
                if reporter is not None:
                    reporter(dict(metrics, step=state.step))
            if cfg.train.eval_every_steps and (state.step % cfg.train.eval_every_steps == 0 or is_last):
                with meter.excluded():
                    val = _validate(engine, cfg, meta, device)
                if val:
                    loggers.log(val, state.step)
                    bar.print_line(state.step, val)
                    last.update(val)
                    if reporter is not None:
                        reporter(dict(val, step=state.step))
                engine.train()
            if (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or is_last:
                save(state.step)
        bar.close()
        loggers.close()
        if rank == 0:
            log.info("done: %d steps, %d skipped, run dir %s", state.step, state.skipped_steps, run_dir)
        return last
    finally:
        teardown_distributed()


def _forward_loss(engine, loss_fn, batch, step: int, generator: torch.Generator):
    """Mixup (BiMixCo phase), the engine forward, and every loss term for one micro-batch."""
    voxels, mix = loss_fn.mix(step, batch.voxels, generator, batch.subject)
    out, prior_loss = engine(voxels.to(engine.dtype), batch.subject, batch.targets.to(engine.dtype))
    lowlevel_pred = getattr(out, "lowlevel", None)
    return loss_fn(step, out.projector.float(), batch.targets, mix=mix,
                   prior=None if prior_loss is None else prior_loss.float(),
                   lowlevel_pred=None if lowlevel_pred is None or batch.vae is None else lowlevel_pred.float(),
                   lowlevel_target=batch.vae)


def _flops_per_sample(cfg: ExperimentConfig, meta) -> Optional[float]:
    """Training FLOPs per sample, counted once on the meta device (no memory, no side effects)."""
    try:
        from mindeye_dist.estimate import estimate

        est = estimate(cfg.model, n_voxels=meta.n_voxels, n_tokens=meta.n_tokens, token_dim=meta.token_dim,
                       lowlevel_shape=meta.field_shape("vae"))
        return float(est["flops"]["total"])
    except Exception as err:  # never fail a run over a metric
        log.warning("could not count FLOPs per sample (%s); TFLOP/s and MFU will not be logged", err)
        return None


@torch.no_grad()
def _validate(engine, cfg: ExperimentConfig, meta, device: torch.device) -> dict[str, float]:
    """Retrieval on the validation split (held out from train; the test split is never used here).

    Every rank embeds the same rows in lock-step (ZeRO-3 gathers parameters collectively);
    rank-local work is identical, so every rank gets the same metrics.
    """
    from mindeye_dist.data import build_eval_loader
    from mindeye_dist.evaluate import retrieval_accuracy

    split = cfg.data.val_split
    if split not in meta.splits or meta.split(split).count == 0:
        return {}
    engine.eval()
    preds, targets = [], []
    for batch in build_eval_loader(cfg.data, split, batch_size=cfg.eval.batch_size):
        batch = batch.to(device)
        out, _ = engine(batch.voxels.to(engine.dtype), batch.subject)
        preds.append(out.projector.float().cpu())
        targets.append(batch.targets.float().cpu())
    preds_t, targets_t = torch.cat(preds), torch.cat(targets)
    way = min(cfg.eval.retrieval_way, len(preds_t))
    res = retrieval_accuracy(preds_t, targets_t, way=way, loops=cfg.eval.retrieval_loops, seed=cfg.run.seed)
    return {f"val/image_top1": res["image_top1"], f"val/brain_top1": res["brain_top1"], "val/way": way}
