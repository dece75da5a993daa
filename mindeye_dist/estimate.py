"""Parameter counts and training FLOPs per sample for a model config, without allocating it.

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
     "memory": {...}}   # only when a DeepSpeed config and world size are given (not yet implemented)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from mindeye_dist.models.config import ModelConfig
from mindeye_dist.models.mindeye import COMPONENTS, MindEye, build_model, component_parameters


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
             ds_config: Optional[dict[str, Any]] = None, world_size: Optional[int] = None) -> dict[str, Any]:
    """Counts for ``cfg`` at the given data dims (else the preset's fixed or nominal dims)."""
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
        result["memory"] = estimate_memory(params, ds_config=ds_config, world_size=world_size)
    return result


def estimate_memory(params: dict[str, int], *, ds_config: Optional[dict[str, Any]],
                    world_size: Optional[int]) -> dict[str, Any]:
    """Memory per rank for a ZeRO stage: the place for the ZeRO memory model (not written yet)."""
    raise NotImplementedError("memory per ZeRO stage is not implemented yet; run estimate without "
                              "--ds-config/--world-size for parameter and FLOP counts")


def format_table(result: dict[str, Any]) -> str:
    """Human-readable rows: component, parameters, training FLOPs per sample."""
    flops = result.get("flops", {})
    rows = [f"preset {result['preset']}", f"{'component':<12} {'params':>16} {'train FLOP/sample':>20}"]
    for name in (*COMPONENTS, "other", "total"):
        if name == "other" and not flops:
            continue
        n = result["params"].get(name)
        f = flops.get(name)
        rows.append(f"{name:<12} {'' if n is None else f'{n:,}':>16} {'' if f is None else f'{f:.4g}':>20}")
    rows.append(f"(backbone includes {result['params']['backbone_adapters']:,} in per-subject adapters)")
    return "\n".join(rows)
