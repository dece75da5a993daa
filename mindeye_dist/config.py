"""Typed experiment configuration: defaults < YAML < dotted ``key=value`` overrides.

Every field has a one-line docstring (the string literal under it, collected by
:func:`field_docs`), invariants are checked in ``__post_init__``, and any error names the dotted
key, the bad value and what is allowed. Unknown keys are errors. The resolved config is written
back as YAML into the run directory (:func:`dump_config`).

Usage::

    cfg = load_config("launchers/configs/demo.yaml", ["model.hidden_dim=512", "train.max_steps=200"])
    dump_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mindeye_dist.errors import ConfigError
from mindeye_dist.models.config import ModelConfig

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "dump_config", "from_dict", "to_dict"]


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics, TensorBoard logs and checkpoints go here."""
    seed: int = 42
    """Global seed for model init, data order and loss randomness (MindEye's default is 42)."""
    name: str = ""
    """Human-readable run name (defaults to the run directory's basename)."""
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON (ZeRO stage, offload, communication); launchers set it from --ds_config."""

    def __post_init__(self) -> None:
        _check(bool(self.dir), "run.dir", self.dir, "a non-empty path")
        _check(self.seed >= 0, "run.seed", self.seed, "an integer >= 0")


@dataclass
class DataConfig:
    url: str = ""
    """Dataset root written by prepare_data.py: a local path, file://... or s3://bucket/prefix."""
    datasets: list[str] = field(default_factory=list)
    """More datasets trained in the same run, one subject each (multi-subject pretraining): every
    micro-batch then holds an equal share of each subject (data.url's included), and each
    dataset's subject is routed to the adapter of that name in the model's subject table."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "val"
    """Split used for periodic evaluation during training (held out from train, never test)."""
    test_split: str = "test"
    """Split used only by evaluate.py for final numbers; never used to pick checkpoints."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    prefetch_factor: int = 4
    """Batches prefetched per worker."""
    shuffle_buffer: int = 500
    """Sample-level shuffle buffer after shard shuffling (MindEye uses 500); 0 disables it."""
    train_reps: Literal["one", "convex", "mean", "cycle"] = "one"
    """How a training sample's repetitions become one input: one random repetition (MindEye1
    style), a random convex mix, their mean, or cycle (repetition index = step % reps, as
    MindEye1's loop does for the whole batch)."""
    resampled: bool = False
    """Draw shards with replacement (infinite stream) instead of exact epochs."""
    on_corrupt: Literal["fail", "skip"] = "fail"
    """A missing, truncated or corrupt shard (wrong size, checksum mismatch) or a sample with NaN/inf
    or misshapen arrays: fail naming it, or skip it with a warning and count it (loader.skipped)."""
    s3_endpoint: str = ""
    """S3 endpoint URL; empty means the standard AWS_ENDPOINT_URL environment variable or AWS default."""
    n_voxels: Optional[int] = None
    """Voxels per sample; taken from meta.json unless set, in which case they must agree."""
    n_tokens: Optional[int] = None
    """Target tokens per sample; from meta.json unless set (must agree)."""
    token_dim: Optional[int] = None
    """Target token dimension; from meta.json unless set (must agree)."""
    train_subset: Optional[int] = None
    """Train on the first N rows of the train split only (data-scaling sweeps; NSD imports: the
    first sessions); null = all."""

    def __post_init__(self) -> None:
        _check(self.train_subset is None or self.train_subset > 0, "data.train_subset", self.train_subset,
               "null or a positive integer")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", self.prefetch_factor, "an integer >= 1")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "an integer >= 0")
        for key in ("n_voxels", "n_tokens", "token_dim"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"data.{key}", value, "null or a positive integer")
        for key in ("train_split", "val_split", "test_split"):
            value = getattr(self, key)
            _check(bool(re.fullmatch(r"[A-Za-z0-9_]*", value)), f"data.{key}", value, "letters, digits and _")


@dataclass
class LossConfig:
    mixup_pct: float = 0.33
    """Share of training (by progress) that uses BiMixCo; SoftCLIP afterwards."""
    mixup_beta: float = 0.15
    """Beta(a, a) parameter of the voxel-mixup coefficient lambda."""
    mixup_prob: float = 0.5
    """Probability that a sample is mixed in BiMixCo (else lambda = 1)."""
    bimixco_temp: float = 0.006
    """Fixed BiMixCo temperature."""
    softclip_temp_start: float = 0.004
    """SoftCLIP temperature at the start of the SoftCLIP phase (cosine-annealed upward)."""
    softclip_temp_end: float = 0.0075
    """SoftCLIP temperature at the end of training."""
    clip_weight: float = 1.0
    """Weight of the contrastive (BiMixCo/SoftCLIP) term."""
    prior_weight: float = 30.0
    """Weight of the diffusion-prior MSE (30 in both references)."""
    lowlevel_weight: float = 0.5
    """Weight of the low-level term (MindEye2 blur_scale = 0.5)."""
    lowlevel_l1_scale: float = 1.0
    """Divisor applied to the low-level L1 (MindEye1 divides by the VAE scale 0.18215)."""
    lowlevel_cont_weight: float = 0.1
    """Weight of the soft contrastive term on low-level feature tokens, inside the low-level loss."""
    lowlevel_cont_temp: float = 0.2
    """Temperature of the low-level soft contrastive loss (MindEye1 0.075, MindEye2 0.2)."""
    gather_negatives: bool = False
    """Gather contrastive features across ranks (global negatives). Off matches both references."""
    gather_local_loss: bool = False
    """With gather_negatives, each rank scores only its own rows of the global logits (W x cheaper)."""
    cosine_weight: float = 0.0
    """Weight of an auxiliary regression term mean(1 - cos(prediction, target)) on the retrieval output (0 = off, as in the references)."""
    voxel_noise: float = 0.0
    """Std of Gaussian noise added to the z-scored training voxels at every step, in both phases (0 = off, as in the references)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.gather_local_loss, bool), "loss.gather_local_loss", self.gather_local_loss, "true or false")
        _check(0.0 <= self.mixup_pct <= 1.0, "loss.mixup_pct", self.mixup_pct, "a fraction in [0, 1]")
        _check(self.mixup_beta > 0, "loss.mixup_beta", self.mixup_beta, "> 0")
        _check(0.0 <= self.mixup_prob <= 1.0, "loss.mixup_prob", self.mixup_prob, "a probability in [0, 1]")
        for key in ("bimixco_temp", "softclip_temp_start", "softclip_temp_end", "lowlevel_cont_temp", "lowlevel_l1_scale"):
            _check(getattr(self, key) > 0, f"loss.{key}", getattr(self, key), "> 0")
        for key in ("clip_weight", "prior_weight", "lowlevel_weight", "lowlevel_cont_weight", "cosine_weight", "voxel_noise"):
            _check(getattr(self, key) >= 0, f"loss.{key}", getattr(self, key), ">= 0")


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    """Optimizer: AdamW with the references' parameter groups (no decay on biases and norms)."""
    max_lr: float = 3e-4
    """Peak learning rate (3e-4 in both references; never rescaled by world size)."""
    weight_decay: float = 1e-2
    """Decoupled weight decay for weights (biases and norm parameters get none)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    """LR schedule: OneCycle as in the references, cosine with warmup, or constant."""
    pct_start: float = 0.05
    """OneCycle warm-up share of training (the references use 2 / epochs: 0.0083 for MindEye1's 240)."""
    warmup_steps: int = 0
    """Linear warm-up steps for the cosine schedule."""
    final_div_factor: float = 1000.0
    """OneCycle final_div_factor (references: 1000)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables (MindEye1 had none, MindEye2's DeepSpeed JSON used 1.0)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        _check(self.max_lr > 0, "optim.max_lr", self.max_lr, "> 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "two numbers in [0, 1)")
        _check(0.0 < self.pct_start < 1.0, "optim.pct_start", self.pct_start, "a fraction in (0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, ">= 0")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 32
    """Samples per rank per micro-step (MindEye1: 32, MindEye2: 24)."""
    grad_accum_steps: int = 1
    """Micro-steps accumulated per optimizer step."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16 on GPU, fp32 (default) or bf16 on CPU; fp16 is GPU-only."""
    log_every_steps: int = 10
    """Metrics are synced to the host and logged every this many steps."""
    eval_every_steps: int = 0
    """Evaluate retrieval on the validation split every this many steps; 0 disables."""
    max_bad_steps: int = 5
    """Abort after this many consecutive steps with NaN/inf loss or gradients (they are skipped)."""
    init_from: str = ""
    """Start from these weights instead of a fresh model: an export (.safetensors) or a run
    directory (its best, else latest, checkpoint). Subject adapters the source lacks start fresh,
    those the model does not have are dropped (MindEye2's fine-tune of a new subject); anything
    else must match. A run that resumes from its own checkpoint ignores it."""
    early_stop_patience: int = 0
    """Stop after this many validations in a row without improving checkpoint.best_metric
    (0 = never; needs train.eval_every_steps > 0)."""
    host_memory: Literal["auto", "reuse", "system"] = "auto"
    """Host allocator: 'reuse' keeps freed memory for the next step instead of unmapping it (glibc
    mallopt: a third of the kernel time of a 214M-parameter CPU run, 1.34x in bf16; see
    mindeye_dist/hostmem.py and BENCHMARKS.md); 'system' leaves glibc's defaults; 'auto' (default)
    is 'reuse' when training on the CPU without ZeRO-3 or an offload, else 'system' (a fragmented
    heap kept a 286M-parameter ZeRO-3 NVMe rank 4 GiB above its live memory)."""

    def __post_init__(self) -> None:
        _check(self.max_steps > 0, "train.max_steps", self.max_steps, "a positive integer")
        _check(self.micro_batch_size > 0, "train.micro_batch_size", self.micro_batch_size, "a positive integer")
        _check(self.grad_accum_steps > 0, "train.grad_accum_steps", self.grad_accum_steps, "a positive integer")
        _check(self.log_every_steps > 0, "train.log_every_steps", self.log_every_steps, "a positive integer")
        _check(self.eval_every_steps >= 0, "train.eval_every_steps", self.eval_every_steps, ">= 0")
        _check(self.max_bad_steps > 0, "train.max_bad_steps", self.max_bad_steps, "a positive integer")
        _check(self.early_stop_patience >= 0, "train.early_stop_patience", self.early_stop_patience, ">= 0")


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save a checkpoint every this many steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Keep this many newest complete checkpoints; older ones are deleted after a save."""
    select: Literal["last", "best"] = "last"
    """Which checkpoint evaluate.py and export.py use by default: ``last``, or ``best`` (each
    validation that improves ``best_metric`` saves a checkpoint, kept from pruning and named by
    RUN_DIR/checkpoints/best). Needs train.eval_every_steps > 0."""
    best_metric: Literal["val/retrieval_top1", "val/image_top1", "val/brain_top1", "val/loss"] = "val/retrieval_top1"
    """Validation metric that ranks checkpoints (``val/retrieval_top1`` = the mean of image and
    brain top-1; ``val/loss`` is lower-is-better, the others higher-is-better)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, ">= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "an integer >= 1")


@dataclass
class EvalConfig:
    retrieval_way: int = 300
    """Candidates per retrieval trial (300 in both references)."""
    retrieval_loops: int = 30
    """Random subsets averaged (30 in both references)."""
    batch_size: int = 300
    """Batch size for computing embeddings during evaluation."""

    def __post_init__(self) -> None:
        _check(self.retrieval_way >= 2, "eval.retrieval_way", self.retrieval_way, "an integer >= 2")
        _check(self.retrieval_loops >= 1, "eval.retrieval_loops", self.retrieval_loops, "an integer >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an integer >= 1")


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write TensorBoard scalars to RUN_DIR/tb."""
    jsonl: bool = True
    """Append metrics to RUN_DIR/metrics.jsonl."""
    progress: Literal["auto", "on", "off"] = "auto"
    """Progress bar on rank 0: auto shows it only on a terminal."""
    recon_grid: int = 8
    """At each validation, TensorBoard image ``val/reconstructions``: the first N validation stimuli,
    seen | blurry (low-level head) | reconstruction (prior DDIM 20 -> generator). Only for data whose
    generator needs no weights (the synthetic subjects); 0 turns it off."""


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory, seed and name."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the shards are and how they are read."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (a preset plus explicit overrides)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms, weights and the BiMixCo -> SoftCLIP schedule."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch sizes, precision and the loop's cadence."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Retrieval evaluation protocol."""
    log: LogConfig = field(default_factory=LogConfig)
    """Loggers."""
    recipe: Literal["none", "auto"] = "none"
    """``auto``: settings derived from the dataset's meta.json (width, batch, schedule, validation
    cadence; mindeye_dist/recipe.py) fill in whatever the YAML and the overrides leave unset.
    launchers/configs/default.yaml sets it; ``none`` takes the dataclass defaults."""

    def __post_init__(self) -> None:
        needs_eval = self.checkpoint.select == "best" or self.train.early_stop_patience > 0
        _check(not needs_eval or self.train.eval_every_steps > 0, "train.eval_every_steps", self.train.eval_every_steps,
               "> 0 when checkpoint.select=best or train.early_stop_patience > 0 (both rank validations)")


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
"""Words a bool field accepts (YAML 1.1 read all of them as booleans; configs written that way still load)."""


def _literal_for_bool(meaning: bool, allowed: tuple, key: str) -> Optional[str]:
    """The one allowed word of a string Literal that means ``meaning`` ('true' before 'on'/'yes').

    ``true``/``false`` (booleans after YAML) and the words ``on``/``off``/``yes``/``no`` reach a
    Literal field that spells the choice differently (log.progress: on/off): they map to the
    allowed word with the same meaning. None when no allowed word has it.
    """
    words = [a for a in allowed if isinstance(a, str) and _BOOL_WORDS.get(a.lower()) is meaning]
    chosen = [a for a in words if a.lower() == str(meaning).lower()] or words
    if len(chosen) > 1:
        raise ConfigError(f"{key}={str(meaning).lower()} is ambiguous: {', '.join(map(repr, chosen))} all mean "
                          f"{str(meaning).lower()}; write the one you mean, in quotes")
    return chosen[0] if chosen else None


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.2 scalars for configs: only true/false are booleans, and 1e-3 is a number.

    PyYAML follows YAML 1.1, where ``on``/``off``/``yes``/``no`` are booleans: ``log.progress: off``
    would arrive as False and could not be told apart from ``no``. Here they stay strings; bool
    fields accept them (see ``_BOOL_WORDS``), Literal fields take them as written.
    """


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                   list("-+0123456789."))


def yaml_load(text_or_stream: Any) -> Any:
    """Parse config YAML with :class:`ConfigLoader` (YAML 1.2 booleans and exponent floats)."""
    return yaml.load(text_or_stream, Loader=ConfigLoader)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        meaning = value if isinstance(value, bool) else _BOOL_WORDS.get(value.lower()) if isinstance(value, str) else None
        if meaning is not None and not any(isinstance(a, bool) for a in allowed):
            word = _literal_for_bool(meaning, allowed, key)
            if word is not None:
                return word
        raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list ({_type_name(tp)})")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid: expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid: expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{key}={value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} is invalid: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is invalid: expected a string")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"allowed under {prefix or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config (tuples become lists so YAML stays plain)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# --------------------------------------------------------------------------------------------
# Overrides, loading, dumping


def parse_override(arg: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``)."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form key=value (e.g. train.max_steps=200)")
    key, raw = arg.split("=", 1)
    key = key.strip().lstrip("-")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override key {key!r} is not a dotted name (e.g. model.hidden_dim)")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict (new nested dicts are created as needed)."""
    for arg in overrides:
        path, value = parse_override(arg)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {arg!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        try:
            data = yaml_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> ExperimentConfig:
    """Defaults < the recipe (``recipe: auto``) < YAML at ``path`` < ``overrides``; a validated ExperimentConfig.

    ``world_size``: ranks the run will have, for the recipe's per-rank batch (default: the
    launcher's ``WORLD_SIZE``, else 1)."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    if data.get("recipe") == "auto":
        from mindeye_dist import recipe

        data = recipe.apply(data, world_size)
    return from_dict(ExperimentConfig, data)


def dump_config(cfg: Any, path: str | os.PathLike | None = None) -> str:
    """Serialise ``cfg`` as YAML; also write it to ``path`` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        from mindeye_dist.fsutil import atomic_write_bytes

        atomic_write_bytes(path, text.encode())
    return text


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings written under each field of dataclass ``cls``."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
