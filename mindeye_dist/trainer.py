"""The training step every caller uses: build, step, evaluate, save.

``train.run`` (every launcher and the Ray sweeps), the benchmark harness and the tests drive
training through this one surface, so what is measured is what users run::

    trainer = Trainer(cfg, ModelDims.from_meta(meta), rank=rank, world_size=world, device=device)
    trainer.attach_loader(build_train_loader(...))      # or pass batches to step() yourself
    result = trainer.step()                             # one optimizer step (grad_accum micro-batches)
    metrics = trainer.validate(meta)                    # retrieval and loss on the validation split
    tag = trainer.save(run_dir / "checkpoints", keep_last=2)

What one step does, per micro-batch: BiMixCo mixup while the loss schedule says so -> the
engine's forward (MindEye and the prior's loss inside one forward, so ZeRO-3's hooks see every
parameter) -> every loss term -> backward -> engine step (DeepSpeed decides where the
accumulation boundary is). Non-finite steps are skipped on every rank together and counted;
``train.max_bad_steps`` in a row raise :class:`TrainingAborted` on every rank with the same
message. Nothing here syncs the device; loss terms come back as device tensors.

Components with a no-op default keep the step free of "is X on" branches: ``faults``
(:mod:`mindeye_dist.faults`, for the tests of skipping and resume) and ``timer`` (phase
timestamps, for the benchmark's forward/backward/optimizer split).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from mindeye_dist import checkpoint as ckpt
from mindeye_dist.config import ExperimentConfig
from mindeye_dist.errors import ConfigError
from mindeye_dist.faults import NO_FAULTS, Faults

log = logging.getLogger("mindeye_dist.trainer")


class TrainingAborted(RuntimeError):
    """Raised on every rank together when training cannot continue (e.g. too many bad steps)."""


@dataclass(frozen=True)
class ModelDims:
    """The data dimensions a model is built for (from a dataset's meta.json or a preset's nominal dims)."""

    n_voxels: Optional[int] = None
    n_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    lowlevel_shape: Optional[tuple[int, ...]] = None
    nominal: bool = False
    """Fill dims nobody gave from the preset's nominal ones (estimates and benchmarks, no dataset)."""
    subjects: Optional[tuple[tuple[str, int], ...]] = None
    """The datasets' subjects ((name, n_voxels), ...), routed to the model's adapters by name."""
    teacher_shape: Optional[tuple[int, ...]] = None
    """(N, F) of the datasets' low-level teacher tokens (SoftCont), when they have them."""

    @classmethod
    def from_meta(cls, meta) -> "ModelDims":
        return cls.from_metas([meta])

    @classmethod
    def from_metas(cls, metas) -> "ModelDims":
        """The dims of one or several datasets (one subject each); targets must agree across them."""
        from mindeye_dist.data.multi import subject_table

        first = metas[0]
        shape = first.field_shape("vae")
        for meta in metas[1:]:
            if (meta.n_tokens, meta.token_dim) != (first.n_tokens, first.token_dim) or meta.field_shape("vae") != shape:
                raise ConfigError(f"datasets disagree on their targets: {first.url} has {first.n_tokens}x{first.token_dim} "
                                  f"tokens and VAE latents {shape}, {meta.url} {meta.n_tokens}x{meta.token_dim} and "
                                  f"{meta.field_shape('vae')}; one run trains one target space")
        table = subject_table(metas)
        teachers = {m.field_shape("teacher") for m in metas}
        teacher = teachers.pop() if len(teachers) == 1 else None  # SoftCont needs it in every dataset
        return cls(first.n_voxels if len(metas) == 1 else None, first.n_tokens, first.token_dim,
                   tuple(shape) if shape else None, subjects=tuple(table.items()),
                   teacher_shape=tuple(teacher) if teacher else None)

    def kwargs(self) -> dict[str, Any]:
        return {"n_voxels": None if self.subjects else self.n_voxels, "n_tokens": self.n_tokens,
                "token_dim": self.token_dim, "lowlevel_shape": list(self.lowlevel_shape) if self.lowlevel_shape else None,
                "nominal": self.nominal, "subjects": dict(self.subjects) if self.subjects else None}


class PhaseTimer:
    """No timing: ``start`` and ``mark`` are no-ops (the benchmark passes a timer that records)."""

    def start(self) -> None:
        """A micro-step begins."""

    def mark(self, phase: str) -> None:
        """``phase`` (forward_loss, backward, optimizer_step) of the current micro-step ended."""


@dataclass
class StepResult:
    step: int
    """Steps completed, this one included (1-based, as in metrics.jsonl)."""
    applied: bool
    """False when the update was skipped (non-finite loss or gradients on some rank)."""
    terms: Any
    """The last micro-batch's :class:`mindeye_dist.losses.LossTerms` (device tensors)."""
    samples: int
    """This rank's samples in the step."""


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
    the whole model. Without it every rank builds the full fp32 model (20 GiB per rank at
    scale-5b) and DeepSpeed partitions it only inside ``deepspeed.initialize``. Initial weights
    are unchanged: the same constructors run in the same order on the same RNG, and each rank
    keeps its slice of rank 0's tensor. (A module is still created whole before it is
    partitioned: the output Linear is built in ``model.output_tiles`` tiles so that this transient
    is one tile, 0.4 GB in fp32 at MindEye1 size, not 3.2 GB.)

    ``tensor_overrides=[]`` keeps construction itself unchanged: by default zero.Init also
    creates every floating tensor made during ``__init__`` in the training dtype, which would turn
    the prior's noise schedule (diffusers' ``alphas_cumprod``, not a parameter) into bf16. The
    partitions are cast to the training dtype afterwards instead, exactly the cast
    ``DeepSpeedEngine`` applies to a model built without zero.Init. With parameters offloaded to
    NVMe, zero.Init already wrote each partition to its swap file in the training dtype (the swapper's
    dtype); only the placeholder's dtype is set then.

    On a host without an accelerator, parameters, optimizer states and everything "offloaded to the
    host" share one RAM; before allocating anything, every rank compares ``estimate_memory``'s
    per-rank peak (device + host) times the ranks on this node with ``MemAvailable`` and all ranks
    refuse together with the numbers if it cannot fit (``mindeye_dist.estimate.check_host_memory``),
    instead of meeting the kernel's OOM killer inside ``deepspeed.initialize``.
    """
    from mindeye_dist.ds_config import zero_stage
    from mindeye_dist.estimate import check_host_memory
    from mindeye_dist.models import build_model

    check_host_memory(model_cfg, ds, precision, **build_kwargs)
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
        on_nvme = getattr(param.ds_tensor, "final_location", None) is not None  # OffloadDeviceEnum.nvme
        if not on_nvme and param.ds_tensor.dtype != dtype and param.ds_tensor.is_floating_point():
            # ds_tensor is this rank's partition; param.data is an empty placeholder whose dtype
            # DeepSpeed uses for the all-gather buffers, so both change together.
            param.ds_tensor.data = param.ds_tensor.data.to(dtype)
        if param.data.dtype != dtype and param.data.is_floating_point():
            param.data = param.data.to(dtype)
    return model


def forward_loss(engine, loss_fn, batch, step: int, generator: torch.Generator):
    """Mixup (BiMixCo phase), ``engine``'s forward and every loss term for one micro-batch.

    ``engine`` is anything callable like the DeepSpeed engine with a ``dtype`` (the benchmark's
    reference loop passes the bare module); ``step`` is 0-based and drives the loss schedule.
    """
    voxels, mix = loss_fn.mix(step, batch.voxels, generator, batch.subject)
    out, prior_loss = engine(voxels.to(engine.dtype), batch.subject, batch.targets.to(engine.dtype))
    lowlevel_pred = getattr(out, "lowlevel", None)
    lowlevel = lowlevel_pred is not None and batch.vae is not None
    # SoftCont: the low-level head's feature tokens against the precomputed teacher tokens of the
    # clean image, on both sides (MindEye draws a fresh augmentation of the image for one side each
    # step; precomputed targets cannot, see README "Where we deliberately differ").
    teacher = batch.teacher if lowlevel and getattr(out, "lowlevel_features", None) is not None else None
    return loss_fn(step, out.projector.float(), batch.targets, mix=mix,
                   prior=None if prior_loss is None else prior_loss.float(),
                   lowlevel_pred=lowlevel_pred.float() if lowlevel else None, lowlevel_target=batch.vae,
                   student=None if teacher is None else out.lowlevel_features.float(), teacher=teacher,
                   teacher_aug=teacher)


def check_teacher(model_cfg, dims: ModelDims) -> None:
    """The datasets' teacher tokens must be what the low-level head's feature projector makes."""
    if dims.teacher_shape is None or not model_cfg.lowlevel:
        return
    h, w = model_cfg.lowlevel_map_size()
    want = (h * w, model_cfg.lowlevel_feature_dim)
    if tuple(dims.teacher_shape) != want:
        raise ConfigError(f"the datasets' teacher tokens are {tuple(dims.teacher_shape)} (meta.json 'teacher'), but the "
                          f"low-level head makes {want} feature tokens (its {h}x{w} map, model.lowlevel_feature_dim="
                          f"{model_cfg.lowlevel_feature_dim}): rebuild the teacher targets at that grid and width, or set "
                          "model.lowlevel_feature_dim / model.lowlevel_channels to match")


def subject_lookup(model, dims: ModelDims) -> torch.Tensor:
    """Dataset subject number -> the model's adapter index (-1: no dataset of this run has it).

    A one-subject model takes its one dataset whatever its number; otherwise each dataset's
    subject is looked up by name in the model's table (never by position).
    """
    names = model.config.subject_names()
    if dims.subjects is None:  # no datasets (benchmarks): batches already carry adapter indices
        return torch.arange(len(names), dtype=torch.long)
    table = dict(dims.subjects)
    numbers = {}
    for name in table:
        digits = name[4:] if name.startswith("subj") and name[4:].isdigit() else None
        numbers[name] = int(digits) if digits is not None else None
    size = max([n for n in numbers.values() if n is not None] + [0]) + 1
    lookup = torch.full((max(size, 1),), -1, dtype=torch.long)
    if len(names) == 1:
        return torch.zeros(max(size, 256), dtype=torch.long)  # one adapter: every sample goes to it
    for name, number in numbers.items():
        if number is None:
            raise ConfigError(f"subject {name!r} has no number: multi-subject datasets need numeric subjects in meta.json")
        if name not in names:
            raise ConfigError(f"the data holds subject {name}, which the model has no adapter for ({names})")
        lookup[number] = names.index(name)
    return lookup


def init_weights(model: nn.Module, source: str) -> None:
    """Load ``source`` (an export, or a run directory's best/latest checkpoint) into ``model``:
    adapters of subjects ``model`` has and the source lacks stay fresh, the source's other
    adapters are dropped, everything else must match in name and shape (ConfigError otherwise).
    Under ZeRO-3 (parameters partitioned by zero.Init) rank 0's full copy is scattered."""
    from mindeye_dist.models.subjects import SubjectAdapters, adapter_key_subject

    state = _source_state_dict(source)
    prefixes = [name for name, module in model.named_modules() if isinstance(module, SubjectAdapters)]
    names = set(model.config.subject_names())
    kept = {k: v for k, v in state.items() if adapter_key_subject(k, prefixes) in (None, *names)}
    params = dict(model.named_parameters())
    own = {k: tuple(getattr(params[k], "ds_shape", params[k].shape)) if k in params else tuple(v.shape)
           for k, v in model.state_dict().items()}  # ZeRO-3: a partitioned parameter's full shape is ds_shape
    missing = [k for k in own if k not in kept and adapter_key_subject(k, prefixes) is None]
    extra = [k for k in kept if k not in own]
    shapes = [f"{k}: source {tuple(v.shape)}, model {own[k]}" for k, v in kept.items()
              if k in own and tuple(v.shape) != own[k]]
    if missing or extra or shapes:
        raise ConfigError(f"train.init_from={source}: the weights do not fit this model apart from subject adapters: "
                          f"missing {missing[:5]}, unexpected {extra[:5]}, other shapes {shapes[:5]} (check model.* "
                          "against the source run's config.yaml)")
    fresh = sorted(names - {adapter_key_subject(k, prefixes) for k in state if adapter_key_subject(k, prefixes)})
    import contextlib

    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for k, p in params.items() if k in kept], modifier_rank=0)
    with gathered, torch.no_grad():
        for k, t in list(params.items()) + list(model.named_buffers()):
            if k in kept:
                t.data.copy_(kept[k].to(t.dtype))
    log.info("initialised from %s (%d tensors)%s", source, len(kept),
             f"; fresh adapters for {', '.join(fresh)}" if fresh else "")


def _source_state_dict(source: str) -> dict[str, torch.Tensor]:
    from pathlib import Path as _Path

    path = _Path(source)
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))
    ckpt_dir = path / "checkpoints"
    tag = ckpt.read_best(ckpt_dir) or ckpt.read_latest(ckpt_dir)
    if tag is None:
        raise ConfigError(f"train.init_from={source}: neither an export (.safetensors) nor a run directory with a "
                          f"complete checkpoint")
    state = ckpt.consolidated_state_dict(ckpt_dir, tag)
    return {k.removeprefix("model."): v for k, v in state.items()}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of a dict of floats (one collective)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class Trainer:
    """One model, its engine, loss and train state; the step, validation and checkpoints.

    Build it on every rank after ``init_distributed`` (``rank``/``world_size``/``device`` are what
    that returned). ``ds_config`` is the resolved DeepSpeed dict; by default the one
    ``cfg.run.ds_config`` names is loaded and resolved here.
    """

    def __init__(self, cfg: ExperimentConfig, dims: ModelDims, *, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), ds_config: Optional[dict[str, Any]] = None,
                 faults: Faults = NO_FAULTS, timer: Optional[PhaseTimer] = None, engine_options=None,
                 skip_shards: tuple = ()):
        from mindeye_dist.ds_config import load_ds_config, resolve_ds_config
        from mindeye_dist.engine import DeepSpeedEngine
        from mindeye_dist.losses import MindEyeLoss
        from mindeye_dist.metrics import ThroughputMeter

        self.cfg, self.dims = cfg, dims
        self.skip_shards = tuple(skip_shards)  # found missing or short at start (data.on_corrupt=skip)
        self._ridge_val: dict[tuple, torch.Tensor] = {}  # ridge skip's validation outputs, per split
        self.rank, self.world_size, self.device = rank, world_size, device
        self.faults, self.timer = faults, timer or PhaseTimer()
        if ds_config is None:
            ds_config = resolve_ds_config(load_ds_config(cfg.run.ds_config), cfg, world_size)
        self.ds_config = ds_config
        total_steps = cfg.train.max_steps
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.model = build_model_for_engine(cfg.model, ds_config, cfg.train.precision, **dims.kwargs())
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())  # ZeRO-3: ds_numel
        check_teacher(self.model.config, dims)
        if cfg.train.init_from:
            init_weights(self.model, cfg.train.init_from)
        self.subject_lookup = subject_lookup(self.model, dims)
        self.engine = DeepSpeedEngine(TrainingModel(self.model), cfg, ds_config, total_steps, device, engine_options)
        self.loss_fn = MindEyeLoss(cfg.loss, total_steps)
        self.loss_gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + rank)
        self.state = ckpt.TrainState(total_steps=total_steps, world_size=world_size)
        self.meter = ThroughputMeter(world_size=world_size)
        self.loader = None
        self._batches: Optional[Iterator] = None

    # ------------------------------------------------------------------ the step

    def attach_loader(self, loader) -> None:
        """Draw the step's micro-batches from ``loader`` (a TrainLoader started at the state's position)."""
        self.loader = loader
        self._batches = iter(loader)

    resumed_from_world: Optional[int] = None
    """After :meth:`load`: the number of ranks that wrote the checkpoint."""
    sample_log: Optional[Any] = None
    """When set, ``record(step, rank, batch, epochs)`` is called for every drawn micro-batch
    (train.SampleLog, switched on by MINDEYE_SAMPLE_LOG)."""

    def _draw(self) -> Iterator:
        """Micro-batches from the attached loader, timed as data wait, moving the data position."""
        if self._batches is None:
            raise RuntimeError("Trainer.step() without batches needs attach_loader() first")
        records = getattr(self.loader, "position_records", None)
        while True:
            epochs = [r.epoch for r in records] if self.sample_log is not None and records is not None else None
            with self.meter.data_wait():
                batch = next(self._batches)
            position = self.loader.position
            if isinstance(position, list):  # several subjects: one exact epoch stream each
                self.state.positions = [list(p) for p in position]
                position = position[0]
            self.state.epoch, self.state.batch_in_epoch = position
            if records is not None:
                records = self.loader.position_records
                self.state.data = [r.to_dict() for r in records]
            if self.sample_log is not None:
                self.sample_log.record(self.state.step + 1, self.rank, batch, epochs)
            yield batch

    def route(self, batch):
        """``batch`` with its datasets' subject numbers replaced by the model's adapter indices."""
        import dataclasses

        lookup = self.subject_lookup
        if len(self.model.config.subject_names()) == 1:  # one adapter takes every batch, whatever its number
            return dataclasses.replace(batch, subject=torch.zeros_like(batch.subject))
        ids = batch.subject.clamp(0, len(lookup) - 1)
        adapters = lookup.to(batch.subject.device)[ids]
        if bool(((batch.subject >= len(lookup)) | (adapters < 0)).any()):
            raise ConfigError(f"a batch holds subject(s) {sorted(set(batch.subject.tolist()))} that no dataset of this "
                              f"run declared; the model's subjects are {self.model.config.subject_names()}")
        return dataclasses.replace(batch, subject=adapters)

    def forward_loss(self, batch):
        """Mixup (BiMixCo phase), the engine forward and every loss term for one micro-batch."""
        return forward_loss(self.engine, self.loss_fn, self.route(batch), self.state.step, self.loss_gen)

    def step(self, batches: Optional[Iterable] = None) -> StepResult:
        """One optimizer step over ``train.grad_accum_steps`` micro-batches (from the attached
        loader, or ``batches``); raises :class:`TrainingAborted` after too many bad steps."""
        accum = self.cfg.train.grad_accum_steps
        number = self.state.step + 1
        self.faults.at_step_start(number, self.rank)
        if batches is None:
            source = self._draw()
        else:
            batches = list(batches)
            if len(batches) != accum:
                raise ValueError(f"step() got {len(batches)} micro-batches; train.grad_accum_steps={accum}")
            source = iter(batches)
        applied, samples, terms = True, 0, None
        for _ in range(accum):
            batch = next(source).to(self.device)
            self.timer.start()
            terms = self.forward_loss(batch)
            loss = self.faults.poison(terms.total, number, self.rank)
            self.timer.mark("forward_loss")
            self.engine.backward(loss)
            self.timer.mark("backward")
            applied = self.engine.step()
            self.timer.mark("optimizer_step")
            samples += len(batch)
        self.meter.step(samples)
        state = self.state
        state.samples_seen += samples * self.world_size
        state.step += 1
        if applied:
            state.consecutive_bad = 0
        else:
            state.skipped_steps += 1
            state.consecutive_bad += 1
            log.warning("step %d skipped: non-finite loss or gradients on some rank (%d in a row)", state.step,
                        state.consecutive_bad)
            if state.consecutive_bad >= self.cfg.train.max_bad_steps:
                raise TrainingAborted(
                    f"{state.consecutive_bad} consecutive steps had non-finite loss or gradients (train.max_bad_steps="
                    f"{self.cfg.train.max_bad_steps}); stopping at step {state.step}. Lower optim.max_lr, check the "
                    f"data for NaN/inf, or resume from the last checkpoint.")
        return StepResult(state.step, applied, terms, samples)

    def step_metrics(self, result: StepResult) -> dict[str, float]:
        """The logged metrics of a step: loss terms averaged over ranks (one collective; host sync),
        throughput of the window since the last call, LR, grad norm, progress counters."""
        from mindeye_dist.metrics import memory_stats

        state = self.state
        metrics = all_mean({k: float(v) for k, v in result.terms.as_dict().items()}, self.device)
        report = self.meter.report(sync_device=self.device)
        metrics.update({f"perf/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
        metrics.update({"lr": self.engine.lr(), "grad_norm": self.engine.grad_norm() or 0.0, "epoch": state.epoch,
                        "samples_seen": state.samples_seen, "skipped_steps": state.skipped_steps,
                        "loss/phase_bimixco": float(result.terms.phase == "bimixco")})
        metrics.update({f"mem/{k}": v for k, v in memory_stats(self.device).items()})
        return metrics

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def reconstruction_grid(self, meta, n: int):
        """(H, W, 3) uint8 grid of the first ``n`` validation stimuli (see ``log.recon_grid``), or None
        when the data has no weight-free generator, no images or no val split. Every rank calls it in
        lock-step (ZeRO-3 gathers parameters inside forward)."""
        from mindeye_dist.data import build_eval_loader
        from mindeye_dist.reconstruct.tensorboard import image_models_for, reconstruction_grid

        split = self.cfg.data.val_split
        if n <= 0 or split not in meta.splits or meta.split(split).count == 0:
            return None
        generator, decoder = image_models_for(meta)
        if generator is None or (getattr(self.model, "prior", None) is None and getattr(self.model, "lowlevel", None) is None):
            return None
        batch = next(iter(build_eval_loader(self.cfg.data, split, batch_size=n, meta=meta, skip_shards=self.skip_shards)))
        if batch.images is None:
            return None
        return reconstruction_grid(self.model, self.route(batch), generator, decoder, n=n, seed=self.cfg.run.seed)

    @torch.no_grad()  # validation keeps no autograd graph (it held one per val batch until the loss)
    def embed(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval-submodule outputs and targets for every batch of ``loader`` (float32, CPU).

        Every rank must call it on the same rows in lock-step (ZeRO-3 gathers parameters
        collectively); the engine is left in eval mode.
        """
        self.engine.eval()
        preds, targets = [], []
        for batch in loader:
            batch = self.route(batch.to(self.device))
            out, _ = self.engine(batch.voxels.to(self.engine.dtype), batch.subject)
            preds.append(out.projector.float().cpu())
            targets.append(batch.targets.float().cpu())
        return torch.cat(preds), torch.cat(targets)

    def validate(self, meta, split: Optional[str] = None) -> dict[str, float]:
        """Retrieval and contrastive loss on the validation split (held out from train; never test).

        ``val/image_top1``, ``val/brain_top1`` (``eval.retrieval_way``-way, capped at the split
        size, ``eval.retrieval_loops`` random subsets), their mean ``val/retrieval_top1``, and
        ``val/loss``: bidirectional InfoNCE at the temperature training ends with, averaged over
        the same random ``way``-subsets (a contrastive loss depends on how many candidates it sees,
        so the subset size is fixed; this is the loss the scaling-law report fits). ``meta`` may be
        a list (several subjects): each is scored on its own (``val/<subject>/...``) and the
        unprefixed metrics are their means. Every rank computes the same numbers. Returns {} when
        no dataset has such a split.
        """
        from mindeye_dist.data.multi import subject_name

        metas = meta if isinstance(meta, (list, tuple)) else [meta]
        per = {subject_name(m): self._validate_one(m, split) for m in metas}
        per = {name: v for name, v in per.items() if v}
        if len(per) <= 1:
            return next(iter(per.values()), {})
        out = {k: sum(v[k] for v in per.values()) / len(per) for k in next(iter(per.values()))}
        for name, values in per.items():
            out.update({k.replace("val/", f"val/{name}/", 1): x for k, x in values.items()})
        return out

    def _validate_one(self, meta, split: Optional[str]) -> dict[str, float]:
        from mindeye_dist.data import build_eval_loader
        from mindeye_dist.evaluate import retrieval_accuracy
        from mindeye_dist.losses import info_nce_loss

        cfg = self.cfg
        split = split or cfg.data.val_split
        if split not in meta.splits or meta.split(split).count == 0:
            return {}
        def rows():
            return build_eval_loader(cfg.data, split, batch_size=cfg.eval.batch_size, meta=meta,
                                     skip_shards=self.skip_shards)

        skip = getattr(self.model, "ridge_skip", None)
        extra: dict[str, float] = {}
        if skip is None:
            preds, targets = self.embed(rows())
            way = min(cfg.eval.retrieval_way, len(preds))
            res = retrieval_accuracy(preds, targets, way=way, loops=cfg.eval.retrieval_loops, seed=cfg.run.seed)
        else:
            # the MLP's and ridge's outputs, then the blend of the two this checkpoint will carry;
            # ridge's outputs on a split are fixed once its buffers are, so they are embedded once
            from mindeye_dist.data.multi import subject_name
            from mindeye_dist.models.ridge_skip import validate_blend

            key = (subject_name(meta), split, skip.fingerprint())
            choice = validate_blend(skip, lambda: self.embed(rows()), way=cfg.eval.retrieval_way,
                                    loops=cfg.eval.retrieval_loops, seed=cfg.run.seed,
                                    ridge=self._ridge_val.get(key))
            self._ridge_val = {k: v for k, v in self._ridge_val.items() if k[2] == key[2]}  # refitted: stale
            self._ridge_val[key] = choice.ridge
            beta, res, preds, targets = choice.beta, choice.metrics, choice.preds, choice.targets
            way = min(cfg.eval.retrieval_way, len(preds))
            extra["val/ridge_blend"] = beta
        self.engine.train()
        temperature = self.loss_fn.schedule.temperature(cfg.train.max_steps)
        gen = torch.Generator().manual_seed(cfg.run.seed)
        subsets = [torch.randperm(len(preds), generator=gen)[:way] for _ in range(cfg.eval.retrieval_loops)]
        loss = sum(float(info_nce_loss(preds[i], targets[i], temperature)) for i in subsets) / len(subsets)
        return {"val/image_top1": res["image_top1"], "val/brain_top1": res["brain_top1"],
                "val/retrieval_top1": 0.5 * (res["image_top1"] + res["brain_top1"]), "val/loss": loss, "val/way": way,
                **extra}

    # ------------------------------------------------------------------ checkpoints

    def save(self, ckpt_dir: Path, keep_last: int, best: bool = False) -> str:
        """Checkpoint the current step on every rank (collective); ``best`` also marks it best."""
        tag = ckpt.tag_for(self.state.step)
        if self.rank == 0:
            ckpt.prepare_tag_dir(ckpt_dir, tag)
        _barrier()
        self.engine.save(ckpt_dir, tag)
        rng = ckpt.rng_state({"loss": self.loss_gen})
        rng["scheduler"] = self.engine.scheduler_state()
        ckpt.write_rank_state(ckpt_dir, tag, self.rank, self.state, rng)
        _barrier()
        self.faults.in_save(self.state.step)
        if self.rank == 0:
            removed = ckpt.commit(ckpt_dir, tag, keep_last, best=best)
            log.info("checkpoint %s saved%s%s", tag, " (best so far)" if best else "",
                     f" (pruned {', '.join(removed)})" if removed else "")
        _barrier()
        return tag

    def load(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        """Restore weights, optimizer, LR schedule and train state from ``tag``; returns the RNG
        state to apply with :meth:`restore_rng` right before the first step (setup in between,
        such as building the loader, may draw random numbers). Collective.

        On the number of ranks that wrote ``tag`` every rank reads its own files: bit-exact. On
        another number, DeepSpeed's universal copy of ``tag`` is loaded (made by rank 0 the first
        time, while the others wait; see checkpoint.universal_for), TrainState and the LR schedule
        come from rank 0's file, and the RNG streams are reseeded (they cannot map across ranks)."""
        state, rng = ckpt.read_rank_state(ckpt_dir, tag, 0)
        if state.total_steps != self.cfg.train.max_steps:
            raise ConfigError(f"train.max_steps={self.cfg.train.max_steps} but the run in {ckpt_dir.parent} was started "
                              f"with {state.total_steps}: the LR and loss schedules cannot be stretched. Use a new run.dir.")
        saved_world = state.world_size
        if saved_world == self.world_size:
            if self.rank:
                state, rng = ckpt.read_rank_state(ckpt_dir, tag, self.rank)
            self.engine.load(ckpt_dir, tag)
        else:
            load_tag = self._universal_copy(ckpt_dir, tag)
            self.engine.load(ckpt_dir, load_tag, universal=load_tag != tag)
            rng = {"scheduler": rng["scheduler"], "reseed": True}
            log.info("resumed %s (written by %d rank(s)) on %d rank(s) from %s; RNG streams reseeded from (run.seed, "
                     "step, rank, world size)", tag, saved_world, self.world_size, load_tag)
        self.engine.load_scheduler_state(rng.pop("scheduler"))
        state.world_size = self.world_size
        self.state = state
        self.resumed_from_world = saved_world
        return rng

    def _universal_copy(self, ckpt_dir: Path, tag: str) -> str:
        """The tag to load ``tag`` from on this number of ranks: itself for fp32 ZeRO-0 (one whole
        file), else its universal copy, converted by rank 0 if missing. Every rank raises the same
        ConfigError when DeepSpeed cannot convert it."""
        if not ckpt.optimizer_partitioned(ckpt_dir / tag):
            return tag
        zero = self.ds_config.get("zero_optimization", {})
        if "nvme" in (zero.get("offload_optimizer", {}).get("device"), zero.get("offload_param", {}).get("device")):
            raise ConfigError(f"checkpoint {tag} was written by a different number of ranks with NVMe offload "
                              "(ZeRO-Infinity): DeepSpeed 0.19.8 cannot convert NVMe-swapped optimizer state to its "
                              "universal format. Resume with the number of ranks in its train_state.json (world_size)")
        outcome: list[Any] = [None]
        if self.rank == 0:
            try:
                outcome[0] = ckpt.universal_for(ckpt_dir, tag, log=log)
            except ConfigError as err:
                outcome[0] = err
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(outcome, src=0)  # also the barrier: the copy exists for everyone
        if isinstance(outcome[0], ConfigError):
            raise outcome[0]
        return outcome[0]

    def restore_rng(self, rng: dict[str, Any]) -> None:
        if rng.get("reseed"):
            ckpt.reseed_rng(self.cfg.run.seed, self.state.step, self.rank, self.world_size, {"loss": self.loss_gen})
        else:
            ckpt.set_rng_state(rng, {"loss": self.loss_gen})

