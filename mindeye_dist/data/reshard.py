"""Data positions that survive a change of world size: the rest of an interrupted epoch, resharded.

An epoch is read under a *layout*: ranks, DataLoader workers per rank, micro-batch and shuffle
buffer (see loader.py for how that layout splits the epoch). Every rank consumes the same
number of batches per step, so "rank r is at batch c of epoch e" is one number for the whole
run, and the samples consumed so far are a deterministic function of
(seed, epoch, layout, c): the epoch's shard order, each rank's range, each worker's run of
batches and each worker's seeded shuffle buffer. :func:`consumed_positions` replays that plan on
sample *positions* (indices into the epoch's concatenated shards): webdataset's own ``shuffle``
runs over integers (it draws from its RNG by buffer length and never looks at a sample), so
nothing is read or decoded.

When a run resumes under another layout in the middle of an epoch, the stretch read under the
old layout becomes a closed :class:`Leg` and the rest of the epoch is resharded
(:func:`resharded_rank_plan`): the remaining positions, in epoch order, are split into
contiguous ranges over the new ranks (sizes differ by at most one); every rank gets the same
number of batches of the same sizes, full ones first and one smaller at the tail, never an empty
one. Each
rank's batches are split over its workers as in a normal epoch, and each worker shuffles its
share with a buffer seeded by (seed, epoch, rank, worker, leg). After that epoch the normal
plan at the new layout continues. A second change in the middle of a resharded epoch closes
that leg too: the chain of legs is replayed leg by leg, so any sequence of world sizes works.

Limits (documented in the README): the replay assumes every planned sample was read; with
``data.on_corrupt=skip`` a skipped shard or sample is replaced from the same worker's share on
the fly, which the replay cannot see, so around those samples the rest of that epoch may repeat
or miss a few. ``data.resampled`` epochs are virtual (shards drawn with replacement): there the
rest of the epoch is its remaining sample count, drawn afresh by the new ranks. When the number
of remaining samples is not a multiple of the new world size, the last few (fewer than the number
of ranks) are left out of that epoch and a warning says how many; the remainder is a multiple of
the old world size times the micro-batch, so this happens only when the new world size does not
divide that (e.g. 2 -> 3 ranks).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import webdataset as wds

from mindeye_dist.data import pipeline as P
from mindeye_dist.data.errors import DataError


@dataclass(frozen=True)
class Layout:
    """How a stretch of an epoch is read."""

    world: int
    """Ranks."""
    workers: int
    """DataLoader worker processes per rank (0 reads in-process, like one worker)."""
    micro: int
    """Samples per micro-batch per rank (one dataset's share in a multi-subject batch)."""
    buffer: int
    """Shuffle-buffer size per worker (<= 1: no shuffle)."""

    @property
    def streams(self) -> int:
        """Worker streams per rank (in-process reading is one stream)."""
        return max(1, self.workers)


@dataclass(frozen=True)
class Leg:
    """A closed stretch of an epoch: its layout and the batches every rank consumed under it."""

    layout: Layout
    batches: int


@dataclass(frozen=True)
class DataPosition:
    """What a checkpoint records about one dataset's stream (``TrainState.data``)."""

    epoch: int
    """The epoch the next batch comes from."""
    batch: int
    """Batches every rank consumed in the current leg of ``epoch``."""
    layout: Layout
    """The layout of the current leg."""
    legs: tuple[Leg, ...] = ()
    """Earlier, closed legs of ``epoch`` (non-empty only in a resharded epoch)."""
    seed: int = 0
    """run.seed (the data order depends on it)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataPosition":
        legs = tuple(Leg(Layout(**leg["layout"]), int(leg["batches"])) for leg in d.get("legs", ()))
        return cls(int(d["epoch"]), int(d["batch"]), Layout(**d["layout"]), legs, int(d.get("seed", 0)))

    def resumed_under(self, layout: Layout, seed: int) -> "DataPosition":
        """This position continued under ``layout``: the same leg if nothing changed (bit-exact),
        else the current leg is closed (when it consumed anything) and a new one begins."""
        if seed != self.seed:
            raise DataError(f"run.seed={seed} but the checkpoint's data order was drawn with run.seed={self.seed}: "
                            f"the epoch plan depends on it; resume with run.seed={self.seed}")
        if layout == self.layout:
            return self
        legs = self.legs + ((Leg(self.layout, self.batch),) if self.batch else ())
        return DataPosition(self.epoch, 0, layout, legs, seed)


# --------------------------------------------------------------------------------------------
# Plans: the positions and batch sizes of one rank, and of one worker, in one leg


@dataclass(frozen=True)
class RankPlan:
    """One rank's samples in a leg: epoch positions in read order and its batch sizes."""

    positions: np.ndarray
    """(n,) int64 positions in the epoch sequence, ascending."""
    sizes: tuple[int, ...]
    """Batch sizes in order (sum = n); full micro-batches first."""


@dataclass(frozen=True)
class WorkerShare:
    """One worker's contiguous run of a rank's batches."""

    first: int
    """Index of its first batch among the rank's."""
    positions: np.ndarray
    """(n,) its positions, ascending (the order it reads them)."""
    sizes: tuple[int, ...]
    """Its batch sizes."""


def normal_rank_plan(n: int, layout: Layout, rank: int) -> RankPlan:
    """The first leg of an epoch (loader.py's plan, drop_last): rank r owns ``[r n / W, ...)``,
    ``(n // W) // B`` full batches."""
    n_batches = (n // layout.world) // layout.micro
    lo = rank * n // layout.world
    return RankPlan(np.arange(lo, lo + n_batches * layout.micro, dtype=np.int64), (layout.micro,) * n_batches)


def tail_sizes(n: int, n_batches: int, micro: int) -> tuple[int, ...]:
    """``n`` samples in ``n_batches`` non-empty batches of at most ``micro``: full ones first."""
    sizes, left = [], n
    for i in range(n_batches):
        size = min(micro, left - (n_batches - i - 1))
        sizes.append(size)
        left -= size
    if left or min(sizes, default=1) < 1:
        raise ValueError(f"{n} samples do not fill {n_batches} batches of at most {micro}")
    return tuple(sizes)


def resharded_rank_plan(remaining: np.ndarray, layout: Layout, rank: int) -> Optional[RankPlan]:
    """Rank ``rank``'s share of the ``remaining`` positions of an epoch under ``layout``: the
    rank-th of ``world`` equal contiguous ranges, in full micro-batches and one smaller last
    batch, the same sizes on every rank (so any collective sees equal shapes, gathered negatives
    included, and DeepSpeed's gradient average weighs ranks equally). None when fewer positions
    remain than ranks."""
    share = usable_remaining(len(remaining), layout) // layout.world
    if share == 0:
        return None
    n_batches = -(-share // layout.micro)
    lo = rank * share
    return RankPlan(np.asarray(remaining[lo:lo + share], dtype=np.int64), tail_sizes(share, n_batches, layout.micro))


def usable_remaining(n: int, layout: Layout) -> int:
    """How many of ``n`` remaining samples a resharded leg reads: the largest multiple of the
    world size (the rest, fewer than the number of ranks, cannot be split into equal shares)."""
    return layout.world * (n // layout.world)


def worker_share(plan: RankPlan, streams: int, worker: int) -> WorkerShare:
    """The ``worker``-th contiguous run of the rank's batches (loader.py's split; the first
    ``n % K`` workers get one more batch)."""
    first, count = P.split_batches(len(plan.sizes), streams, worker)
    start = int(sum(plan.sizes[:first]))
    sizes = plan.sizes[first:first + count]
    return WorkerShare(first, plan.positions[start:start + int(sum(sizes))], sizes)


def shuffle_seed(seed: int, epoch: int, rank: int, worker: int, leg: int) -> int:
    """The shuffle buffer's seed; the first leg keeps loader.py's original seed (bit-exact)."""
    parts = (seed, epoch, rank, worker, P.SHUFFLE) + ((leg,) if leg else ())
    return P.seed_for(*parts)


def shuffled(positions: Sequence[int], buffer: int, seed: int) -> list[int]:
    """``positions`` in the order the worker's shuffle buffer emits them (webdataset's stage,
    run on integers)."""
    items = [int(p) for p in positions]
    if buffer <= 1:
        return items
    stage = wds.shuffle(buffer, initial=buffer, rng=random.Random(seed))
    return list(stage(iter(items)))


def consumed_batches_of_worker(batches: int, streams: int, worker: int, count: int) -> int:
    """How many of its ``count`` batches worker ``worker`` produced among a rank's first
    ``batches`` outputs (the DataLoader takes batches from workers round-robin)."""
    return min(count, P.skipped_local_batches(batches, streams, worker))


# --------------------------------------------------------------------------------------------
# Replay: which positions a closed leg consumed, and what remains of the epoch


def leg_rank_plan(n: int, leg_index: int, remaining: Optional[np.ndarray], layout: Layout, rank: int) -> Optional[RankPlan]:
    """The rank's plan in leg ``leg_index`` (0: the normal plan over ``n`` samples; else the
    resharding of ``remaining``)."""
    if leg_index == 0:
        return normal_rank_plan(n, layout, rank)
    return resharded_rank_plan(remaining, layout, rank)


def consumed_positions(plan: RankPlan, layout: Layout, batches: int, seed: int, epoch: int, rank: int,
                       leg_index: int) -> np.ndarray:
    """Positions a rank consumed in its first ``batches`` batches of a leg (replayed, not read)."""
    out = []
    for worker in range(layout.streams):
        share = worker_share(plan, layout.streams, worker)
        done = consumed_batches_of_worker(batches, layout.streams, worker, len(share.sizes))
        if done == 0:
            continue
        order = shuffled(share.positions, layout.buffer, shuffle_seed(seed, epoch, rank, worker, leg_index))
        out.extend(order[:int(sum(share.sizes[:done]))])
    return np.asarray(out, dtype=np.int64)


def remaining_positions(n: int, legs: Sequence[Leg], seed: int, epoch: int) -> np.ndarray:
    """The positions of an epoch of ``n`` samples still to be read after the closed ``legs``
    (ascending). The epoch's planned set is what its first leg would have read in full (the
    drop_last remainder of that layout is not part of the epoch)."""
    remaining: Optional[np.ndarray] = None
    for index, leg in enumerate(legs):
        planned, consumed = [], []
        for rank in range(leg.layout.world):
            plan = leg_rank_plan(n, index, remaining, leg.layout, rank)
            if plan is None:
                continue
            if leg.batches > len(plan.sizes):
                raise DataError(f"the checkpoint says {leg.batches} batches were consumed in leg {index} of epoch "
                                f"{epoch}, but that leg has {len(plan.sizes)} per rank: the data position does not "
                                "match this dataset (was data.url, the split or train_subset changed?)")
            planned.append(plan.positions)
            consumed.append(consumed_positions(plan, leg.layout, leg.batches, seed, epoch, rank, index))
        planned_all = np.concatenate(planned) if planned else np.zeros(0, np.int64)
        done = np.concatenate(consumed) if consumed else np.zeros(0, np.int64)
        remaining = np.setdiff1d(planned_all, done, assume_unique=True)
    return remaining if remaining is not None else np.arange(n, dtype=np.int64)


@dataclass(frozen=True)
class EpochPlan:
    """What a rank reads in one epoch: the normal plan, or a resharded leg."""

    leg_index: int
    """0 for the normal plan; else the index of the resharded leg (seeds depend on it)."""
    rank: Optional[RankPlan]
    """This rank's positions and batch sizes (None: nothing left to read in this epoch). In
    resampled mode only the sizes matter."""
    dropped: int = 0
    """Remaining samples left out because they could not be split (see the module docstring)."""

    @property
    def n_batches(self) -> int:
        """Batches every rank yields."""
        return 0 if self.rank is None else len(self.rank.sizes)


def plan_epoch(n: int, legs: Sequence[Leg], layout: Layout, rank: int, seed: int, epoch: int) -> EpochPlan:
    """This rank's plan for ``epoch`` after the closed ``legs`` (none: the normal plan)."""
    if not legs:
        return EpochPlan(0, normal_rank_plan(n, layout, rank))
    remaining = remaining_positions(n, legs, seed, epoch)  # resampled epochs are virtual: only the count matters
    dropped = len(remaining) - usable_remaining(len(remaining), layout)
    if dropped:
        warnings.warn(f"epoch {epoch}: {dropped} remaining sample(s) cannot be split evenly over {layout.world} rank(s) "
                      f"at micro-batch {layout.micro} and are left out of this epoch", RuntimeWarning, stacklevel=2)
    return EpochPlan(len(legs), resharded_rank_plan(remaining, layout, rank), dropped)


def segments_for(positions: np.ndarray, ordered_shards: Sequence, urls: Sequence[str],
                 endpoint: Optional[str]) -> tuple[list[P.Segment], frozenset]:
    """Segments that cover ``positions`` (ascending epoch positions), one per shard touched,
    and the wanted ``(shard name, position in shard)`` pairs among what they read."""
    counts = np.asarray([s.count for s in ordered_shards], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    which = np.searchsorted(starts, positions, side="right") - 1
    segments, wanted = [], set()
    for index in np.unique(which):
        shard = ordered_shards[int(index)]
        local = positions[which == index] - starts[index]
        lo, hi = int(local.min()), int(local.max()) + 1
        segments.append(P.Segment(urls[int(index)], shard.name, lo, hi - lo, shard.count, endpoint, shard.sha256))
        wanted.update((shard.name, int(p)) for p in local)
    return segments, frozenset(wanted)


def describe(legs: Sequence[Leg]) -> str:
    """``2 ranks x 4 batches, then 1 rank x 3`` (for log lines)."""
    return ", then ".join(f"{leg.layout.world} rank(s) x {leg.batches} batch(es)" for leg in legs)


__all__ = ["DataPosition", "EpochPlan", "Layout", "Leg", "RankPlan", "WorkerShare", "consumed_positions", "describe",
           "plan_epoch", "remaining_positions", "resharded_rank_plan", "segments_for", "shuffled", "tail_sizes",
           "usable_remaining", "worker_share"]
