"""Per-subject input adapters: one Linear per subject into a shared hidden space.

The subject table ``{name: n_voxels}`` is data (config or meta.json), not code. A batch may mix
subjects: voxels arrive zero-padded to the widest subject, ``(B, max_voxels)``, with a subject
index per sample; samples are grouped by subject, each group goes through its own Linear on its
first ``n_voxels`` columns, and the results are put back in batch order.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

SubjectIds = Union[None, int, torch.Tensor]
"""None, an int (the whole batch is that subject) or (B,) long ids indexing the subject table.
A single-subject model ignores them (datasets tag samples with their NSD subject number, not a
table index)."""


class SubjectAdapters(nn.Module):
    """MindEye2's "ridge" (one Linear per subject; weight decay makes it ridge regression)."""

    def __init__(self, subjects: dict[str, int], out_dim: int, bias: bool = True):
        super().__init__()
        self.linears = nn.ModuleDict({name: nn.Linear(n, out_dim, bias=bias) for name, n in subjects.items()})

    @property
    def names(self) -> list[str]:
        return list(self.linears.keys())

    def _one(self, index: int, voxels: torch.Tensor) -> torch.Tensor:
        if not 0 <= index < len(self.linears):
            raise IndexError(f"subject id {index} is out of range: the model has subjects {self.names}")
        linear = self.linears[self.names[index]]
        if voxels.shape[0] == 0:  # an absent subject in a mixed batch (see forward)
            voxels = voxels.new_zeros(0, linear.in_features)
        if voxels.shape[-1] < linear.in_features:
            raise ValueError(f"subject {self.names[index]!r} needs {linear.in_features} voxels, "
                             f"got a batch of width {voxels.shape[-1]}")
        return linear(voxels[:, : linear.in_features])  # (B, V_s) -> (B, H)

    def forward(self, voxels: torch.Tensor, subject: SubjectIds = None) -> torch.Tensor:
        """(B, max_voxels) -> (B, out_dim)."""
        if len(self.linears) == 1:
            subject = 0
        if subject is None:
            raise ValueError(f"a multi-subject model {self.names} needs per-sample subject ids")
        if isinstance(subject, torch.Tensor) and subject.ndim == 0:
            subject = int(subject)
        if isinstance(subject, int):
            return self._one(subject, voxels)
        if subject.numel() and (int(subject.min()) < 0 or int(subject.max()) >= len(self.linears)):
            raise IndexError(f"subject ids {subject.unique().tolist()} are out of range: the model has subjects "
                             f"{self.names}")
        # Every adapter runs, on an empty slice if its subject is absent, so all ranks call the
        # same modules in the same order (ZeRO-3 gathers per call) and every parameter gets a
        # gradient (DDP needs no find_unused_parameters).
        parts, order = [], []
        for index in range(len(self.linears)):
            rows = (subject == index).nonzero(as_tuple=True)[0].to(voxels.device)
            parts.append(self._one(index, voxels.index_select(0, rows)))
            order.append(rows)
        inverse = torch.argsort(torch.cat(order))  # back to batch order
        return torch.cat(parts)[inverse]


def adapter_key_subject(key: str, prefixes: list[str]) -> Optional[str]:
    """The subject name in a state-dict key under one of the adapters' ``prefixes``, else None."""
    for prefix in prefixes:
        head = f"{prefix}.linears." if prefix else "linears."
        if key.startswith(head):
            return key[len(head):].split(".", 1)[0]
    return None
