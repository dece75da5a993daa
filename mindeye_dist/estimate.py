"""Parameter counts, training FLOPs per sample and memory per rank for a model config, without allocating it.

The model is built on ``torch.device("meta")`` (shapes only, no memory), so a 5B preset is
counted in seconds. FLOPs are *measured* with ``torch.utils.flop_counter.FlopCounterMode``
on one forward + backward of a training step on meta tensors (FlopCounterMode only reads
shapes, so meta tensors work; ``tests/test_estimate.py`` checks that the meta count equals
the count on real CPU tensors and analytic counts). A step is: model forward with every head,
the prior's loss on the backbone tokens, backward of the sum. Per-component FLOPs include that
component's backward (also the gradient it passes back to the backbone); "other" is what no
component owns (loss arithmetic; FlopCounterMode counts matmuls and convolutions only).
Frozen encoders are not part of the model (targets are precomputed), so they are not counted.

Caveat found while testing: on real CPU tensors, SDPA without a mask runs a fused kernel that
FlopCounterMode does not count (diffusers' decoder attention); on meta it decomposes into
counted matmuls, so the meta count is the complete one.

``estimate(cfg)`` returns::

    {"preset": ..., "config": {resolved model fields},
     "params": {"backbone", "projector", "prior", "lowlevel", "total", "backbone_adapters"},
     "flops": {"backbone", "projector", "prior", "lowlevel", "other", "total"},  # per training sample
     "memory": {...}}   # only when a world size or a DeepSpeed config is given

Memory per rank (``estimate(cfg, world_size=N, ds_config=..., micro_batch_size=B, precision=...)``)
--------------------------------------------------------------------------------------------------

What DeepSpeed 0.19 allocates per rank with this trainer's client optimizer (torch AdamW: two fp32
moments, 8 bytes per element it updates), read from its source and checked tensor by tensor
against a 2-rank run (``bench.memory``; ``tests/test_estimate.py`` pins the terms). Ψ = parameter
count, N = world size, P = bytes per parameter element (4 fp32, 2 bf16/fp16), S = this rank's
partition (elements), L = the largest layer (the most parameters held directly by one module,
DeepSpeed's ``model_to_params`` definition). Parameter order and optimizer groups are those of
:func:`mindeye_dist.optim.param_groups` (decayed weights, then biases/norms), which DeepSpeed
flattens group by group.

**Model states** (``model_states_bytes``): what is alive at the end of backward, when parameters,
gradients (as the stage keeps them after its reduction), optimizer states and persistent buffers
coexist; the harness measures exactly there.

=====  ======================================  =====================================================
stage  term                                    DeepSpeed source (``deepspeed/runtime/...``)
=====  ======================================  =====================================================
0      params PΨ, grads PΨ, moments 8Ψ         ``engine.py`` (plain optimizer on the module)
0      bf16/fp16: fp32 master 4Ψ               ``fp16/unfused_optimizer.py`` FP16_UnfusedOptimizer
                                               (``fp32_groups``; chosen as ``DDP_BFLOAT16`` by
                                               ``engine._do_optimizer_sanity_check``)
1, 2   params PΨ (every rank)                  ``zero/stage_1_and_2.py`` ``bit16_groups_flat``
1, 2   fp32 master 4S, **also in fp32**        ``single_partition_of_fp32_groups`` (a clone)
1, 2   moments 8S                              the client optimizer on that partition
1, 2   grads P x (sum of the *whole* sizes     ``copy_grads_in_partition`` into
       of the params overlapping the rank's    ``grads_in_partition`` (``get_partition_info``);
       range), max over ranks                  S per group = ceil(n / 2N) * 2N / N
3      params P*sum(ceil(n/N)) + P x params    ``zero/stage3.py`` ``lp_param_buffer`` (defragmented
       <= ``param_persistence_threshold``      ``ds_tensor``); ``parameter_offload.py``
       (kept whole, "persistent")              ``mark_persistent_parameters``
3      fp32 master 4S, **also in fp32**        ``_create_fp32_partitions``: its no-copy branch
                                               compares a ``torch.device`` with a device-name
                                               string, never equal, so fp32 is cloned too
3      moments 8S; grads PS                    ``grad_partitions_flat_buffer`` (gradient
                                               accumulation dtype = the model's)
3      buffer P x min(reduce_bucket_size, Ψ)   ``_setup_for_real_optimizer``: the ipg bucket, kept
                                               for the run (pages resident once filled)
=====  ======================================  =====================================================

So per rank, fp32: ZeRO-0 16Ψ; ZeRO-1/2 4Ψ + 16S (+ straddling grads); ZeRO-3 20S + 4B. bf16:
ZeRO-0 16Ψ; ZeRO-1/2 2Ψ + 14S; ZeRO-3 16S + 2B. At N = 2 ZeRO-3/ZeRO-0 is 0.625 + B/4Ψ in fp32
(DeepSpeed keeps an fp32 master beside the fp32 parameters) and 0.5 + B/8Ψ in bf16.

**Transients** (``transient``, per phase; ``transient_bytes`` = the largest, on top of the states;
``peak_bytes`` = states + transient + activations). Approximate, within ~20% of the measured
step peak at scale-200m:

* ZeRO-0: the gradient all-reduce flattens gradients into a bucket of min(Ψ, 5e8) elements
  (``engine.allreduce_gradients`` -> ``buffered_allreduce_fallback``, ``MEMORY_OPT_ALLREDUCE_SIZE``;
  world size > 1); bf16/fp16: ``FP16_UnfusedOptimizer.step`` makes fp32 copies of all gradients (4Ψ).
* ZeRO-1: every unreduced gradient (PΨ) plus the ipg bucket, before the kept gradients exist.
* ZeRO-2: the ipg bucket(s), min(k x reduce_bucket_size, Ψ) elements with k = 2 under
  ``overlap_comm`` (``setup_buckets``), plus one unreduced gradient (the largest parameter).
* ZeRO-1/2 step: the kept gradients flattened into the partition and cast to fp32 (P*S + 4S in
  bf16, 4S in fp32: the cast is a no-op).
* ZeRO-3 backward: gathered parameters, min(Ψ, max(L, ``stage3_max_live_parameters``))
  (``gathered_layer_bytes``; the partitioned-parameter coordinator releases only beyond that),
  plus the prefetch bucket and L's unreduced gradient. With ``memory_efficient_linear`` off
  (default on: ``zero/linear.py``), plain ``F.linear`` keeps every gathered weight alive until its
  backward, so all Ψ are held then. Step: ``_prepare_fp32_grad_for_sub_group``
  flattens the gradient partition and casts it to fp32 (P*S + 4S in bf16, 4S in fp32).

Bucket sizes and ZeRO-3 knobs come from the DeepSpeed config's ``zero_optimization`` block (either
spelling, e.g. ``stage3_max_live_parameters``), else DeepSpeed's defaults (:data:`ZERO_DEFAULTS`,
5e8-element buckets). The shipped ``ds_configs`` use 5e7-element buckets at ZeRO-1/2 (at 5e8 a
model under 500M parameters gets a second full gradient copy) and, at ZeRO-3, 2e7-element
reduce/prefetch buckets with ``stage3_max_live_parameters`` = ``stage3_max_reuse_distance`` = 1e8
(at 1e9 every parameter of a model under 1B stays gathered from forward to backward: the ZeRO-3
peak then holds the whole model, PΨ, again).

Offload variants (only for a DeepSpeed config that offloads; not measured here): ``offload_optimizer``
moves the fp32 master, the moments and an fp32 gradient partition (4S) to the host, and the device
keeps no gradients at stage 1/2 (copied to the host during the reduction) nor at stage 3 (its
gradient partition lives on the host). ``offload_param`` (stage 3) moves the parameter partition
to the host; persistent parameters and the gathered ones stay on the device.

Not counted: the allocator's cached free memory (glibc keeps freed heap chunks resident until
trimmed, 0.05-0.16 GiB at ZeRO-3 here), the CUDA context (~0.5-1 GiB), code pages, and the
one-off peaks of engine construction (flattening the parameters at ZeRO-1/2; without
``deepspeed.zero.Init`` the full fp32 model on every rank).

Activations for one micro-batch are measured, not modelled: one training forward (model with
every head plus the prior's loss, as in :func:`measure_step_flops`) runs on the meta device with
a forward hook on every leaf module (a module without children) that sums the elements of its
floating-point outputs; the count is taken at batch 2 and 4 to split it into a per-sample part
and a batch-independent part (e.g. the prior's relative-position bias), and multiplied by the
precision's bytes per element (2 for bf16/fp16, 4 for fp32). This is an upper-bound-ish
estimate *without activation checkpointing*: it assumes every leaf output stays alive until the
backward, which overcounts outputs that autograd does not save (and dropout or activation
outputs that share storage with what is saved), while it misses functional intermediates inside
non-leaf modules (residual adds, attention logits inside SDPA or einsum code, dropout masks).

``result["memory"]``::

    {"world_size": 8, "gpus_per_node": 8, "num_nodes": 1,
     "micro_batch_size": 32, "precision": "bf16",
     "ds_config_stage": 2 or None,            # the stage of the given DeepSpeed config
     "total_params": Ψ, "largest_layer_params": L, "largest_layer": "backbone.out",
     "activations_bytes_per_sample": ...,    # leaf-module outputs per sample
     "activations_fixed_bytes": ...,         # batch-independent leaf outputs
     "activations_bytes": ...,               # fixed + per_sample × micro_batch_size
     "stages": {
        "0": {"stage": 0, "offload_optimizer": False, "offload_param": False,
              "params_bytes", "grads_bytes",                     # on the device, per rank
              "optimizer_bytes",                                 # fp32 master + moments
              "master_bytes",                                    # the fp32 master part of it
              "buffers_bytes",                                   # ZeRO-3's persistent ipg bucket
              "model_states_bytes",                              # params + grads + optimizer + buffers
              "gathered_layer_bytes",                            # ZeRO-3 gathered params (transient)
              "transient": {phase: bytes}, "transient_bytes",    # on top of the states
              "partition_numel",                                 # S (Ψ at stage 0)
              "activations_bytes",
              "total_bytes",                                     # model states + activations
              "peak_bytes",                                      # + transient_bytes
              "zero": {...},                                     # the bucket / ZeRO-3 knobs used
              "host_bytes",                                      # offloaded states per rank (else 0)
              "deepspeed_estimate_bytes",                        # DeepSpeed's device bytes or None
              "deepspeed_estimate": None or {
                  "function": "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs",
                  "device_bytes": ..., "host_bytes_per_node": ...,
                  "additional_buffer_factor": 1.5, "zero_init": True,
                  "cpu_offload": ..., "cpu_offload_params": ...}},
        "1": ..., "2": ..., "3": ...,        # without a DeepSpeed config: stages 0-3
        "2+offload_optimizer": ...,          # with one: its stage, plus its offload variants
        "3+offload_optimizer+offload_param": ...}}

DeepSpeed's numbers come from the functions behind its ``estimate_zero2_model_states_mem_needs_all_cold``
and ``estimate_zero3_model_states_mem_needs_all_cold`` (which only print a table and return None):
``estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes, cpu_offload,
additional_buffer_factor) -> (cpu_bytes, gpu_bytes)`` in ``deepspeed.runtime.zero.stage_1_and_2``
and ``estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, num_gpus_per_node,
num_nodes, cpu_offload, cpu_offload_params, zero_init, additional_buffer_factor) -> (cpu_bytes,
gpu_bytes, largest_layer_bytes)`` in ``deepspeed.runtime.zero.stage3``. They assume mixed precision
(GPU: 2Ψ + 18Ψ/N for ZeRO-2, 4L + 18Ψ/N for ZeRO-3) and apply ``additional_buffer_factor`` to
host memory only; the host number is per node. ``zero_init=True`` at stage 3 because
:func:`mindeye_dist.trainer.build_model_for_engine` builds the model under ``deepspeed.zero.Init``
there. DeepSpeed has no estimator for stages 0 and 1 or for parameter offload without optimizer
offload: those report None. Its ``model_to_params`` helpers deduplicate by ``data_ptr()``, which
is 0 for every meta tensor, so Ψ and L are counted here (``model.parameters()`` already yields a
shared parameter once).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.mindeye import COMPONENTS, MindEye, build_model, component_parameters

STATE_BYTES: dict[str, tuple[int, int, int]] = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
"""The ZeRO paper's bytes per parameter of (params, grads, optimizer states) with Adam, per
precision: its 16-byte accounting, kept for reference and as the list of precisions. DeepSpeed
allocates more in fp32 (an fp32 master beside the fp32 parameters at ZeRO >= 1); the memory model
uses :data:`PARAM_BYTES`, :data:`MASTER_BYTES` and :data:`MOMENT_BYTES`."""

ACTIVATION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per activation element per precision."""

DEFAULT_MICRO_BATCH = 32
DEFAULT_PRECISION = "bf16"
DEEPSPEED_BUFFER_FACTOR = 1.5
"""``additional_buffer_factor`` passed to DeepSpeed's estimators (their default)."""


def _has_checkpoint_units(model: torch.nn.Module) -> bool:
    from mindeye_dist.models.layers import CHECKPOINT_UNIT_ATTR

    return any(getattr(m, CHECKPOINT_UNIT_ATTR, False) for m in model.modules())


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure_step_flops(model: MindEye, batch_size: int = 2, device: str | torch.device = "meta") -> dict[str, int]:
    """FLOPs of one training step (forward + backward) per sample: total and per component.

    ``model`` must live on ``device``; dropout and CFG dropout run as in training. The total is
    one whole step. Components are measured one at a time with inputs that require grad where
    the real step backpropagates into them (the backbone's tokens and hidden state), because
    FlopCounterMode's per-module attribution of backward ops is unreliable across branches.
    "other" = total - components (loss arithmetic).
    """
    cfg = model.config
    b = batch_size
    voxels = torch.randn(b, cfg.subject_table()[cfg.subject_names()[0]], device=device)
    targets = torch.randn(b, cfg.n_tokens, cfg.token_dim, device=device)
    model.train()

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, requires_grad=True)

    def step() -> None:
        out = model(voxels, subject=0)  # one subject's adapter: what one sample costs
        loss = out.backbone.sum() + out.projector.sum()
        if model.prior is not None:
            loss = loss + model.prior.loss(out.backbone, targets)[0]
        if model.lowlevel is not None:
            loss = loss + out.lowlevel.sum() + out.lowlevel_features.sum()
        loss.backward()

    from mindeye_dist.models.layers import checkpointing_suspended

    with checkpointing_suspended():  # model FLOPs (what MFU counts): no recompute
        per = {"backbone": _flops(lambda: model.backbone(voxels, 0).sum().backward()),
               "projector": _flops(lambda: model.projector(leaf(b, cfg.n_tokens, cfg.token_dim)).sum().backward()),
               "prior": 0, "lowlevel": 0}
        if model.prior is not None:
            per["prior"] = _flops(lambda: model.prior.loss(leaf(b, cfg.n_tokens, cfg.token_dim), targets)[0].backward())
        if model.lowlevel is not None:
            source = voxels if model.lowlevel.from_voxels else leaf(b, cfg.hidden_dim)
            per["lowlevel"] = _flops(lambda: sum(t.sum() for t in model.lowlevel(source, 0)).backward())
        total = _flops(step)
        per["other"] = total - sum(per.values())
        per["total"] = total
        model.zero_grad(set_to_none=True)
    # activation checkpointing runs each unit's forward again in the backward: hardware FLOPs on top
    per["recompute"] = _flops(step) - total if _has_checkpoint_units(model) else 0
    model.zero_grad(set_to_none=True)
    return {k: v // b for k, v in per.items()}


def estimate(cfg: ModelConfig, *, n_voxels: Optional[int] = None, n_tokens: Optional[int] = None,
             token_dim: Optional[int] = None, lowlevel_shape: Optional[list[int]] = None,
             subjects: Optional[dict[str, int]] = None, flops: bool = True, batch_size: int = 2,
             ds_config: Optional[dict[str, Any]] = None, world_size: Optional[int] = None,
             gpus_per_node: Optional[int] = None, micro_batch_size: Optional[int] = None,
             precision: Optional[str] = None) -> dict[str, Any]:
    """Counts for ``cfg`` at the given data dims (else the preset's fixed or nominal dims).

    ``memory`` is added when ``world_size`` or ``ds_config`` is given (see :func:`estimate_memory`).
    """
    with torch.device("meta"):
        model = build_model(cfg, n_voxels=n_voxels, n_tokens=n_tokens, token_dim=token_dim,
                            lowlevel_shape=lowlevel_shape, subjects=subjects, nominal=True)
    params = component_parameters(model)
    params["backbone_adapters"] = sum(p.numel() for p in model.backbone.adapters.parameters())
    result: dict[str, Any] = {
        "preset": cfg.preset,
        "config": dataclasses.asdict(model.config),
        "params": params,
    }
    if flops:
        result["flops"] = measure_step_flops(model, batch_size=batch_size)
    if ds_config is not None or world_size is not None:
        result["memory"] = estimate_memory(model, ds_config=ds_config, world_size=world_size,
                                           gpus_per_node=gpus_per_node, micro_batch_size=micro_batch_size,
                                           precision=precision)
    return result


# ----------------------------------------------------------------------------------------------
# Memory per rank


def largest_layer(model: torch.nn.Module) -> tuple[str, int]:
    """(name, parameter count) of the module holding the most parameters directly
    (``recurse=False``): what ZeRO-3 gathers at once, as DeepSpeed's ``model_to_params`` defines it."""
    best = ("", 0)
    for name, module in model.named_modules():
        n = sum(p.numel() for p in module.parameters(recurse=False))
        if n > best[1]:
            best = (name, n)
    return best


def _float_elements(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() if out.is_floating_point() else 0
    if isinstance(out, (tuple, list)):
        return sum(_float_elements(o) for o in out)
    if isinstance(out, dict):
        return sum(_float_elements(o) for o in out.values())
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return sum(_float_elements(getattr(out, f.name)) for f in dataclasses.fields(out))
    return 0


def leaf_output_elements(module: torch.nn.Module, run) -> int:
    """Sum of the floating-point output elements of every leaf module of ``module`` (one per call)
    while ``run()`` executes."""
    total = 0

    def hook(_mod, _inputs, output) -> None:
        nonlocal total
        total += _float_elements(output)

    handles = [m.register_forward_hook(hook) for m in module.modules() if next(m.children(), None) is None]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total


def checkpointed_activation_elements(module: torch.nn.Module, run) -> int:
    """Elements kept for the backward by one forward (``run()``) when the modules marked as
    activation-checkpoint units (:data:`mindeye_dist.models.layers.CHECKPOINT_UNIT_ATTR`) recompute
    theirs: leaf outputs outside every unit, plus each unit's floating-point inputs (what
    ``torch.utils.checkpoint`` saves; a tensor passed to several units, like the prior's position
    bias, once), plus the largest unit's own leaf outputs (alive while that unit is recomputed
    in the backward). Without units this is :func:`leaf_output_elements`."""
    from mindeye_dist.models.layers import CHECKPOINT_UNIT_ATTR

    units = [m for m in module.modules() if getattr(m, CHECKPOINT_UNIT_ATTR, False)]
    if not units:
        return leaf_output_elements(module, run)
    outside, inputs, largest = 0, 0, 0
    current: list[int] = []  # the running count of the unit being run (at most one: units do not nest)
    held: dict[int, torch.Tensor] = {}  # unit inputs by id, kept alive so ids are not reused

    def unit_pre(_mod, args) -> None:
        nonlocal inputs
        for a in args:
            if not isinstance(a, torch.Tensor) or not a.is_floating_point():
                continue
            base = a._base if a._base is not None else a  # a view of a counted leaf output is not new
            if id(a) not in held and id(base) not in held:
                held[id(a)] = a
                inputs += a.numel()
        current.append(0)

    def unit_post(_mod, _args, _out) -> None:
        nonlocal largest
        largest = max(largest, current.pop())

    def leaf(_mod, _inputs, output) -> None:
        nonlocal outside
        n = _float_elements(output)
        if current:
            current[-1] += n
        else:
            outside += n
            if isinstance(output, torch.Tensor):
                held[id(output)] = output

    handles = [u.register_forward_pre_hook(unit_pre) for u in units]
    handles += [u.register_forward_hook(unit_post) for u in units]
    handles += [m.register_forward_hook(leaf) for m in module.modules() if next(m.children(), None) is None]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return outside + inputs + largest


def measure_activation_elements(model: MindEye, batch_size: int, device: str | torch.device = "meta") -> int:
    """Activation elements one training forward at ``batch_size`` keeps for its backward (model
    forward with every head plus the prior's loss, the forward half of :func:`measure_step_flops`'
    step): leaf-module outputs, or with activation checkpointing
    :func:`checkpointed_activation_elements`."""
    cfg = model.config
    voxels = torch.randn(batch_size, cfg.subject_table()[cfg.subject_names()[0]], device=device)
    targets = torch.randn(batch_size, cfg.n_tokens, cfg.token_dim, device=device)
    model.train()

    def forward() -> None:
        with torch.no_grad():
            out = model(voxels, subject=0)
            if model.prior is not None:
                model.prior.loss(out.backbone, targets)

    return checkpointed_activation_elements(model, forward)


def activation_elements(model: MindEye, device: str | torch.device = "meta") -> tuple[int, int]:
    """(per-sample, batch-independent) leaf-output elements, from forwards at batch 2 and 4."""
    two = measure_activation_elements(model, 2, device)
    four = measure_activation_elements(model, 4, device)
    per_sample = (four - two) // 2
    return per_sample, two - 2 * per_sample


PARAM_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per element of the model's parameters, gradients and communication buffers per precision."""

MASTER_BYTES = 4
"""fp32 master copy of the parameters, per element (DeepSpeed keeps one at every ZeRO stage >= 1
and for bf16/fp16 at stage 0)."""

MOMENT_BYTES = 8
"""Adam's exp_avg + exp_avg_sq in fp32, per element."""

ENGINE_ALLREDUCE_ELEMENTS = 500_000_000
"""``deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE``: the bucket ZeRO-0's gradient all-reduce
flattens gradients into (``DeepSpeedEngine.allreduce_gradients`` -> ``buffered_allreduce_fallback``)."""

ZERO_DEFAULTS: dict[str, Any] = {
    "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000, "overlap_comm": None,
    "contiguous_gradients": True, "prefetch_bucket_size": 50_000_000, "param_persistence_threshold": 100_000,
    "model_persistence_threshold": sys.maxsize, "max_live_parameters": 1_000_000_000,
    "max_reuse_distance": 1_000_000_000, "sub_group_size": 1_000_000_000, "memory_efficient_linear": True,
}
"""DeepSpeed's ``DeepSpeedZeroConfig`` defaults (deepspeed/runtime/zero/config.py; ``overlap_comm``
None means on for stage 3, off below), for the knobs the memory model reads."""

_ZERO_ALIASES = {"prefetch_bucket_size": "stage3_prefetch_bucket_size",
                 "param_persistence_threshold": "stage3_param_persistence_threshold",
                 "model_persistence_threshold": "stage3_model_persistence_threshold",
                 "max_live_parameters": "stage3_max_live_parameters",
                 "max_reuse_distance": "stage3_max_reuse_distance"}


NVME_DEFAULTS: dict[str, int] = {"optimizer_buffer_count": 4, "param_buffer_count": 5, "param_buffer_size": 100_000_000,
                                 "max_in_cpu": 1_000_000_000, "aio_block_size": 1_048_576}
"""DeepSpeed's defaults for the NVMe swap knobs (``offload_optimizer.buffer_count``,
``offload_param.buffer_count`` / ``buffer_size`` / ``max_in_cpu``, ``aio.block_size``)."""
MIN_AIO_BYTES = 1_048_576
"""``deepspeed.runtime.swap_tensor.utils.MIN_AIO_BYTES``: smaller tensors are not swapped."""
AIO_ALIGNED_BYTES = 1024
"""``deepspeed.runtime.swap_tensor.utils.AIO_ALIGNED_BYTES``: swap buffers are rounded up to it."""


def zero_settings(ds_config: Optional[dict[str, Any]], stage: int) -> dict[str, Any]:
    """The ZeRO knobs the memory model uses: the config's ``zero_optimization`` values (either
    spelling, e.g. ``stage3_max_live_parameters`` or ``max_live_parameters``), else DeepSpeed's
    defaults (:data:`ZERO_DEFAULTS`); plus whether each offload goes to NVMe and its swap knobs
    (:data:`NVME_DEFAULTS`)."""
    zo = dict((ds_config or {}).get("zero_optimization") or {})
    out: dict[str, Any] = {}
    for key, default in ZERO_DEFAULTS.items():
        value = zo.get(key, zo.get(_ZERO_ALIASES.get(key, key), default))
        out[key] = value if isinstance(value, bool) or value is None else int(value)
    if out["overlap_comm"] is None:
        out["overlap_comm"] = stage == 3
    for key in ("overlap_comm", "contiguous_gradients", "memory_efficient_linear"):
        out[key] = bool(out[key])
    opt, par = (zo.get(k) if isinstance(zo.get(k), dict) else {} for k in ("offload_optimizer", "offload_param"))
    aio = (ds_config or {}).get("aio") or {}
    out["nvme_optimizer"] = opt.get("device") == "nvme"
    out["nvme_param"] = par.get("device") == "nvme"
    out["optimizer_buffer_count"] = int(opt.get("buffer_count", NVME_DEFAULTS["optimizer_buffer_count"]))
    out["param_buffer_count"] = int(par.get("buffer_count", NVME_DEFAULTS["param_buffer_count"]))
    out["param_buffer_size"] = int(par.get("buffer_size", NVME_DEFAULTS["param_buffer_size"]))
    out["max_in_cpu"] = int(par.get("max_in_cpu", NVME_DEFAULTS["max_in_cpu"]))
    out["aio_block_size"] = int(aio.get("block_size", NVME_DEFAULTS["aio_block_size"]))
    return out


def _stage3_sub_groups(groups: list[list[int]], world_size: int, sub_group_size: int) -> list[tuple[int, int]]:
    """(partition elements, whole elements) of each ZeRO-3 optimizer sub-group: per parameter group,
    parameters are added until the partitions reach ``sub_group_size`` (stage3.py ``_create_fp16_sub_groups``)."""
    subs = []
    for numels in groups:
        parts = [_ceil_div(x, world_size) for x in numels]
        if sub_group_size >= sum(parts):
            subs.append((sum(parts), sum(numels)))
            continue
        part = whole = 0
        for i, (x, n) in enumerate(zip(parts, numels)):
            part, whole = part + x, whole + n
            if part >= sub_group_size or i == len(parts) - 1:
                subs.append((part, whole))
                part = whole = 0
    return subs


def _aligned(numel: int, element_bytes: int) -> int:
    per = AIO_ALIGNED_BYTES // element_bytes
    return _ceil_div(numel, per) * per


def optimizer_group_numels(model: torch.nn.Module) -> list[list[int]]:
    """Parameter sizes per optimizer parameter group, in the order DeepSpeed flattens them: the
    groups :func:`mindeye_dist.optim.param_groups` builds (decayed weights, then biases/norms)."""
    from mindeye_dist.optim import param_groups

    return [[p.numel() for p in g["params"]] for g in param_groups(model, weight_decay=0.01)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _stage12_partitions(groups: list[list[int]], world_size: int) -> tuple[list[int], int]:
    """(partition size per group, max over ranks of the gradient elements a rank keeps).

    ``DeepSpeedZeroOptimizer.__init__`` (stage_1_and_2.py) flattens each group padded to a multiple
    of ``2 * world_size`` (``nccl_start_alignment_factor``) and gives rank r the range
    ``[r * size, (r + 1) * size)``. After the reduction a rank keeps the *whole* gradient of every
    parameter that overlaps its range (``get_partition_info`` + ``copy_grads_in_partition``), so a
    parameter straddling a boundary is held by both ranks."""
    sizes, kept = [], [0] * world_size
    for numels in groups:
        total = sum(numels)
        size = _ceil_div(total, 2 * world_size) * 2 * world_size // world_size
        sizes.append(size)
        for r in range(world_size):
            lo, hi, cur = r * size, (r + 1) * size, 0
            for n in numels:
                if lo <= cur < hi or cur < lo < cur + n:
                    kept[r] += n
                cur += n
    return sizes, max(kept) if kept else 0


def model_states_per_rank(total_params: int, largest_layer_params: int, world_size: int, stage: int, *,
                          precision: str = DEFAULT_PRECISION, offload_optimizer: bool = False,
                          offload_param: bool = False, param_groups: Optional[list[list[int]]] = None,
                          zero: Optional[dict[str, Any]] = None,
                          largest_param: Optional[int] = None) -> dict[str, Any]:
    """Bytes per rank that DeepSpeed (0.19) allocates for a ZeRO stage (module docstring).

    ``param_groups``: parameter sizes per optimizer group in DeepSpeed's order (default: one group
    of ``total_params`` split into ideal partitions, no parameter straddling a boundary and none
    small enough to persist at stage 3); ``zero``: :func:`zero_settings` (default: DeepSpeed's
    defaults for the stage); ``largest_param``: the largest single parameter (default: the largest
    layer)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if precision not in STATE_BYTES:
        raise ValueError(f"precision must be one of {', '.join(STATE_BYTES)}, got {precision!r}")
    if offload_optimizer and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage >= 1")
    if offload_param and stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    z = zero if zero is not None else zero_settings(None, stage)
    p_b = PARAM_BYTES[precision]
    low = p_b != MASTER_BYTES  # bf16/fp16: the optimizer works on an fp32 copy
    psi, n = total_params, world_size
    layer = largest_layer_params
    big = largest_param if largest_param is not None else layer
    transient: dict[str, int] = {}
    buffers = 0
    master = 0
    if stage == 0:
        # Plain engine (fp32: the client optimizer on the parameters) or, for bf16/fp16 with a
        # non-fused client optimizer, runtime/fp16/unfused_optimizer.py FP16_UnfusedOptimizer:
        # fp32_groups = an fp32 clone of every parameter.
        params, grads = psi * p_b, psi * p_b
        master = psi * MASTER_BYTES if low else 0
        moments = psi * MOMENT_BYTES
        if n > 1:  # engine.buffered_allreduce_fallback flattens the gradients into a bucket
            transient["allreduce_bucket"] = min(psi, ENGINE_ALLREDUCE_ELEMENTS) * p_b
        if low:  # FP16_UnfusedOptimizer.step: fp32 copies of all gradients before the update
            transient["fp32_grads"] = psi * MASTER_BYTES
        shard = psi
    elif stage in (1, 2):
        groups = param_groups or [[psi]]
        sizes, kept = _stage12_partitions(groups, n) if param_groups else ([_ceil_div(psi, n)], _ceil_div(psi, n))
        shard = sum(sizes)
        params = psi * p_b                        # bit16_groups_flat: whole model on every rank
        master = shard * MASTER_BYTES             # single_partition_of_fp32_groups (a clone, fp32 too)
        moments = shard * MOMENT_BYTES
        grads = kept * p_b                        # grads_in_partition: whole grads of overlapping params
        nbuf = 2 if z["overlap_comm"] else 1
        bucket = min(nbuf * z["reduce_bucket_size"], psi) * p_b if z["contiguous_gradients"] else 0
        if stage == 1:
            # Stage 1 reduces at the accumulation boundary: every unreduced gradient exists, then
            # reduce_gradients copies them into the ipg bucket (setup_buckets / reduce_ipg_grads);
            # the kept gradients (counted in the states) are allocated only after that.
            transient["backward"] = max(psi * p_b + bucket - grads, 0)
        else:
            # Stage 2 reduces during backward: gradients are copied into the ipg bucket(s) as they
            # are produced (reduce_independent_p_g_buckets_and_remove_grads).
            transient["backward"] = bucket + big * p_b
        # step(): the kept gradients flattened into the partition, then cast to fp32
        transient["step"] = max(sizes) * p_b + (max(sizes) * MASTER_BYTES if low else 0)
        if offload_optimizer:
            # copy_grads_in_partition's cpu_offload branch moves the kept gradients to the host's
            # fp32 buffer; the step then runs on the host
            grads = 0
            transient.pop("step")
    else:
        groups = param_groups or [[psi]]
        flat = [x for g in groups for x in g]
        parts = [[_ceil_div(x, n) for x in g] for g in groups] if param_groups else [[_ceil_div(psi, n)]]
        shard = sum(sum(g) for g in parts)
        persist = 0
        if param_groups:  # parameter_offload.py mark_persistent_parameters: small ones stay gathered
            for x in flat:
                if x <= z["param_persistence_threshold"] and persist + x <= z["model_persistence_threshold"]:
                    persist += x
        params = shard * p_b + persist * p_b      # ds_tensor partitions (lp_param_buffer) + persistent params
        # stage3.py _create_fp32_partitions: the fp32 master is a clone in fp32 too (its "no copy"
        # branch compares a torch.device with a device-name string, which is never equal)
        master = shard * MASTER_BYTES
        moments = shard * MOMENT_BYTES
        grads = shard * p_b                       # grad_partitions_flat_buffer (_setup_for_real_optimizer)
        if z["contiguous_gradients"]:             # the ipg bucket, persistent, touched as it fills
            buffers = min(z["reduce_bucket_size"], psi - persist) * p_b
        live = psi - persist
        # PartitionedParameterCoordinator keeps gathered parameters until max_live_parameters are
        # resident (always at least the module running); backward adds the prefetch bucket and
        # the largest layer's unreduced gradient. An approximation: measured within ~20%.
        gathered = min(live, max(layer, z["max_live_parameters"]))
        transient["gathered_params"] = gathered * p_b
        if not z["memory_efficient_linear"]:
            # plain F.linear saves a view of the gathered weight for backward: released parameters
            # stay allocated until their backward (LinearFunctionForZeroStage3 avoids that)
            transient["backward"] = (live + layer) * p_b
        else:
            transient["backward"] = (min(live, gathered + z["prefetch_bucket_size"]) + layer) * p_b
        sub = min(max(sum(g) for g in parts), max(z["sub_group_size"], 1))
        transient["step"] = sub * p_b + (sub * MASTER_BYTES if low else 0)  # _prepare_fp32_grad_for_sub_group
        if offload_optimizer:
            transient.pop("step")
    optimizer = master + moments
    host = nvme = 0
    if stage == 3 and (z.get("nvme_optimizer") or z.get("nvme_param")) and (offload_optimizer or offload_param):
        return _stage3_nvme(params, grads, buffers, transient, shard, z, param_groups or [[psi]], n, p_b,
                            offload_optimizer, offload_param)
    if offload_optimizer:
        # optimizer states, the fp32 master partition and an fp32 gradient partition live on the host
        host += optimizer + shard * MASTER_BYTES
        optimizer = master = 0
        if stage == 3:
            host += grads
            grads = 0
        else:
            # stage_1_and_2.py with cpu_offload: a low-precision copy of the partition for the updated
            # weights (param_buffer_of_bit16_for_cpu_offload_groups) on the host, and two buffers of
            # the largest parameter's gradient, one on each side (temp_grad_buffer_for_{cpu,gpu}_offload)
            host += shard * p_b + big * p_b
            buffers += big * p_b
    if offload_param:
        host += shard * p_b
        params -= shard * p_b
    return _states_row(params, grads, optimizer, master, buffers, transient, shard, host, nvme)


def _states_row(params: int, grads: int, optimizer: int, master: int, buffers: int, transient: dict[str, int],
                shard: int, host: int, nvme: int) -> dict[str, Any]:
    gathered_bytes = transient.get("gathered_params", 0)
    transient_bytes = max((v for k, v in transient.items() if k != "gathered_params"), default=0)
    states = params + grads + optimizer + buffers
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optimizer, "master_bytes": master,
            "buffers_bytes": buffers, "gathered_layer_bytes": gathered_bytes, "model_states_bytes": states,
            "transient_bytes": transient_bytes, "transient": transient, "partition_numel": shard,
            "host_bytes": host, "nvme_bytes": nvme}


def _stage3_nvme(params: int, grads: int, buffers: int, transient: dict[str, int], shard: int, z: dict[str, Any],
                 groups: list[list[int]], n: int, p_b: int, offload_optimizer: bool, offload_param: bool) -> dict[str, Any]:
    """ZeRO-3 with an offload to NVMe (ZeRO-Infinity), from stage3.py and swap_tensor/ (DeepSpeed 0.19):

    * optimizer on NVMe: each sub-group whose fp32 partition is at least ``max(MIN_AIO_BYTES,
      aio.block_size)`` keeps its fp32 master, Adam moments and fp32 gradient in swap files (16 bytes
      per element); smaller ones stay in RAM as with CPU offload. RAM holds ``buffer_count``
      swap buffers of the largest swappable sub-group (fp32, ``SwapBufferManager``), plus one fp32
      buffer of the largest sub-group that every sub-group's ``.grad`` views
      (``initialize_optimizer_states``); the low-precision gradient partition stays in RAM.
    * parameters on NVMe: the partitions beyond ``max_in_cpu`` elements live in swap files; RAM
      holds ``buffer_count x buffer_size`` elements of swap buffers (``AsyncPartitionedParameterSwapper``)
      and, once any sub-group has no CPU copy, a buffer of the largest sub-group's *whole*
      parameters (``reserve_partitioned_swap_space``). Persistent (small) parameters stay in RAM.
    """
    host = nvme = 0
    subs = _stage3_sub_groups(groups, n, z["sub_group_size"])
    master = moments = 0
    if offload_optimizer:
        transient.pop("step", None)
        if z["nvme_optimizer"]:
            threshold = max(MIN_AIO_BYTES, z["aio_block_size"])
            swappable = [part for part, _ in subs if part * MASTER_BYTES >= threshold]
            in_ram = sum(part for part, _ in subs) - sum(swappable)
            nvme += sum(swappable) * (MASTER_BYTES + MOMENT_BYTES + MASTER_BYTES)
            host += in_ram * (MASTER_BYTES + MOMENT_BYTES + MASTER_BYTES)
            largest = max([part for part, _ in subs], default=0)
            host += z["optimizer_buffer_count"] * _aligned(max(swappable, default=0), MASTER_BYTES) * MASTER_BYTES
            host += largest * MASTER_BYTES  # the shared fp32 .grad buffer
        else:
            host += shard * (MASTER_BYTES + MOMENT_BYTES + MASTER_BYTES)
        host += grads  # the low-precision gradient partition (grad_partitions_flat_buffer)
        grads = 0
    else:
        master, moments = shard * MASTER_BYTES, shard * MOMENT_BYTES
    if offload_param:
        params -= shard * p_b
        if z["nvme_param"]:
            in_cpu = min(z["max_in_cpu"], shard)
            host += in_cpu * p_b
            nvme += (shard - in_cpu) * p_b
            host += z["param_buffer_count"] * _aligned(z["param_buffer_size"], p_b) * p_b
            if in_cpu < shard:
                host += _aligned(max(whole for _, whole in subs), p_b) * p_b
        else:
            host += shard * p_b
    return _states_row(params, grads, master + moments, master, buffers, transient, shard, host, nvme)


def deepspeed_estimate(total_params: int, largest_layer_params: int, stage: int, *, gpus_per_node: int,
                       num_nodes: int, offload_optimizer: bool = False, offload_param: bool = False,
                       zero_init: bool = False,
                       additional_buffer_factor: float = DEEPSPEED_BUFFER_FACTOR) -> Optional[dict[str, Any]]:
    """DeepSpeed's own model-state estimate for ZeRO-2/3 (None where it has none)."""
    if stage == 2 and not offload_param:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=total_params, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes,
            cpu_offload=offload_optimizer, additional_buffer_factor=additional_buffer_factor)
        name, extra = "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs", {}
    elif stage == 3 and (offload_optimizer or not offload_param):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=total_params, largest_layer_params=largest_layer_params, num_gpus_per_node=gpus_per_node,
            num_nodes=num_nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_param,
            zero_init=zero_init, additional_buffer_factor=additional_buffer_factor)
        name = "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
        extra = {"cpu_offload_params": offload_param, "zero_init": zero_init}
    else:
        return None
    return {"function": name, "device_bytes": int(gpu), "host_bytes_per_node": int(cpu),
            "additional_buffer_factor": additional_buffer_factor, "cpu_offload": offload_optimizer, **extra}


def _offload_device(ds: dict[str, Any], key: str) -> Optional[str]:
    device = (ds.get("zero_optimization") or {}).get(key, {}) or {}
    device = device.get("device", "none") if isinstance(device, dict) else "none"
    return None if device in (None, "none") else str(device)


def _ds_precision(ds: dict[str, Any]) -> Optional[str]:
    for name in ("bf16", "fp16"):
        if (ds.get(name) or {}).get("enabled") is True:
            return name
    if all((ds.get(name) or {}).get("enabled") is False for name in ("bf16", "fp16")):
        return "fp32"
    return None  # "auto" or absent: the experiment decides


def stage_variants(ds_config: Optional[dict[str, Any]]) -> list[tuple[int, bool, bool]]:
    """(stage, offload_optimizer, offload_param) to report: stages 0-3 without a config; with
    one, its stage without offload plus each offload level up to what the config offloads."""
    if ds_config is None:
        return [(s, False, False) for s in range(4)]
    from mindeye_dist.ds_config import zero_stage

    stage = zero_stage(ds_config)
    opt = _offload_device(ds_config, "offload_optimizer") is not None and stage >= 1
    par = _offload_device(ds_config, "offload_param") is not None and stage == 3
    variants = [(stage, False, False)]
    if opt or par:
        if par and opt:
            variants.append((stage, True, False))
        variants.append((stage, opt, par))
    return variants


def variant_key(stage: int, offload_optimizer: bool, offload_param: bool) -> str:
    return str(stage) + ("+offload_optimizer" if offload_optimizer else "") + ("+offload_param" if offload_param else "")


def estimate_memory(model: MindEye, *, ds_config: Optional[dict[str, Any]] = None,
                    world_size: Optional[int] = None, gpus_per_node: Optional[int] = None,
                    micro_batch_size: Optional[int] = None, precision: Optional[str] = None) -> dict[str, Any]:
    """Bytes per rank for each ZeRO stage (or the DeepSpeed config's stage and its offload
    variants) of ``model`` (on the meta device); layout in the module docstring.

    Defaults: world size 1; GPUs per node = world size up to 8, else 8; micro-batch and precision
    from the DeepSpeed config when it sets numbers, else 32 and bf16.
    """
    ds = ds_config or {}
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if gpus_per_node is None:
        gpus_per_node = world_size if world_size <= 8 else 8
    if gpus_per_node < 1 or world_size % gpus_per_node:
        raise ValueError(f"world size {world_size} is not a multiple of {gpus_per_node} GPUs per node; "
                         f"pass --gpus-per-node")
    if micro_batch_size is None:
        micro = ds.get("train_micro_batch_size_per_gpu")
        micro_batch_size = micro if isinstance(micro, int) and not isinstance(micro, bool) else DEFAULT_MICRO_BATCH
    if micro_batch_size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {micro_batch_size}")
    precision = precision or _ds_precision(ds) or DEFAULT_PRECISION
    if precision not in STATE_BYTES:
        raise ValueError(f"precision must be one of {', '.join(STATE_BYTES)}, got {precision!r}")
    num_nodes = world_size // gpus_per_node

    psi = sum(p.numel() for p in model.parameters())
    layer_name, layer_params = largest_layer(model)
    groups = optimizer_group_numels(model)
    biggest = max((n for g in groups for n in g), default=0)
    per_sample, fixed = activation_elements(model)
    act_b = ACTIVATION_BYTES[precision]
    activations = (fixed + per_sample * micro_batch_size) * act_b

    stages: dict[str, Any] = {}
    for stage, opt, par in stage_variants(ds_config):
        zero = zero_settings(ds_config, stage)
        states = model_states_per_rank(psi, layer_params, world_size, stage, precision=precision,
                                       offload_optimizer=opt, offload_param=par, param_groups=groups, zero=zero,
                                       largest_param=biggest)
        # zero_init: mindeye_dist.train builds the model under deepspeed.zero.Init at stage 3
        ds_est = deepspeed_estimate(psi, layer_params, stage, gpus_per_node=gpus_per_node, num_nodes=num_nodes,
                                    offload_optimizer=opt, offload_param=par, zero_init=stage == 3)
        stages[variant_key(stage, opt, par)] = {
            "stage": stage, "offload_optimizer": opt, "offload_param": par, **states,
            "activations_bytes": activations, "total_bytes": states["model_states_bytes"] + activations,
            "peak_bytes": states["model_states_bytes"] + states["transient_bytes"] + activations,
            "zero": {k: zero[k] for k in ("reduce_bucket_size", "overlap_comm", "contiguous_gradients")}
            | ({k: zero[k] for k in ("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters",
                                     "max_reuse_distance", "sub_group_size")} if stage == 3 else {}),
            "deepspeed_estimate_bytes": None if ds_est is None else ds_est["device_bytes"],
            "deepspeed_estimate": ds_est,
        }
    from mindeye_dist.ds_config import zero_stage

    return {
        "world_size": world_size, "gpus_per_node": gpus_per_node, "num_nodes": num_nodes,
        "micro_batch_size": micro_batch_size, "precision": precision,
        "ds_config_stage": None if ds_config is None else zero_stage(ds_config),
        "total_params": psi, "largest_layer_params": layer_params, "largest_layer": layer_name,
        "activations_bytes_per_sample": per_sample * act_b, "activations_fixed_bytes": fixed * act_b,
        "activations_bytes": activations, "stages": stages,
    }


def format_table(result: dict[str, Any]) -> str:
    """Human-readable rows: component, parameters, training FLOPs per sample; then memory per rank."""
    flops = result.get("flops", {})
    rows = [f"preset {result['preset']}", f"{'component':<12} {'params':>16} {'train FLOP/sample':>20}"]
    for name in (*COMPONENTS, "other", "total"):
        if name == "other" and not flops:
            continue
        n = result["params"].get(name)
        f = flops.get(name)
        rows.append(f"{name:<12} {'' if n is None else f'{n:,}':>16} {'' if f is None else f'{f:.4g}':>20}")
    rows.append(f"(backbone includes {result['params']['backbone_adapters']:,} in per-subject adapters)")
    if "memory" in result:
        rows += ["", format_memory_table(result["memory"])]
    return "\n".join(rows)


def format_memory_table(mem: dict[str, Any]) -> str:
    """Memory per rank in GiB (2**30 bytes), one row per stage variant."""
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    nodes = f"{mem['gpus_per_node']} GPU{'s' if mem['gpus_per_node'] > 1 else ''}/node x {mem['num_nodes']} node" \
            f"{'s' if mem['num_nodes'] > 1 else ''}"
    rows = [
        f"memory per rank, GiB: world size {mem['world_size']} ({nodes}), {mem['precision']}, "
        f"micro-batch {mem['micro_batch_size']}",
        f"params {mem['total_params']:,}; largest layer {mem['largest_layer'] or '-'} "
        f"{mem['largest_layer_params']:,}; activations {mem['activations_bytes_per_sample'] / 2**20:.2f} MiB/sample "
        f"+ {mem['activations_fixed_bytes'] / 2**20:.2f} MiB fixed (leaf outputs, no checkpointing)",
    ]
    cols = ("params", "grads", "optim", "buffers", "states", "transient", "activ", "peak", "host", "DS dev",
            "DS host/node")
    width = max(len(k) for k in ["stage", *mem["stages"]]) + 2
    rows.append(f"{'stage':<{width}}" + "".join(f"{c:>10}" if c != "DS host/node" else f"{c:>13}" for c in cols))
    for key, s in mem["stages"].items():
        ds = s["deepspeed_estimate"]
        vals = [s["params_bytes"], s["grads_bytes"], s["optimizer_bytes"], s["buffers_bytes"], s["model_states_bytes"],
                s["transient_bytes"], s["activations_bytes"], s["peak_bytes"], s["host_bytes"],
                s["deepspeed_estimate_bytes"]]
        rows.append(f"{key:<{width}}" + "".join(f"{gib(v):>10}" for v in vals)
                    + f"{gib(None if ds is None else ds['host_bytes_per_node']):>13}")
    rows.append("(optim = fp32 master + Adam moments; buffers = ZeRO-3's ipg bucket; states = params + grads + "
                "optim + buffers; transient = the largest of the step's temporary buffers (ZeRO-3: gathered "
                "parameters); peak = states + transient + activations; host = offloaded states per rank; DS = "
                f"DeepSpeed's estimator, additional_buffer_factor {DEEPSPEED_BUFFER_FACTOR} on host only)")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Will it fit? (before allocating)

HOST_MEMORY_CHECK_ENV = "MINDEYE_SKIP_MEMORY_CHECK"
"""Set to 1 to skip :func:`check_host_memory`."""


def _mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(model_cfg: ModelConfig, ds: dict[str, Any], precision: str, **build_kwargs: Any) -> None:
    """On a host without an accelerator, raise ConfigError on every rank when this node's ranks cannot fit.

    Called by :func:`mindeye_dist.trainer.build_model_for_engine` before the model exists. The
    prediction is :func:`estimate_memory`'s ``peak_bytes + host_bytes`` for the DeepSpeed config's
    own offload level (model states, the largest transient, activations; offloaded states count
    because the host is the same RAM), without the process's own ~0.6 GiB, so a run is refused only
    when its model alone exceeds ``MemAvailable``. Every rank reads ``MemAvailable`` before any rank
    allocates: the verdict is agreed through one all-reduce. ``build_kwargs`` go to ``build_model``.
    """
    import os

    import torch.distributed as dist

    from mindeye_dist.errors import ConfigError

    if torch.cuda.is_available() or os.environ.get(HOST_MEMORY_CHECK_ENV) == "1":
        return
    available = _mem_available_bytes()
    if available is None:
        return
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    with torch.device("meta"):
        meta = build_model(model_cfg, **build_kwargs)
    mem = estimate_memory(meta, ds_config=ds, world_size=world,
                          micro_batch_size=int(ds.get("train_micro_batch_size_per_gpu") or DEFAULT_MICRO_BATCH),
                          precision=precision)
    row = mem["stages"][list(mem["stages"])[-1]]  # the config's own offload level comes last
    need = row["peak_bytes"] + row["host_bytes"]
    short = torch.tensor([float(local * need - available)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item() > 0:
        gib = 2**30
        raise ConfigError(
            f"this run needs about {need / gib:.1f} GiB per rank x {local} ranks on this host "
            f"({mem['total_params'] / 1e9:.2f}B parameters, ZeRO-{row['stage']}"
            f"{' + offload' if row['host_bytes'] else ''}, {precision}, micro-batch {mem['micro_batch_size']}; "
            f"{row['host_bytes'] / gib:.1f} GiB of it offloaded to the host, which on a machine without an "
            f"accelerator is the same RAM), but MemAvailable is {available / gib:.1f} GiB. Use "
            f"ds_configs/zero3_nvme.json (optimizer states and parameters on disk), fewer ranks per host, a "
            f"smaller model (model.hidden_dim, model.lowlevel=false) or bf16; `python launchers/estimate.py` "
            f"shows the terms. Set {HOST_MEMORY_CHECK_ENV}=1 to start anyway.")
