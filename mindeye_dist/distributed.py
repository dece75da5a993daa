"""Distributed helpers: rank/world discovery and a differentiable all-gather.

Rank and world come from the initialised ``torch.distributed`` process group when there is
one, else from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), so the
``deepspeed`` launcher, ``torchrun``, SLURM (with those variables exported) and Ray Train all
look the same to the library. Nothing here initialises a process group.

Gradient convention of :func:`all_gather_with_grad` (the one ``torch.distributed.nn`` and
open_clip's ``gather_with_grad`` use): the backward pass **sums** over ranks the gradient that
each rank's loss sends to a shard. If every rank computes ``L_r`` and the objective is
``L = mean_r L_r``, rank r receives ``W * dL/dx_r`` for its local input ``x_r``; the data-parallel
engine (DDP, DeepSpeed) then averages parameter gradients over the W ranks, which cancels the
factor W, so parameters see exactly ``dL/dtheta``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_with_grad",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_initialized",
]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        message = f"environment variable {name}={raw!r} is not an integer; unset it or fix the launcher"
        raise ValueError(message) from None


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is ready to use."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank: from the process group if initialised, else ``RANK`` (default 0)."""
    if is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    """Number of ranks: from the process group if initialised, else ``WORLD_SIZE`` (default 1)."""
    if is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def get_local_rank() -> int:
    """Rank within the node, from ``LOCAL_RANK`` (default 0).

    ``torch.distributed`` does not track node-local ranks; every supported launcher exports
    ``LOCAL_RANK``, so the environment is the source of truth even after initialisation.
    """
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True when this job has more than one rank (process group or environment says so)."""
    return get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums gradients across ranks."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local_size = tensor.shape[0]
        tensor = tensor.contiguous()
        shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, tensor, group=group)
        return torch.cat(shards, dim=0)  # (W * B, ...)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        # Every rank's loss may depend on every shard: a shard's gradient is the sum over ranks.
        # all_reduce works on every backend (gloo has no reduce_scatter); it moves ~2x the bytes
        # of a reduce-scatter, which is negligible next to the model's own gradient traffic.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local_size
        return grad[start : start + ctx.local_size], None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather ``tensor`` along dim 0 in rank order, keeping gradients.

    Every rank must pass a tensor of the same shape (use ``drop_last`` batching). The result is
    ``(W * B, ...)`` with this rank's rows at ``[rank * B, (rank + 1) * B)``. Backward sums the
    gradient of all ranks' losses into each shard (see the module docstring for the scaling).
    Without an initialised process group this returns ``tensor`` unchanged (world size 1).
    """
    if not is_initialized():
        if _env_int("WORLD_SIZE", 1) > 1:
            raise RuntimeError(
                "all_gather_with_grad: WORLD_SIZE > 1 but torch.distributed is not initialised; "
                "initialise the process group before the first training step"
            )
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


# --------------------------------------------------------------------------------------------
# Process-group lifecycle (used by mindeye_dist.train.run)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for MASTER_PORT, launcher ports and loopback test servers)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Initialise the process group from the environment; returns (rank, world_size, device).

    A plain ``python`` process gets a world of one on 127.0.0.1 (DeepSpeed would otherwise try
    MPI discovery). On CPU-only hosts: gloo, DeepSpeed's shm all-reduce op disabled (it JIT-builds
    for 26 s and leaks 67 MB of /dev/shm per rank per run, stack notes), and torch threads split
    between the node's ranks so two ranks on two cores do not oversubscribe. Collectives time out
    after ``timeout_s`` (env ``MINDEYE_DIST_TIMEOUT_S``, default 1800) so a rank whose peer died
    fails instead of hanging forever.
    """
    from datetime import timedelta

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: start ranks with deepspeed, torchrun or srun")
        os.environ["MASTER_PORT"] = str(free_port())
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_world = _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1))
        if "OMP_NUM_THREADS" not in os.environ or local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    import deepspeed
    import deepspeed.ops

    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = get_local_rank()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not is_initialized():
        timeout = timedelta(seconds=float(timeout_s or os.environ.get("MINDEYE_DIST_TIMEOUT_S", 1800)))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    return get_rank(), get_world_size(), device


def teardown_distributed() -> None:
    """Destroy the process group (avoids an intermittent rc -6 crash at exit, stack notes)."""
    if is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer is already gone; still tear down locally
            pass
        dist.destroy_process_group()
