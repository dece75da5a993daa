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
from typing import Optional

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


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather ``tensor`` along dim 0 in rank order, keeping gradients.

    ``torch.distributed.nn.functional.all_gather`` (the maintained one open_clip uses; on gloo its
    backward emulates reduce-scatter with all-to-all). Every rank must pass a tensor of the same
    shape (use ``drop_last`` batching). The result is ``(W * B, ...)`` with this rank's rows at
    ``[rank * B, (rank + 1) * B)``. Backward sums the gradient of all ranks' losses into each
    shard (see the module docstring for the scaling). Without an initialised process group this
    returns ``tensor`` unchanged (world size 1).
    """
    if not is_initialized():
        if _env_int("WORLD_SIZE", 1) > 1:
            raise RuntimeError(
                "all_gather_with_grad: WORLD_SIZE > 1 but torch.distributed is not initialised; "
                "initialise the process group before the first training step"
            )
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor, group=group or dist.group.WORLD), dim=0)


# --------------------------------------------------------------------------------------------
# Process-group lifecycle (used by mindeye_dist.train.run)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for MASTER_PORT, launcher ports and loopback test servers)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback(addr: str) -> bool:
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_interface() -> Optional[str]:
    """Name of the loopback network interface (``lo`` on Linux), if there is one."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), None)


def _listen_socket(addr: str, port: int):
    """A socket listening on ``addr:port`` for the rendezvous store (rank 0).

    torch's TCPStore binds every interface when it opens its own socket; handing it a socket we
    bound keeps the store on the address the run was given (127.0.0.1 for one-node jobs).
    """
    import errno
    import socket

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise RuntimeError(
                f"MASTER_PORT {port} on {addr} is already in use (another training job on this machine?). "
                f"Give each job its own port: `deepspeed --master_port N ...`, `torchrun --master-port N ...` or "
                f"MASTER_PORT=N; `python -c 'from mindeye_dist.distributed import free_port; print(free_port())'` "
                "prints a free one.") from None
        raise RuntimeError(f"cannot listen on MASTER_ADDR={addr} MASTER_PORT={port}: {err}") from None
    sock.listen(128)
    return sock


def _init_process_group(backend: str, rank: int, world_size: int, timeout) -> None:
    """``init_process_group`` with a store we control (see :func:`init_distributed`)."""
    _forget_deepspeed_world_group()  # a group destroyed earlier in this process (not by us) left a stale clone
    if world_size == 1:
        # One process: an in-memory store, so nothing listens on any port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT; every rank is a client.
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
        return
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    listen = _listen_socket(addr, port) if rank == 0 else None
    try:
        store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout,
                              master_listen_fd=listen.fileno() if listen is not None else None, use_libuv=False)
    finally:
        if listen is not None:
            listen.detach()  # the store owns the descriptor now
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def dist_timeout_s(timeout_s: float | None = None) -> float:
    """Seconds a rank may wait on its peers: ``timeout_s``, else ``MINDEYE_DIST_TIMEOUT_S``, else 1800."""
    return float(timeout_s or os.environ.get("MINDEYE_DIST_TIMEOUT_S") or 1800)


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Initialise the process group from the environment; returns (rank, world_size, device).

    A plain ``python`` process gets a world of one with an in-memory store (DeepSpeed would
    otherwise try MPI discovery, and torch would open a listening port). With several ranks,
    rank 0 serves the rendezvous store on ``MASTER_ADDR`` only (torch binds every interface by
    default), and on a loopback ``MASTER_ADDR`` gloo's own connections stay on the loopback
    interface too (``GLOO_SOCKET_IFNAME``, unless set). A busy ``MASTER_PORT`` fails with a hint.
    On CPU-only hosts: gloo, DeepSpeed's shm all-reduce op disabled (it JIT-builds for 26 s and
    leaks 67 MB of /dev/shm per rank per run), and torch threads split between the node's ranks
    so two ranks on two cores do not oversubscribe. DeepSpeed then wraps this process group.

    ``timeout_s`` (env ``MINDEYE_DIST_TIMEOUT_S``, default 1800) is the process group's timeout;
    groups DeepSpeed creates later keep torch's 30-minute default, so the trainer also runs a
    :class:`StallWatchdog` with the same limit, which ends a rank whose peers stopped answering.
    """
    from datetime import timedelta

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size > 1 and "MASTER_PORT" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: start ranks with deepspeed, torchrun or srun")
    os.environ.setdefault("MASTER_PORT", "0")  # never listened on in a world of one; DeepSpeed reads it
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_world = _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1))
        if "OMP_NUM_THREADS" not in os.environ or local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if _loopback(os.environ["MASTER_ADDR"]) and "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = _loopback_interface()
        if interface:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    import deepspeed
    import deepspeed.ops

    if not cuda:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = get_local_rank()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    global _OWN_GROUP
    if not is_initialized():  # Ray Train has made one already; DeepSpeed wraps it in initialize()
        timeout = timedelta(seconds=dist_timeout_s(timeout_s))
        _init_process_group("nccl" if cuda else "gloo", rank, world_size, timeout)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
        _OWN_GROUP = True
    return get_rank(), get_world_size(), device


_OWN_GROUP = False
"""True when :func:`init_distributed` created the process group (then it also destroys it)."""


def teardown_distributed(failed: bool = False) -> None:
    """Destroy the process group (avoids an intermittent rc -6 crash at exit).

    After a clean run every rank meets at a barrier first. After a failure (``failed=True``)
    there is no barrier: the failing rank may be alone, and waiting for peers that are blocked in
    a collective would hang both sides until the timeout. The process then exits non-zero, the
    launcher (deepspeed, torchrun, Ray Train) stops the other ranks, and peers blocked on this
    rank's sockets get a connection error.
    """
    global _OWN_GROUP
    if not is_initialized() or not _OWN_GROUP:
        return  # somebody else's group (Ray Train's): its owner tears it down
    _OWN_GROUP = False
    if not failed:
        try:
            dist.barrier()
        except Exception:  # a peer is already gone; still tear down locally
            pass
    dist.destroy_process_group()
    _forget_deepspeed_world_group()


def _forget_deepspeed_world_group() -> None:
    """DeepSpeed caches a clone of the world group (``deepspeed.utils.groups._WORLD_GROUP``); after
    ``destroy_process_group`` that clone belongs to a dead group and the next engine in this process
    (benchmarks, tests, sweeps' in-process trials) fails with "Group ... is not registered"."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_WORLD_GROUP"):
        groups._WORLD_GROUP = None


class StallWatchdog:
    """Ends this process when the training loop makes no progress for ``timeout_s`` seconds.

    A rank blocked in a collective whose peer is stopped or dead waits for the backend's timeout,
    and groups that DeepSpeed creates use torch's 30-minute default whatever the world group was
    given. The loop calls :meth:`beat` at every step, evaluation and save; a background thread
    checks the time since the last beat and, past ``timeout_s``, prints where every thread is
    (``faulthandler``), names the cause and exits with status 3 (the launcher then stops the
    other ranks). ``pause()``/``resume()`` bracket phases allowed to take longer (none today).
    """

    def __init__(self, timeout_s: float, rank: int = 0, what: str = "training"):
        import threading
        import time

        self.timeout_s, self.rank, self.what = float(timeout_s), rank, what
        self._time = time.monotonic
        self._last = self._time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mindeye-stall-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last = self._time()

    def _watch(self) -> None:
        import faulthandler
        import sys

        interval = min(5.0, max(0.2, self.timeout_s / 10))
        while not self._stop.wait(interval):
            idle = self._time() - self._last
            if idle > self.timeout_s:
                print(f"[mindeye] rank {self.rank}: no {self.what} progress for {idle:.0f} s (limit "
                      f"MINDEYE_DIST_TIMEOUT_S={self.timeout_s:g}): a peer rank is stalled or dead, or a "
                      "collective is stuck. Stack of every thread of this rank follows; exiting so the "
                      "launcher stops the job. Resume from the last checkpoint with the same command.",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(3)

    def close(self) -> None:
        self._stop.set()


def local_ranks() -> tuple[int, str]:
    """(ranks, what they are) for a one-node launch: every CUDA device, else 2 CPU ranks (1 on a 1-core host)."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count(), "GPU"
    return max(1, min(2, os.cpu_count() or 1)), "CPU"


def deepspeed_cmd() -> list[str]:
    """The ``deepspeed`` launcher of this interpreter's environment (not whatever is on PATH)."""
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
