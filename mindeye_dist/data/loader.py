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
7. **Another layout** (a resume on another number of ranks, workers or micro-batch;
   :mod:`mindeye_dist.data.reshard`): the samples the old ranks consumed in the interrupted
   epoch are replayed from the plan above without reading anything, and the rest of that epoch
   is split evenly over the new ranks (``legs``); the next epoch is planned as in 1-4. The
   loader's ``position_record`` (epoch, batch, layout, closed legs) is what to checkpoint.

A fresh DataLoader is made per epoch, so the epoch number reaches the workers with the dataset
object (the role open_clip's SharedEpoch plays for persistent workers).

Under ``data.on_corrupt=skip`` what was skipped is counted in shared memory across the workers:
``loader.skipped.counts()`` (see integrity.SkipCounter).
"""

from __future__ import annotations

import atexit
import os
import random
import weakref
import signal
from typing import Collection, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from mindeye_dist.data import pipeline as P
from mindeye_dist.data.batch import Batch
from mindeye_dist.data.errors import DataError
from mindeye_dist.data.integrity import SkipCounter
from mindeye_dist.data.meta import DatasetMeta, read_meta
from mindeye_dist.data.reshard import DataPosition, EpochPlan, Layout, Leg, plan_epoch, segments_for, shuffle_seed, worker_share
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
                 skip_shards: Collection[str] = (), legs: Sequence[Leg] = ()) -> None:
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
        self.layout = Layout(world_size, self.num_workers, micro_batch_size, data_cfg.shuffle_buffer)
        """How this loader reads an epoch (what a resharded resume compares against)."""
        if legs and not self.drop_last:
            raise DataError("resharding the rest of an epoch needs drop_last=True (every rank in lock-step)")
        self._legs = (start_epoch, tuple(legs))
        self._plans: dict[int, EpochPlan] = {}
        self.position = (start_epoch, start_batch)
        in_epoch = self.batches_in(start_epoch)
        if not 0 <= start_batch < max(in_epoch, 1):
            raise DataError(f"start_batch={start_batch} is outside the epoch (0..{in_epoch - 1})")
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
    def legs_of(self, epoch: int) -> tuple[Leg, ...]:
        """The closed legs of ``epoch`` read under other layouts (only the epoch resumed into)."""
        first, legs = self._legs
        return legs if epoch == first else ()

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """This rank's plan of a resharded ``epoch`` (data/reshard.py); cached, it replays the legs."""
        if epoch not in self._plans:
            self._plans[epoch] = plan_epoch(self.split.count, self.legs_of(epoch), self.layout, self.rank, self.seed, epoch)
        return self._plans[epoch]

    @property
    def position_records(self) -> list[DataPosition]:
        """``[position_record]`` (the same surface as a multi-subject loader's)."""
        return [self.position_record]

    def batches_in(self, epoch: int) -> int:
        """Batches every rank yields in ``epoch`` (``batches_per_epoch`` except in a resharded one)."""
        return self.epoch_plan(epoch).n_batches if self.legs_of(epoch) else self.batches_per_epoch

    @property
    def position_record(self) -> DataPosition:
        """The position as a checkpoint keeps it: epoch, batch, this layout and the closed legs."""
        epoch, batch = self.position
        return DataPosition(epoch, batch, self.layout, self.legs_of(epoch), self.seed)

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

    def _ordered_shards(self, epoch: int) -> tuple[list, list[str]]:
        shards = self.split.shards
        ordered = [shards[i] for i in P.shard_order(len(shards), self.seed, epoch, shuffle=True)]
        return ordered, [self.meta.shard_url(s) for s in ordered]

    def _resampled_segments(self, epoch: int, worker: int, need: int, leg: int) -> tuple:
        """Whole shards drawn with replacement from this worker's seeded stream until ``need`` samples."""
        parts = (self.seed, epoch, self.rank, worker, P.RESAMPLE) + ((leg,) if leg else ())
        rng = np.random.default_rng(P.seed_for(*parts))
        segs = []
        while need > 0:
            shard = self.split.shards[int(rng.integers(len(self.split.shards)))]
            take = min(shard.count, need)
            segs.append(P.Segment(self.meta.shard_url(shard), shard.name, 0, take, shard.count, self.meta.s3_endpoint,
                                  shard.sha256))
            need -= take
        return tuple(segs)

    def _resharded_plan(self, epoch: int, start_batch: int, worker: int, n_workers: int) -> P.WorkerPlan:
        """One worker's share of the rest of an epoch resharded over this layout (data/reshard.py)."""
        plan = self.epoch_plan(epoch)
        if plan.rank is None:
            return P.WorkerPlan((), 0, 0)
        share = worker_share(plan.rank, n_workers, worker)
        skip = min(len(share.sizes), P.skipped_local_batches(start_batch, n_workers, worker))
        if self.cfg.resampled:
            segs = self._resampled_segments(epoch, worker, int(sum(share.sizes)), plan.leg_index)
            return P.WorkerPlan(segs, len(share.sizes), skip, share.sizes, None, plan.leg_index)
        if not len(share.positions):
            return P.WorkerPlan((), 0, 0, (), frozenset(), plan.leg_index)
        ordered, urls = self._ordered_shards(epoch)
        segs, wanted = segments_for(share.positions, ordered, urls, self.meta.s3_endpoint)
        return P.WorkerPlan(tuple(segs), len(share.sizes), skip, share.sizes, wanted, plan.leg_index)

    def plan(self, epoch: int, start_batch: int, worker: int, n_workers: int) -> P.WorkerPlan:
        """The samples and batch count of one worker of this rank in ``epoch``."""
        if self.legs_of(epoch):
            return self._resharded_plan(epoch, start_batch, worker, n_workers)
        first, count = P.split_batches(self.batches_per_epoch, n_workers, worker)
        skip = min(count, P.skipped_local_batches(start_batch, n_workers, worker))
        if self.cfg.resampled:
            return P.WorkerPlan(self._resampled_segments(epoch, worker, count * self.batch_size, 0), count, skip)
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
        shuffle_rng = random.Random(shuffle_seed(self.seed, epoch, self.rank, worker, plan.leg))
        sizes = plan.sizes or (b,) * plan.n_batches
        stages = [
            # 1. this worker's exact share of the epoch: (shard, skip, take) segments
            lambda: list(plan.segments),
            # 2. raw samples, checksums verified, arrays checked; a bad shard/sample fails naming it,
            #    or is skipped, counted and replaced from this worker's share (on_corrupt=skip)
            lambda segs: P.read_segments(list(segs), self.split.fields, quota, cfg.on_corrupt, self.skipped, refill=True,
                                         shapes=self._shapes, preskipped=self.skip_shards),
        ]
        if plan.wanted is not None:
            # 2b. resharded epoch: keep only the samples of the rest of the epoch this worker owns
            names = {seg.url: seg.name for seg in plan.segments}
            stages.append(lambda src: (x for x in src if (names.get(x["__url__"]), x["__pos__"]) in plan.wanted))
        if cfg.shuffle_buffer > 1:
            # 3. sample shuffle buffer seeded by (seed, epoch, rank, worker[, leg]); filled before the first output
            stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=shuffle_rng))
        stages += [
            # 4. resume: drop samples of batches consumed before the interruption, before the image decode
            wds.slice(int(sum(sizes[:plan.skip_batches])), None),
            # 5. decode png / json (arrays were decoded and checked in 2)
            P.decode(),
            # 6. group into micro-batches (lists; the last one of a drop_last=False epoch may be short,
            #    the last few of a resharded epoch may be smaller)
            wds.batched(b, collation_fn=None, partial=True) if plan.sizes is None
            else (lambda src: _batched_by(src, sizes[plan.skip_batches:])),
            # 7. z-score with train stats, reduce repetitions (data.train_reps), to a torch Batch
            lambda src: self._collate_all(src, epoch, worker, n_workers, plan.skip_batches, plan.leg),
        ]
        return iter(wds.DataPipeline(*stages))

    def _collate_all(self, batches, epoch: int, worker: int, n_workers: int, first_local: int,
                     leg: int = 0) -> Iterator[Batch]:
        for local, samples in enumerate(batches, start=first_local):
            out_index = local * n_workers + worker  # position of this batch in the rank's epoch stream
            parts = (self.seed, epoch, self.rank, out_index, P.REPS) + ((leg,) if leg else ())
            rng = np.random.default_rng(P.seed_for(*parts))
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
            worker_init_fn=_ignore_sigterm if k > 0 else None,
        )
        it = iter(dl)
        if k > 0:
            _LIVE_ITERATORS.add(it)
        try:
            yield from it
        finally:  # an epoch left early (islice, an exception, a closed generator): end its workers now
            if k > 0:
                it._shutdown_workers()

    def __iter__(self) -> Iterator[Batch]:
        epoch, batch = self.position
        while True:
            n = self.batches_in(epoch)
            for b in self.epoch_batches(epoch, batch):
                batch += 1
                self.position = (epoch + 1, 0) if batch >= n else (epoch, batch)
                yield b
            epoch, batch = epoch + 1, 0
            self.position = (epoch, 0)


def _batched_by(samples: Iterator[dict], sizes: Sequence[int]) -> Iterator[list]:
    """Group ``samples`` into lists of the given sizes (a resharded epoch's tail batches are smaller)."""
    it = iter(samples)
    for size in sizes:
        group = [x for _, x in zip(range(size), it)]
        if group:
            yield group


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()
"""DataLoader iterators whose workers may still run (epoch generators not finished or closed)."""


def _shutdown_live_workers() -> None:
    """At interpreter exit, end the workers of epochs still open, gracefully. multiprocessing's own
    exit handler would SIGTERM them, which they ignore (below), and then wait for them forever; this
    handler is registered after it and so runs first."""
    for it in list(_LIVE_ITERATORS):
        try:
            it._shutdown_workers()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_shutdown_live_workers)


def _ignore_sigterm(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: a launcher that signals the whole process tree
    (deepspeed's launch.py, SLURM) would otherwise kill them under the rank, which then fails its
    step instead of finishing it and checkpointing (train.py's preemption). They still exit with
    the rank: torch ends them when the rank's loader is closed or the rank dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
                       meta: Optional[DatasetMeta] = None, skip_shards: Collection[str] = (),
                       legs: Sequence[Leg] = ()) -> TrainLoader:
    """Training stream for this rank (rank/world from torch.distributed or RANK/WORLD_SIZE when None).
    ``skip_shards``: shard names never to open (``check_shards(...).skip_shards`` under on_corrupt=skip).
    ``legs``: the closed legs of ``start_epoch`` read under other layouts (a resume on another
    number of ranks; see :meth:`DataPosition.resumed_under`): the rest of that epoch is resharded."""
    rank, world_size = _rank_world(rank, world_size)
    meta = meta or read_meta(data_cfg.url, data_cfg.s3_endpoint or None)
    meta.check_config(data_cfg)
    return TrainLoader(meta, data_cfg, micro_batch_size, seed, rank, world_size, start_epoch, start_batch, split, drop_last,
                       skip_shards, legs)


def build_eval_loader(data_cfg, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                      meta: Optional[DatasetMeta] = None, skip_shards: Collection[str] = ()) -> EvalLoader:
    """A split in row order with repetitions averaged (for retrieval evaluation)."""
    meta = meta or read_meta(data_cfg.url, data_cfg.s3_endpoint or None)
    meta.check_config(data_cfg)
    return EvalLoader(meta, data_cfg, split, batch_size, rank, world_size, skip_shards)
