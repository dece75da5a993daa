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

Model states follow the ZeRO paper (arXiv 1910.02054 section 5) with Adam, Ψ = parameter count,
N = world size (the data-parallel degree), bytes per parameter:

=========  ======  =====  =========================================================
precision  params  grads  optimizer states
=========  ======  =====  =========================================================
bf16/fp16  2       2      12 (fp32 master copy 4 + Adam m 4 + v 4)   = 16 in total
fp32       4       4      8  (Adam m, v; the params are the master copy) = 16 in total
=========  ======  =====  =========================================================

Stage 0 keeps all three whole on every rank; stage 1 partitions the optimizer states, stage 2
also the gradients, stage 3 also the parameters. A partition is ``ceil(Ψ / N)`` elements
(DeepSpeed's alignment padding is ignored). ZeRO-3 adds the largest layer gathered in full
during its backward: its parameters plus its unreduced gradient, ``L × (params + grads bytes)``
(4L in bf16, the same ``4 * largest_layer_params`` DeepSpeed's estimator uses), where L is the
largest number of parameters held directly by one module (DeepSpeed's definition).

Offload variants (only for a DeepSpeed config that offloads): ``offload_optimizer`` moves the
optimizer-state partition and an fp32 gradient partition (4 bytes/param) to the host (CPU, or
NVMe if the config says so); with stage 2/3 the device then keeps no gradient partition
(gradients are reduced through buckets straight into the host buffers; buckets are not
counted), with stage 1 it still holds the whole gradients. ``offload_param`` (stage 3) also moves
the parameter partition to the host; the gathered layer stays on the device.

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
Temporary buffers (DeepSpeed's reduce/all-gather buckets, the allocator's fragmentation, the
CUDA context of ~0.5-1 GiB) come on top.

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
              "params_bytes", "grads_bytes", "optimizer_bytes",  # on the device, per rank
              "gathered_layer_bytes",                            # ZeRO-3 only, else 0
              "model_states_bytes",                              # sum of the four above
              "activations_bytes",
              "total_bytes",                                     # model states + activations
              "host_bytes",                                      # offloaded states per rank (else 0)
              "deepspeed_estimate_bytes",                        # DeepSpeed's device bytes or None
              "deepspeed_estimate": None or {
                  "function": "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs",
                  "device_bytes": ..., "host_bytes_per_node": ...,
                  "additional_buffer_factor": 1.5, "zero_init": False,
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
(GPU: 2Ψ + 18Ψ/N for ZeRO-2, 4L + 18Ψ/N for ZeRO-3: the 2 bytes more than the paper's 16 are
the fp32 gradient partition) and apply ``additional_buffer_factor`` to host memory only; the host
number is per node. ``zero_init=False`` because this trainer builds the whole model on every rank
before ``deepspeed.initialize`` (no ``deepspeed.zero.Init``). DeepSpeed has no estimator for
stages 0 and 1 or for parameter offload without optimizer offload: those report None. Its
``model_to_params`` helpers deduplicate by ``data_ptr()``, which is 0 for every meta tensor, so
Ψ and L are counted here (``model.parameters()`` already yields a shared parameter once).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.mindeye import COMPONENTS, MindEye, build_model, component_parameters

STATE_BYTES: dict[str, tuple[int, int, int]] = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
"""Bytes per parameter of (params, grads, optimizer states) with Adam, per precision (ZeRO paper)."""

ACTIVATION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per activation element per precision."""

DEFAULT_MICRO_BATCH = 32
DEFAULT_PRECISION = "bf16"
DEEPSPEED_BUFFER_FACTOR = 1.5
"""``additional_buffer_factor`` passed to DeepSpeed's estimators (their default)."""


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


def measure_activation_elements(model: MindEye, batch_size: int, device: str | torch.device = "meta") -> int:
    """Leaf-module output elements of one training forward at ``batch_size``: model forward with
    every head plus the prior's loss (the forward half of :func:`measure_step_flops`' step)."""
    cfg = model.config
    voxels = torch.randn(batch_size, cfg.subject_table()[cfg.subject_names()[0]], device=device)
    targets = torch.randn(batch_size, cfg.n_tokens, cfg.token_dim, device=device)
    model.train()

    def forward() -> None:
        with torch.no_grad():
            out = model(voxels, subject=0)
            if model.prior is not None:
                model.prior.loss(out.backbone, targets)

    return leaf_output_elements(model, forward)


def activation_elements(model: MindEye, device: str | torch.device = "meta") -> tuple[int, int]:
    """(per-sample, batch-independent) leaf-output elements, from forwards at batch 2 and 4."""
    two = measure_activation_elements(model, 2, device)
    four = measure_activation_elements(model, 4, device)
    per_sample = (four - two) // 2
    return per_sample, two - 2 * per_sample


def model_states_per_rank(total_params: int, largest_layer_params: int, world_size: int, stage: int, *,
                          precision: str = DEFAULT_PRECISION, offload_optimizer: bool = False,
                          offload_param: bool = False) -> dict[str, int]:
    """Model-state bytes per rank for a ZeRO stage (formulas in the module docstring)."""
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
    p_b, g_b, o_b = STATE_BYTES[precision]
    psi = total_params
    shard = math.ceil(psi / world_size)
    params = (shard if stage >= 3 else psi) * p_b
    grads = (shard if stage >= 2 else psi) * g_b
    optimizer = (shard if stage >= 1 else psi) * o_b
    gathered = largest_layer_params * (p_b + g_b) if stage == 3 else 0
    host = 0
    if offload_optimizer:
        host += optimizer + shard * 4  # optimizer partition + fp32 gradient partition
        optimizer = 0
        if stage >= 2:
            grads = 0
    if offload_param:
        host += params
        params = 0
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optimizer,
            "gathered_layer_bytes": gathered, "model_states_bytes": params + grads + optimizer + gathered,
            "host_bytes": host}


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
    per_sample, fixed = activation_elements(model)
    act_b = ACTIVATION_BYTES[precision]
    activations = (fixed + per_sample * micro_batch_size) * act_b

    stages: dict[str, Any] = {}
    for stage, opt, par in stage_variants(ds_config):
        states = model_states_per_rank(psi, layer_params, world_size, stage, precision=precision,
                                       offload_optimizer=opt, offload_param=par)
        ds_est = deepspeed_estimate(psi, layer_params, stage, gpus_per_node=gpus_per_node, num_nodes=num_nodes,
                                    offload_optimizer=opt, offload_param=par)
        stages[variant_key(stage, opt, par)] = {
            "stage": stage, "offload_optimizer": opt, "offload_param": par, **states,
            "activations_bytes": activations, "total_bytes": states["model_states_bytes"] + activations,
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
    cols = ("params", "grads", "optim", "gathered", "states", "activ", "total", "host", "DS dev", "DS host/node")
    width = max(len(k) for k in ["stage", *mem["stages"]]) + 2
    rows.append(f"{'stage':<{width}}" + "".join(f"{c:>10}" if c != "DS host/node" else f"{c:>13}" for c in cols))
    for key, s in mem["stages"].items():
        ds = s["deepspeed_estimate"]
        vals = [s["params_bytes"], s["grads_bytes"], s["optimizer_bytes"], s["gathered_layer_bytes"],
                s["model_states_bytes"], s["activations_bytes"], s["total_bytes"], s["host_bytes"],
                s["deepspeed_estimate_bytes"]]
        rows.append(f"{key:<{width}}" + "".join(f"{gib(v):>10}" for v in vals)
                    + f"{gib(None if ds is None else ds['host_bytes_per_node']):>13}")
    rows.append(f"(total = model states + activations; host = offloaded states per rank; DS = DeepSpeed's "
                f"estimator, additional_buffer_factor {DEEPSPEED_BUFFER_FACTOR} on host only, zero_init off)")
    return "\n".join(rows)
