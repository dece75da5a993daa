"""Host-memory allocator settings for CPU training steps.

PyTorch's CPU allocator has no cache: every tensor is a ``malloc``/``free``. glibc serves
allocations above its mmap threshold (dynamic, at most 32 MiB on 64-bit) with a fresh ``mmap``
and gives them back with ``munmap`` on free, so every step of a large model maps, page-faults
(the kernel zeroes each 4 KiB page) and unmaps its gradients and big activations again: at
scale-200m (16.8M-parameter Linears, 67 MB gradients) that is about 1 GB of page faults per
step. Measured on the 2-core CI machine (scale-200m, 5 steps each at micro-batch 128 and 512,
one process each way): 10.6 s of 26 s wall in the kernel with glibc's defaults, 3.2 s of 23 s
with the settings below; ``python launchers/benchmark.py`` reports the step-time gain (variant
``off: system_malloc``).

``reuse_freed_memory()`` tells glibc (``mallopt``) to serve every allocation from its heap
(``M_MMAP_MAX = 0``) and never to hand the heap's top back (``M_TRIM_THRESHOLD``), so the pages a
step freed are reused by the next step without faulting. The cost: resident memory stays at the
run's peak instead of dropping between steps (a training run returns to its peak every step
anyway). Non-glibc platforms (macOS, musl) are left alone. ``system_defaults()`` puts glibc's
defaults back (the benchmark measures both in one process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from typing import Optional

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

# glibc's steady state after a warm-up: its mmap threshold starts at 128 KiB and rises to the size of
# the largest mmapped block freed, at most 32 MiB on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); the trim
# threshold follows at twice that. Setting them explicitly fixes them there, the most favourable
# "system" case for a training loop (smaller blocks come from the heap, bigger ones are mmapped).
_SYSTEM_MMAP_THRESHOLD = 32 * 2**20
_SYSTEM_TRIM_THRESHOLD = 64 * 2**20
_SYSTEM_TOP_PAD = 128 * 1024  # DEFAULT_TOP_PAD
_SYSTEM_MMAP_MAX = 65536  # DEFAULT_MMAP_MAX
_INT_MAX = 2**31 - 1

_state: Optional[str] = None


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def _set(options: list[tuple[int, int]]) -> bool:
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success, 0 on error
    return all(libc.mallopt(param, value) == 1 for param, value in options)


def reuse_freed_memory(top_pad_bytes: int = 64 * 2**20) -> bool:
    """Keep freed memory in the process for the next step (see the module doc). Returns whether
    the settings were applied (False off glibc). Call it before the first large allocation."""
    global _state
    ok = _set([(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, min(top_pad_bytes, _INT_MAX))])
    if ok:
        _state = "reuse"
        log.info("host allocator: glibc heap only (mmap off), freed memory kept for reuse (trim off)")
    return ok


def system_defaults() -> bool:
    """glibc's warmed-up defaults: blocks over 32 MiB are mmapped (and unmapped on free), the heap
    top is trimmed above 64 MiB."""
    global _state
    ok = _set([(_M_MMAP_MAX, _SYSTEM_MMAP_MAX), (_M_MMAP_THRESHOLD, _SYSTEM_MMAP_THRESHOLD),
               (_M_TRIM_THRESHOLD, _SYSTEM_TRIM_THRESHOLD), (_M_TOP_PAD, _SYSTEM_TOP_PAD)])
    if ok:
        _state = "system"
        # hand back what "reuse" kept, so large blocks are mmapped again as in a fresh process
        # (the heap's free chunks would otherwise keep serving them without faults)
        _libc().malloc_trim(0)
    return ok


def current() -> str:
    """'reuse', 'system' (set here), or 'unchanged' (never set, or not glibc)."""
    return _state or "unchanged"


def resolve(mode: str, device_type: str, memory_bound: bool = False) -> str:
    """``auto`` -> ``reuse`` when the step runs on the CPU, else ``system``: on a GPU host the step's
    tensors live on the device, and keeping the heap at its peak would only hold on to transient
    host buffers (a ZeRO-3 checkpoint gathered on the host, say) for the rest of the run.

    ``memory_bound`` (the run uses ZeRO-3 or an offload: it was configured to save memory) also
    gives ``system``. With ``reuse`` the heap keeps every freed block and fragments: at the scale
    ladder's 286M-parameter NVMe rung (2 ranks, fp32) a rank's RSS was 8.1 GiB after the first step
    and 9.6-10.8 GiB by the tenth, against 5.3-5.8 GiB with ``system`` at the same 15 s per step
    (docs/scale.md)."""
    if mode == "auto":
        return "reuse" if device_type == "cpu" and not memory_bound else "system"
    return mode


def apply(mode: str, device_type: str = "cpu", memory_bound: bool = False) -> str:
    """Apply a ``train.host_memory`` setting (``auto`` per :func:`resolve`); returns :func:`current`."""
    mode = resolve(mode, device_type, memory_bound)
    if mode == "reuse":
        reuse_freed_memory()
    elif mode == "system":
        if _state == "reuse":  # undo; otherwise glibc is left exactly as it started
            system_defaults()
    else:
        raise ValueError(f"host memory mode must be 'reuse' or 'system', got {mode!r}")
    return current()
