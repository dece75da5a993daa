"""Many subjects in one run: one dataset per subject, an equal share of each in every micro-batch.

MindEye2 pretrains on seven subjects with batches that hold the same number of samples from each
(its per-subject webdatasets are zipped), and mixes voxels only within a subject (BiMixCo; the
loss's ``draw_mixup(subject_ids=...)`` keeps a permutation inside each subject's rows).
:class:`MultiSubjectLoader` zips one :class:`~mindeye_dist.data.loader.TrainLoader` per dataset,
each drawing ``micro_batch_size / n_subjects`` samples per micro-batch with its own exact,
resumable epochs (a subject with fewer stimuli starts its next epoch sooner, as MindEye2's
resampled streams do), and concatenates their batches: voxels are zero-padded to the widest
subject, the subject adapters read each sample's first ``n_voxels_s`` columns.

Subjects are named by :func:`subject_name` from the dataset's ``meta.json`` ``subject``: NSD's
1-8 become ``subj01``..``subj08`` (the names the presets and the released checkpoints use); a
string label is used as it is. ``Batch.subject`` carries the dataset's subject number; the
trainer maps it to the model's adapter through the model's subject table, so a dataset can
never reach another subject's adapter.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from mindeye_dist.data.batch import Batch
from mindeye_dist.data.errors import DataError


def subject_name(meta) -> str:
    """The adapter name of a dataset's subject: ``subjNN`` for a number, else the label itself."""
    subject = meta.raw.get("subject", meta.subject)
    if isinstance(subject, int) or (isinstance(subject, str) and subject.isdigit()):
        return f"subj{int(subject):02d}"
    return str(subject)


def subject_table(metas: Sequence) -> dict[str, int]:
    """``{subject name: n_voxels}`` of the datasets, in the order given; a subject twice is an error."""
    table: dict[str, int] = {}
    for meta in metas:
        name = subject_name(meta)
        if name in table:
            raise DataError(f"subject {name} appears in two datasets ({meta.url} and an earlier one): one dataset per "
                            "subject (list it once in data.url / data.datasets)")
        table[name] = meta.n_voxels
    return table


def pad_voxels(voxels: torch.Tensor, width: int) -> torch.Tensor:
    """(B, V) -> (B, width), zeros on the right (each subject's adapter reads its own first V columns)."""
    return voxels if voxels.shape[1] == width else F.pad(voxels, (0, width - voxels.shape[1]))


def concat_batches(batches: Sequence[Batch], width: int) -> Batch:
    """One batch of every subject's samples (voxels padded to ``width``)."""
    def cat(name: str) -> Optional[torch.Tensor]:
        parts = [getattr(b, name) for b in batches]
        if any(p is None for p in parts):
            return None
        return torch.cat(parts)

    return Batch(voxels=torch.cat([pad_voxels(b.voxels, width) for b in batches]), targets=cat("targets"),
                 vae=cat("vae"), images=cat("images"), subject=cat("subject"), index=cat("index"),
                 teacher=cat("teacher"))


class MultiSubjectLoader:
    """Zips one train loader per subject; every micro-batch holds each subject's equal share.

    ``position`` is the list of the loaders' ``(epoch, batch)``, ``position_records`` their full
    positions (what to checkpoint: each dataset's epochs are resharded on their own when the
    number of ranks changes);
    ``batches_per_epoch`` and ``skipped`` are the first loader's and the sum of all, for logging.
    """

    def __init__(self, loaders: Sequence, width: int):
        if not loaders:
            raise DataError("MultiSubjectLoader needs at least one loader")
        self.loaders = list(loaders)
        self.width = width
        self.batches_per_epoch = self.loaders[0].batches_per_epoch
        self.skipped = _SummedSkips([loader.skipped for loader in self.loaders])

    @property
    def position(self) -> list[tuple[int, int]]:
        return [loader.position for loader in self.loaders]

    @property
    def position_records(self) -> list:
        """Each dataset's :class:`~mindeye_dist.data.reshard.DataPosition` (what a checkpoint keeps)."""
        return [loader.position_record for loader in self.loaders]

    def __iter__(self) -> Iterator[Batch]:
        iterators = [iter(loader) for loader in self.loaders]
        while True:
            yield concat_batches([next(it) for it in iterators], self.width)


class _SummedSkips:
    """``skipped.counts()`` over several loaders (shards and samples add up)."""

    def __init__(self, counters):
        self.counters = counters

    def counts(self, across_ranks: bool = False, device=None):
        import dataclasses

        parts = [c.counts(across_ranks=across_ranks, device=device) for c in self.counters]
        first = parts[0]
        return dataclasses.replace(first, shards=sum(p.shards for p in parts), samples=sum(p.samples for p in parts),
                                   shard_names=tuple(n for p in parts for n in p.shard_names))


def per_subject_batch(micro_batch_size: int, n_subjects: int) -> int:
    """Samples per subject per micro-batch; the micro-batch must split evenly (as MindEye2's does)."""
    if micro_batch_size % n_subjects:
        raise DataError(f"train.micro_batch_size={micro_batch_size} does not split evenly over {n_subjects} subjects: "
                        f"use a multiple of {n_subjects} (MindEye2: 42 = 7 x 6)")
    return micro_batch_size // n_subjects
