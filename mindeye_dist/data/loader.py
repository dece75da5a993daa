"""Train and eval loaders: exact, resumable epochs over webdataset shards, local or on S3.

Design
------
meta.json records every shard's sample count, so an epoch is planned at the sample level rather
than the shard level (plain webdataset splits by shard, which leaves ranks unequal or empty when
shards are few; webdataset #75, #225):

1. **Epoch sequence.** The split's shards are put in a seeded per-epoch order (``seed, epoch``,
   identical on every rank); their samples, concatenated, form the epoch's global sequence.
2. **Split by rank.** Rank r owns the contiguous range ``[r N / W, (r+1) N / W)``: sizes differ by
   at most 1 and a range may begin or end inside a shard (skip/take within it), so one shard and
   many ranks x workers is fine. In training every rank yields exactly
   ``batches_per_epoch = (N // W) // B`` batches, so no rank waits at an epoch's end; the
   remainder (fewer than ``W * (B + 1)`` samples, the tail of each rank's range, which moves
   with the shard order) is dropped that epoch. ``drop_last=False`` keeps every sample instead
   (each sample exactly once per epoch; ranks may then differ by one batch).
3. **Split by worker.** A rank's batches are divided into contiguous runs, one per DataLoader
   worker (the first ``n % K`` workers get one more). torch's DataLoader takes batches from
   workers round-robin, so output batch ``i`` is batch ``i // K`` of worker ``i % K``: the
   stream is a fixed function of (seed, epoch, rank, world, K, B). (With K = 0 the rank reads
   in-process as one worker.)
4. **Per worker:** read its segments (ours: checksums verified while streaming, arrays checked
   for shape and NaN/inf, bad shards/samples failed or skipped and replaced) -> webdataset's
   shuffle buffer seeded by (seed, epoch, rank, worker) -> drop the samples of already-consumed
   batches (resume; before the image decode, so it is cheap) -> webdataset's decode and batching
   -> z-score + repetition handling seeded by (seed, epoch, rank, output batch).
5. **Resume.** ``start_epoch, start_batch`` re-plans that epoch and has each worker skip its
   share of the first ``start_batch`` outputs, so the resumed stream equals the uninterrupted one
   from that point (tested); DataLoader workers are rotated so the round-robin resumes at
   worker ``start_batch % K``. The loader's ``position`` after each batch is what to checkpoint.
6. **Resampled mode** (``data.resampled``): each worker draws whole shards with replacement
   from its own seeded stream until it has its quota; epochs are virtual but have the same
   batch count and are just as resumable.

A fresh DataLoader is made per epoch, so the epoch number reaches the workers with the dataset
object (the role open_clip's SharedEpoch plays for persistent workers).

Under ``data.on_corrupt=skip`` what was skipped is counted in shared memory across the workers:
``loader.skipped.counts()`` (see integrity.SkipCounter).
"""

from __future__ import annotations

import os
import random
from typing import Collection, Iterator, Optional

import numpy as np
import torch
import webdataset as wds

from mindeye_dist.data import pipeline as P
from mindeye_dist.data.batch import Batch
from mindeye_dist.data.errors import DataError
from mindeye_dist.data.integrity import SkipCounter
from mindeye_dist.data.meta import DatasetMeta, read_meta
from mindeye_dist.data.storage import set_process_s3_endpoint


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """Explicit values, else torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


class _EpochStream(torch.utils.data.IterableDataset):
    """One epoch of one rank; each DataLoader worker yields its planned share of batches."""

    def __init__(self, loader: "TrainLoader", epoch: int, start_batch: int) -> None:
        super().__init__()
        self.loader, self.epoch, self.start_batch = loader, epoch, start_batch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # The DataLoader always starts its round-robin at worker 0, but after resuming at batch s
        # the next output belongs to logical worker s % K: rotate roles so the order is unchanged.
        logical = (worker + self.start_batch) % n_workers
        return self.loader._worker_batches(self.epoch, self.start_batch, logical, n_workers)


class TrainLoader:
    """Endless, resumable training stream of :class:`Batch` for one rank.

    ``iter(loader)`` runs from ``(start_epoch, start_batch)`` forever, epoch after epoch;
    ``epoch_batches(e)`` is a single epoch. After each yielded batch, ``position`` is the
    ``(epoch, batch)`` to resume from. ``skipped.counts()`` says how many distinct shards and
    samples were skipped under ``data.on_corrupt=skip`` (all workers; ``skip_shards``, from
    :func:`~mindeye_dist.data.check_shards`, are never opened and count as skipped).
    """

    def __init__(self, meta: DatasetMeta, data_cfg, micro_batch_size: int, seed: int, rank: int, world_size: int,
                 start_epoch: int = 0, start_batch: int = 0, split: Optional[str] = None, drop_last: bool = True,
                 skip_shards: Collection[str] = ()) -> None:
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size={micro_batch_size} must be >= 1")
        self.meta, self.cfg = meta, data_cfg
        self.batch_size, self.seed = micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.split = meta.split(split or data_cfg.train_split)
        self.drop_last = drop_last or data_cfg.resampled
        self.num_workers = data_cfg.num_workers
        n, w, b = self.split.count, world_size, micro_batch_size
        if self.drop_last:
            self.batches_per_epoch = (n // w) // b
            if self.batches_per_epoch == 0:
                raise DataError(
                    f"split {self.split.name!r} has {n} samples: too few for {w} rank(s) x micro_batch_size {b} "
                    "(no full batch per rank); lower train.micro_batch_size or add data"
                )
        else:
            lo, hi = rank * n // w, (rank + 1) * n // w
            self.batches_per_epoch = -(-(hi - lo) // b)
        if not 0 <= start_batch < max(self.batches_per_epoch, 1):
            raise DataError(f"start_batch={start_batch} is outside the epoch (0..{self.batches_per_epoch - 1})")
        self.position = (start_epoch, start_batch)
        self.mean, self.std = meta.voxel_stats()
        self.skip_shards = frozenset(skip_shards)
        self.skipped = SkipCounter(self.split, self.skip_shards)
        """Shards and samples skipped under data.on_corrupt=skip: ``loader.skipped.counts()``."""
        self._shapes = P.expected_shapes(meta, self.split)

    @property
    def corrupt_shards(self) -> int:
        """Distinct shards this rank skipped so far (``skipped.counts()`` adds samples, names and ranks)."""
        return self.skipped.counts().shards

    # ------------------------------------------------------------------ planning
    def _rank_range(self, epoch: int) -> tuple[list, int, int]:
        """(shards in the epoch order, first and end sample of this rank in that sequence)."""
        shards = self.split.shards
        order = P.shard_order(len(shards), self.seed, epoch, shuffle=True)
        ordered = [shards[i] for i in order]
        n, w = self.split.count, self.world_size
        lo, hi = self.rank * n // w, (self.rank + 1) * n // w
        if self.drop_last:
            hi = lo + self.batches_per_epoch * self.batch_size
        return ordered, lo, hi

    def plan(self, epoch: int, start_batch: int, worker: int, n_workers: int) -> P.WorkerPlan:
        """The samples and batch count of one worker of this rank in ``epoch``."""
        first, count = P.split_batches(self.batches_per_epoch, n_workers, worker)
        skip = min(count, P.skipped_local_batches(start_batch, n_workers, worker))
        if self.cfg.resampled:
            rng = np.random.default_rng(P.seed_for(self.seed, epoch, self.rank, worker, P.RESAMPLE))
            segs, need = [], count * self.batch_size
            while need > 0:
                shard = self.split.shards[int(rng.integers(len(self.split.shards)))]
                take = min(shard.count, need)
                segs.append(P.Segment(self.meta.shard_url(shard), shard.name, 0, take, shard.count, self.meta.s3_endpoint,
                                      shard.sha256))
                need -= take
            return P.WorkerPlan(tuple(segs), count, skip)
        ordered, lo, hi = self._rank_range(epoch)
        start = lo + first * self.batch_size
        end = min(hi, start + count * self.batch_size)
        urls = [self.meta.shard_url(s) for s in ordered]
        return P.WorkerPlan(tuple(P.range_segments(ordered, urls, start, end, self.meta.s3_endpoint)), count, skip)

    # ------------------------------------------------------------------ the pipeline
    def _worker_batches(self, epoch: int, start_batch: int, worker: int, n_workers: int) -> Iterator[Batch]:
        set_process_s3_endpoint(self.meta.s3_endpoint)  # the s3 gopen handler of this (worker) process
        plan = self.plan(epoch, start_batch, worker, n_workers)
        if plan.n_batches - plan.skip_batches <= 0:
            return iter(())
        b, cfg = self.batch_size, self.cfg
        quota = sum(s.take for s in plan.segments)
        shuffle_rng = random.Random(P.seed_for(self.seed, epoch, self.rank, worker, P.SHUFFLE))
        stages = [
            # 1. this worker's exact share of the epoch: (shard, skip, take) segments
            lambda: list(plan.segments),
            # 2. raw samples, checksums verified, arrays checked; a bad shard/sample fails naming it,
            #    or is skipped, counted and replaced from this worker's share (on_corrupt=skip)
            lambda segs: P.read_segments(list(segs), self.split.fields, quota, cfg.on_corrupt, self.skipped, refill=True,
                                         shapes=self._shapes, preskipped=self.skip_shards),
        ]
        if cfg.shuffle_buffer > 1:
            # 3. sample shuffle buffer seeded by (seed, epoch, rank, worker); filled before the first output
            stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=shuffle_rng))
        stages += [
            # 4. resume: drop samples of batches consumed before the interruption, before the image decode
            wds.slice(plan.skip_batches * b, None),
            # 5. decode png / json (arrays were decoded and checked in 2)
            P.decode(),
            # 6. group into micro-batches (lists; the last one of a drop_last=False epoch may be short)
            wds.batched(b, collation_fn=None, partial=True),
            # 7. z-score with train stats, reduce repetitions (data.train_reps), to a torch Batch
            lambda src: self._collate_all(src, epoch, worker, n_workers, plan.skip_batches),
        ]
        return iter(wds.DataPipeline(*stages))

    def _collate_all(self, batches, epoch: int, worker: int, n_workers: int, first_local: int) -> Iterator[Batch]:
        for local, samples in enumerate(batches, start=first_local):
            out_index = local * n_workers + worker  # position of this batch in the rank's epoch stream
            rng = np.random.default_rng(P.seed_for(self.seed, epoch, self.rank, out_index, P.REPS))
            step = epoch * self.batches_per_epoch + out_index
            yield P.collate(samples, self.mean, self.std, self.cfg.train_reps, rng, step)

    # ------------------------------------------------------------------ iteration
    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch from ``start_batch`` on (a fresh DataLoader each call)."""
        k = self.num_workers
        # A private generator: creating a DataLoader iterator draws a base seed, and drawing it
        # from the global torch RNG would make the trainer's dropout/noise depend on when epochs
        # start (a resumed run starts its epoch at a different step, breaking bit-exact resume).
        dl = torch.utils.data.DataLoader(
            _EpochStream(self, epoch, start_batch), batch_size=None, num_workers=k,
            prefetch_factor=self.cfg.prefetch_factor if k > 0 else None, persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        yield from dl

    def __iter__(self) -> Iterator[Batch]:
        epoch, batch = self.position
        while True:
            for b in self.epoch_batches(epoch, batch):
                batch += 1
                self.position = (epoch + 1, 0) if batch >= self.batches_per_epoch else (epoch, batch)
                yield b
            epoch, batch = epoch + 1, 0
            self.position = (epoch, 0)


class EvalLoader:
    """A whole split in row order (shards in index order), repetitions averaged, z-scored.

    With ``world_size > 1`` rank r reads the contiguous rows ``[r N / W, (r+1) N / W)``. Runs in the
    calling process (evaluation splits are small; row order is exact).
    """

    def __init__(self, meta: DatasetMeta, data_cfg, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 skip_shards: Collection[str] = ()) -> None:
        if batch_size < 1:
            raise DataError(f"eval batch_size={batch_size} must be >= 1")
        self.meta, self.cfg, self.batch_size = meta, data_cfg, batch_size
        self.split = meta.split(split)
        n = self.split.count
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size
        self.mean, self.std = meta.voxel_stats()
        self.skip_shards = frozenset(skip_shards)
        self.skipped = SkipCounter(self.split, self.skip_shards)
        """Shards and samples skipped under data.on_corrupt=skip: ``loader.skipped.counts()``."""
        self._shapes = P.expected_shapes(meta, self.split)

    @property
    def corrupt_shards(self) -> int:
        """Distinct shards this rank skipped so far (``skipped.counts()`` adds samples, names and ranks)."""
        return self.skipped.counts().shards

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        set_process_s3_endpoint(self.meta.s3_endpoint)
        shards = list(self.split.shards)
        segs = P.range_segments(shards, [self.meta.shard_url(s) for s in shards], self.lo, self.hi, self.meta.s3_endpoint)
        rng = np.random.default_rng(0)  # unused by "mean"
        pipeline = wds.DataPipeline(
            # 1. this rank's rows, shards in index order (= row order)
            lambda: segs,
            # 2. raw samples, verified and checked; bad shards/samples fail or are skipped + counted (no refill)
            lambda s: P.read_segments(list(s), self.split.fields, None, self.cfg.on_corrupt, self.skipped, refill=False,
                                      shapes=self._shapes, preskipped=self.skip_shards),
            # 3. decode png / json
            P.decode(),
            # 4. batch (the last one may be short)
            wds.batched(self.batch_size, collation_fn=None, partial=True),
            # 5. z-score, mean of repetitions, to a torch Batch
            lambda src: (P.collate(x, self.mean, self.std, "mean", rng, 0) for x in src),
        )
        return iter(pipeline)


def build_train_loader(data_cfg, micro_batch_size: int, seed: int, rank: Optional[int] = None, world_size: Optional[int] = None,
                       start_epoch: int = 0, start_batch: int = 0, *, split: Optional[str] = None, drop_last: bool = True,
                       meta: Optional[DatasetMeta] = None, skip_shards: Collection[str] = ()) -> TrainLoader:
    """Training stream for this rank (rank/world from torch.distributed or RANK/WORLD_SIZE when None).
    ``skip_shards``: shard names never to open (``check_shards(...).skip_shards`` under on_corrupt=skip)."""
    rank, world_size = _rank_world(rank, world_size)
    meta = meta or read_meta(data_cfg.url, data_cfg.s3_endpoint or None)
    meta.check_config(data_cfg)
    return TrainLoader(meta, data_cfg, micro_batch_size, seed, rank, world_size, start_epoch, start_batch, split, drop_last,
                       skip_shards)


def build_eval_loader(data_cfg, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                      meta: Optional[DatasetMeta] = None, skip_shards: Collection[str] = ()) -> EvalLoader:
    """A split in row order with repetitions averaged (for retrieval evaluation)."""
    meta = meta or read_meta(data_cfg.url, data_cfg.s3_endpoint or None)
    meta.check_config(data_cfg)
    return EvalLoader(meta, data_cfg, split, batch_size, rank, world_size, skip_shards)
