"""The training engine: DeepSpeed behind one small protocol the loop talks to.

The loop calls ``engine(*inputs)``, ``engine.backward(loss)``, ``engine.step() -> applied`` once
per micro-batch (DeepSpeed decides where the accumulation boundary is) and ``save``/``load``.
ZeRO stage, offload and communication come from the resolved ds JSON; precision, accumulation,
clipping, optimizer and schedule from the experiment config.

Non-finite steps: every rank must agree to skip, or ranks diverge. ZeRO 1/2 (with the overflow
check switched on here) and ZeRO-3 detect inf/NaN in the reduced gradients themselves, skip the
update on every rank and report it through ``was_step_applied()``. At ZeRO-0 the engine checks
itself: one fp32 norm over the (all-reduced) gradients, non-finite iff some element is, the
verdict all-reduced, and the update skipped on every rank. The LR scheduler is stepped here,
only for applied steps, so all stages agree.

The ZeRO-0 update (``EngineOptions.fused_update``): that one norm pass is also the clipping norm
and the logged grad norm, and the clip factor goes into torch's fused AdamW kernel
(``grad_scale``, the hook ``torch.amp.GradScaler`` uses) instead of a pass that multiplies every
gradient. DeepSpeed's own paths read every gradient three to five times per step: in fp32 its
``clip_grad_norm_`` takes a second norm and multiplies every gradient by min(1, coef) even when
nothing is clipped; in bf16 its ``FP16_UnfusedOptimizer.step`` scans every gradient for overflow
(``amax`` and ``amin``: 220 ms of a 630 ms optimizer step at 214M parameters), takes a norm, and
multiplies every fp32 gradient copy by 1 / (loss scale 1 x clip). What stays DeepSpeed's: its
fp32 master copies (``fp32_groups``), its checkpoint format and state, the skip bookkeeping
(``overflow``, ``_skip_invalid_grad_norm``), so checkpoints and resume are unchanged.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from mindeye_dist.config import ExperimentConfig
from mindeye_dist.ds_config import offloads_optimizer, zero_stage
from mindeye_dist.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

CLIP_EPS = 1e-6
"""DeepSpeed's and torch's clip factor: max_norm / (norm + 1e-6)."""


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class EngineOptions:
    """Speed-ups the engine applies, as switches the benchmark turns off one at a time to measure
    what each buys (BENCHMARKS.md); read at every step, so they can change between steps."""

    skip_one_rank_allreduce: bool = True
    """At ZeRO-0 with one rank, skip DeepSpeed's gradient all-reduce: it still flattens every
    gradient into buckets, "all-reduces" them over one rank, scales by 1/1 and copies them back
    (20% of a 214M-parameter step; 1.26x measured)."""
    fused_update: bool = True
    """ZeRO-0: one gradient-norm pass for the non-finite check, clipping and the logged norm, the
    clip factor applied inside the fused AdamW kernel, and in bf16 this lean step in place of
    DeepSpeed's ``FP16_UnfusedOptimizer.step`` (see the module doc). Off: DeepSpeed's own paths."""


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """fp32 2-norm of all ``grads`` as one vector; non-finite iff some element is non-finite (or
    the sum of squares overflows fp32, which DeepSpeed also rejects). bf16 gradients are reduced
    with fp32 accumulation straight from their 2 bytes, without an fp32 copy."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def reads_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW divide every gradient by ``optimizer.grad_scale`` inside the kernel."""
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))


class DeepSpeedEngine:
    """A DeepSpeed engine plus the client optimizer and LR scheduler it was built with."""

    def __init__(self, model: nn.Module, cfg: ExperimentConfig, ds_config: dict[str, Any], total_steps: int,
                 device: torch.device, options: Optional[EngineOptions] = None):
        import deepspeed

        self.options = options or EngineOptions()
        self.device = device
        self.dtype = compute_dtype(cfg.train.precision)
        self.zero_stage = zero_stage(ds_config)
        optimizer, self.optimizer_name = build_optimizer(model, cfg.optim, device=device, offload=offloads_optimizer(ds_config))
        self.basic_optimizer = optimizer
        self.manual_finite_check = self.zero_stage == 0 and self.dtype == torch.float32
        self._skip_next = False
        if self.manual_finite_check:
            # Installed before the LR scheduler wraps optimizer.step (it warns about later overrides).
            original_step = optimizer.step

            def guarded_step(opt, *args, **kwargs):
                if self._skip_next:
                    return None
                return original_step(*args, **kwargs)

            optimizer.step = types.MethodType(guarded_step, optimizer)
        self.scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        self.clip = float(self.engine.gradient_clipping() or 0.0)
        if hasattr(self.engine.optimizer, "check_grad_overflow"):
            # ZeRO 1/2 skip the overflow check in fp32 by default; with it on they skip
            # non-finite steps on every rank (the check is all-reduced).
            self.engine.optimizer.check_grad_overflow = True
        self._one_rank_zero0 = self.zero_stage == 0 and self.engine.world_size == 1
        self.fused_path = self._install_fused_update()
        log.info("optimizer: %s, ZeRO stage %d, %s, update: %s", self.optimizer_name, self.zero_stage,
                 cfg.train.precision, self.fused_path or "DeepSpeed's")

    def _install_fused_update(self) -> Optional[str]:
        """Route ZeRO-0's clipping (fp32) or its whole bf16 optimizer step through the fused path,
        each switchable per step by ``options.fused_update``; returns which, or None."""
        if self.manual_finite_check:
            deepspeed_clip = self.engine.clip_fp32_gradients

            def clip_fp32_gradients() -> None:
                if not self.options.fused_update:
                    deepspeed_clip()  # otherwise clipping was folded into the optimizer step by step()

            self.engine.clip_fp32_gradients = clip_fp32_gradients
            return "fp32 ZeRO-0: one norm pass, clip inside the fused AdamW"
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        wrapper = self.engine.optimizer
        if (self.zero_stage == 0 and isinstance(wrapper, FP16_UnfusedOptimizer) and self.dtype == torch.bfloat16
                and not wrapper.loss_scale_config.use_grad_scaling and wrapper.loss_scale_config.cur_scale == 1.0):
            deepspeed_step = wrapper.step

            def step(closure=None):
                return self._bf16_fused_step(wrapper) if self.options.fused_update else deepspeed_step(closure)

            wrapper.step = step
            return "bf16 ZeRO-0: one bf16 norm pass, clip inside the fused AdamW, no overflow scan"
        return None

    # -- the loop's protocol ------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        if self._one_rank_zero0:
            self.engine.enable_backward_allreduce = not self.options.skip_one_rank_allreduce
        self.engine.backward(loss)

    def at_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def step(self) -> bool:
        """Step (a no-op between accumulation boundaries); True if the update was applied."""
        boundary = self.at_boundary()
        norm = None
        if boundary and self.manual_finite_check:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = self._finite_norm_everywhere(grads)
            self._skip_next = norm is None
            if norm is not None and self.options.fused_update:
                self._fold_clip(norm, grads)
        try:
            self.engine.step()
        finally:
            self._unfold_clip()
        if not boundary:
            return True
        applied = self.engine.was_step_applied() and not self._skip_next
        if self.manual_finite_check:  # DeepSpeed keeps no grad norm at fp32 ZeRO-0
            self.engine._global_grad_norm = norm if norm is not None else float("inf")
        self._skip_next = False
        if applied:
            self.scheduler.step()
        return applied

    # -- the fused ZeRO-0 update ----------------------------------------------------------------

    def _finite_norm_everywhere(self, grads: list[torch.Tensor]) -> Optional[float]:
        """The gradients' fp32 norm, or None when it is non-finite on any rank (all-reduced verdict)."""
        norm = total_grad_norm(grads)
        bad = (~torch.isfinite(norm)).float().reshape(1).to(self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return None if bad.item() else float(norm)

    def _fold_clip(self, norm: float, grads: list[torch.Tensor]) -> None:
        """Clip by global norm as DeepSpeed does (factor max_norm / (norm + 1e-6) when below 1), the
        factor applied inside the fused AdamW kernel when it takes one, else by one multiply pass."""
        if self.clip <= 0 or self.clip / (norm + CLIP_EPS) >= 1.0:
            return  # DeepSpeed multiplies by min(1, factor) = 1 here: skipping it changes nothing
        if reads_grad_scale(self.basic_optimizer):
            self.basic_optimizer.grad_scale = torch.tensor((norm + CLIP_EPS) / self.clip, dtype=torch.float32)
        else:
            torch._foreach_mul_(grads, self.clip / (norm + CLIP_EPS))

    def _unfold_clip(self) -> None:
        if getattr(self.basic_optimizer, "grad_scale", None) is not None:
            self.basic_optimizer.grad_scale = None

    @torch.no_grad()
    def _bf16_fused_step(self, wrapper) -> bool:
        """``FP16_UnfusedOptimizer.step`` for bf16 without loss scaling, in four passes: the bf16
        gradients' norm (2 bytes/param read), their fp32 copies for the master weights, the fused
        AdamW (clip inside), the copy back to bf16. Returns ``overflow`` as DeepSpeed's does."""
        low = [p for group in wrapper.fp16_groups for p in group]
        master = [p for group in wrapper.fp32_groups for p in group]
        norm = self._finite_norm_everywhere([p.grad for p in low if p.grad is not None])
        if norm is None:
            return wrapper._skip_invalid_grad_norm()  # overflow=True, grads dropped, step skipped
        for hp, lp in zip(master, low):  # DeepSpeed hands a parameter without a gradient zeros
            hp.grad = torch.zeros_like(hp) if lp.grad is None else lp.grad.to(hp.dtype)
        wrapper._global_grad_norm = norm
        wrapper._update_scale(False)
        try:
            self._fold_clip(norm, [hp.grad for hp in master])
            wrapper.optimizer.step()
        finally:
            self._unfold_clip()
        for hp in master:
            hp.grad = None
        torch._foreach_copy_(low, master)  # round the updated fp32 masters into the bf16 weights
        wrapper.overflow = False
        return wrapper.overflow

    # -- metrics --------------------------------------------------------------------------------

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, ckpt_dir: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={}, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str, universal: bool = False) -> None:
        """Weights and optimizer state of ``tag``, read weights-only (a damaged file is named);
        ``universal``: ``tag`` is DeepSpeed's universal format (any number of ranks; see
        checkpoint.universal_for)."""
        from mindeye_dist.checkpoint import safe_deepspeed_load

        config = self.engine._config
        # DeepSpeed reads `checkpoint.load_universal` only inside load_checkpoint, so it is switched
        # on for this call alone rather than in the JSON (later saves stay ordinary checkpoints).
        before, config.load_universal_checkpoint = config.load_universal_checkpoint, universal
        try:
            path, _ = safe_deepspeed_load(self.engine, ckpt_dir, tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = before
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
        if universal:
            self._load_buffers(Path(ckpt_dir) / tag)

    def _load_buffers(self, tag_dir: Path) -> None:
        """The module's buffers from ``tag_dir``'s model-states file. DeepSpeed 0.19.8's universal
        load restores parameters from ``zero/`` and skips the module state dict, so buffers (the
        ridge skip's fitted map, norm statistics) would stay as built: a run resumed on another
        number of ranks would lose them."""
        from mindeye_dist.checkpoint import model_states_file, safe_torch_load

        buffers = dict(self.engine.module.named_buffers())
        if not buffers:
            return
        saved = safe_torch_load(model_states_file(tag_dir), mmap=True)["module"]
        missing = [name for name in buffers if name not in saved]
        if missing:
            raise RuntimeError(f"checkpoint {tag_dir} lacks the model's buffers {missing[:5]}")
        with torch.no_grad():
            for name, buf in buffers.items():
                buf.copy_(saved[name].to(buf.dtype))

    def scheduler_state(self) -> dict[str, Any]:
        """The schedule's state and the hyperparameters it wrote into the optimizer's groups
        (OneCycle sets lr and, with cycle_momentum, beta1 on every step)."""
        groups = [{k: v for k, v in g.items() if k in ("lr", "betas", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")}
                  for g in self.scheduler.optimizer.param_groups]
        return {"scheduler": self.scheduler.state_dict(), "groups": groups}

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        for group, saved in zip(self.scheduler.optimizer.param_groups, state["groups"]):
            group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
