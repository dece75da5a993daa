"""Preemption: on SIGTERM every rank finishes its step, the run checkpoints and exits 0.

SLURM (``--signal``, preemption, the time limit), Kubernetes (pod deletion, node drain) and
spot-instance agents send SIGTERM and follow with SIGKILL after a grace period. The handler only
records that the signal came; the training loop asks :meth:`Preemption.agreed` once per step,
which all-reduces the flag (MAX) so that every rank stops after the same step even when the
signal reaches the ranks at different times, or only some of them (one node of several). The
reduction runs on a CPU tensor over gloo (the world group on CPU; a gloo group beside NCCL on
GPU), so it never waits for the device: one 4-byte all-reduce per step.

While the flag is unset nothing changes: the run is bit-for-bit the run without the handler.
A second SIGTERM while the checkpoint is being written changes nothing either (the launchers'
SIGKILL after their grace period is what ends a save that takes too long, and the commit
protocol of :mod:`mindeye_dist.checkpoint` then resumes from the previous checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("mindeye_dist.preemption")


class Preemption:
    """Records SIGTERM; :meth:`agreed` says, identically on every rank, whether to stop now."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: Optional[int] = None
        """The signal number, once one came (this rank)."""
        self.received_at: Optional[float] = None
        """``time.monotonic()`` when it came (this rank)."""
        self._previous: dict[int, object] = {}
        self._group = None

    def install(self) -> "Preemption":
        """Handle the signals in this process (only the main thread may; elsewhere, e.g. a Ray
        Tune trial thread, the run keeps the default behaviour and says so)."""
        if threading.current_thread() is not threading.main_thread():
            log.info("not the main thread: SIGTERM keeps its default action (no checkpoint on preemption)")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
            # Restart interrupted system calls (a collective's socket reads) instead of failing them.
            signal.siginterrupt(sig, False)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()

    def restore(self) -> None:
        """Give the signals their previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self) -> bool:
        """True on every rank when any rank received the signal (collective: every rank calls it
        at the same point of every step)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self._group is None:
                # A gloo group beside NCCL keeps the flag on the host (no device sync per step).
                self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def seconds_since(self) -> Optional[float]:
        """Seconds since this rank received the signal (None: it did not; a peer did)."""
        return None if self.received_at is None else time.monotonic() - self.received_at
