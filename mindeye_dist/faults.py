"""Fault injection for the tests of skipping, aborting and resuming: a component, no-op by default.

The trainer calls the hooks of whatever :class:`Faults` it was given at fixed points of a step
and a save; the default (:data:`NO_FAULTS`) does nothing, so the loop never branches on "are
faults on". ``train.run`` reads ``MINDEYE_FAULTS`` from the environment (unset in normal runs),
which is how the tests reach ranks started by the real launchers::

    MINDEYE_FAULTS="nan_loss@3@1,kill@7,kill_in_save@8,raise@5@1"

- ``nan_loss@N[@R]``: step N's loss becomes NaN on rank R (every rank without ``@R``);
- ``kill@N``: every rank SIGKILLs itself at the start of step N;
- ``kill_in_save@N``: SIGKILL after the step-N checkpoint's shards are written, before it is
  committed;
- ``raise@N[@R]``: rank R raises an error at the start of step N (one rank failing alone, the case
  where its peers must not hang);
- ``stall@N[@R]``: rank R stops itself (SIGSTOP) at the start of step N (a stalled peer).

Steps are numbered from 1, as in metrics.jsonl.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

ENV = "MINDEYE_FAULTS"
_KINDS = ("nan_loss", "kill", "kill_in_save", "raise", "stall")


class InjectedFault(RuntimeError):
    """The error ``raise@N`` throws (a stand-in for a rank-local I/O, decode or disk failure)."""


class Faults:
    """No faults: every hook is a no-op."""

    def at_step_start(self, step: int, rank: int) -> None:
        """Called before step ``step`` (1-based) draws its first batch."""

    def poison(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """The loss of step ``step`` as the backward pass sees it."""
        return loss

    def in_save(self, step: int) -> None:
        """Called after every rank wrote its shards of checkpoint ``step``, before the commit."""


NO_FAULTS = Faults()


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class InjectedFaults(Faults):
    """Faults parsed from a ``MINDEYE_FAULTS`` string (see the module docstring)."""

    by_kind: dict[str, dict[int, Optional[int]]] = field(default_factory=lambda: {k: {} for k in _KINDS})

    @classmethod
    def parse(cls, text: str) -> "InjectedFaults":
        faults = cls()
        for item in filter(None, (s.strip() for s in text.split(","))):
            kind, *rest = item.split("@")
            if kind not in _KINDS or not 1 <= len(rest) <= 2:
                raise ValueError(f"{ENV}: cannot read {item!r}; expected KIND@STEP[@RANK] with KIND one of "
                                 f"{', '.join(_KINDS)}")
            faults.by_kind[kind][int(rest[0])] = int(rest[1]) if len(rest) > 1 else None
        return faults

    def _hits(self, kind: str, step: int, rank: Optional[int]) -> bool:
        table = self.by_kind[kind]
        return step in table and (rank is None or table[step] in (None, rank))

    def at_step_start(self, step: int, rank: int) -> None:
        if self._hits("kill", step, None):
            _kill_self()
        if self._hits("raise", step, rank):
            raise InjectedFault(f"injected failure on rank {rank} at step {step} ({ENV})")
        if self._hits("stall", step, rank):
            os.kill(os.getpid(), signal.SIGSTOP)

    def poison(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        return loss * float("nan") if self._hits("nan_loss", step, rank) else loss

    def in_save(self, step: int) -> None:
        if self._hits("kill_in_save", step, None):
            _kill_self()


def faults_from_env() -> Faults:
    """:class:`InjectedFaults` from ``MINDEYE_FAULTS``, or :data:`NO_FAULTS` when it is unset or empty."""
    text = os.environ.get(ENV, "").strip()
    return InjectedFaults.parse(text) if text else NO_FAULTS
