"""The training engine: DeepSpeed behind one small protocol the loop talks to.

The loop calls ``engine(*inputs)``, ``engine.backward(loss)``, ``engine.step() -> applied`` once
per micro-batch (DeepSpeed decides where the accumulation boundary is) and ``save``/``load``.
ZeRO stage, offload and communication come from the resolved ds JSON; precision, accumulation,
clipping, optimizer and schedule from the experiment config.

Non-finite steps: every rank must agree to skip, or ranks diverge. ZeRO 1/2 (with the overflow
check switched on here), ZeRO-3 and bf16 ZeRO-0 detect inf/NaN in the reduced gradients
themselves, skip the update on every rank and report it through ``was_step_applied()``. Plain
fp32 ZeRO-0 does not (it writes NaN into the weights), so for it the gradients are checked after
the all-reduce, the verdict is all-reduced, and the optimizer's step is turned into a no-op for
that step. The LR scheduler is stepped here, only for applied steps, so all stages agree.
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
    finite_check: str = "norm"
    """fp32 ZeRO-0's non-finite gradient check: ``norm`` (one ``get_total_norm`` pass) or
    ``per_param`` (``isfinite().all()`` per parameter, ~6 bytes of temporaries per gradient
    element at the peak: 21 GiB at MindEye1 size; 1.19x slower measured)."""


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
        if hasattr(self.engine.optimizer, "check_grad_overflow"):
            # ZeRO 1/2 skip the overflow check in fp32 by default; with it on they skip
            # non-finite steps on every rank (the check is all-reduced).
            self.engine.optimizer.check_grad_overflow = True
        self._one_rank_zero0 = self.zero_stage == 0 and self.engine.world_size == 1
        log.info("optimizer: %s, ZeRO stage %d, %s", self.optimizer_name, self.zero_stage, cfg.train.precision)

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
        if boundary and self.manual_finite_check:
            self._skip_next = not self._local_grads_finite_everywhere()
        self.engine.step()
        if not boundary:
            return True
        applied = self.engine.was_step_applied() and not self._skip_next
        self._skip_next = False
        if applied:
            self.scheduler.step()
        return applied

    def _local_grads_finite_everywhere(self) -> bool:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if self.options.finite_check == "per_param":
            ok = all(bool(torch.isfinite(g).all()) for g in grads)
            bad = torch.tensor([0.0 if ok else 1.0], device=self.device)
        else:
            # One norm over all gradients is non-finite iff some element is.
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
            bad = (~torch.isfinite(norm)).float().reshape(1).to(self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

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

    def load(self, ckpt_dir: Path, tag: str) -> None:
        from mindeye_dist.checkpoint import safe_deepspeed_load  # weights-only; names a damaged file

        path, _ = safe_deepspeed_load(self.engine, ckpt_dir, tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")

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
