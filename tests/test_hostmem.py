"""The host allocator setting: with ``reuse`` a step's freed memory is reused without page faults.

Each case runs in a fresh interpreter: how glibc serves a block depends on the heap the process
has built up, and the pytest process's heap depends on which tests ran before.
"""

import json
import subprocess
import sys

import pytest

from mindeye_dist import hostmem

BLOCK = 128 * 2**20  # well above glibc's largest mmap threshold (32 MiB)
PAGES = BLOCK // 4096

_PROBE = """
import json, resource, sys
import torch
from mindeye_dist import hostmem

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones({n})
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del t
    return after - before

out = {{}}
for step in sys.argv[1:]:
    if step in ("reuse", "system") or step.startswith("auto"):
        mode, _, device = step.partition(":")
        out[step + ":mode"] = hostmem.apply(mode, device or "cpu")
    else:
        out.setdefault("faults", []).append(faults())
print(json.dumps(out))
""".format(n=BLOCK // 4)


def _probe(*steps: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _PROBE, *steps], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def glibc():
    if hostmem._libc() is None:
        pytest.skip("mallopt is glibc's; other platforms are left alone by design")


def test_glibc_defaults_fault_every_page_of_every_block():
    assert _probe("fill", "fill")["faults"][1] > 0.9 * PAGES  # mmapped, unmapped on free, mmapped again


def _mostly_reused(faults: list) -> bool:
    """Blocks served from pages already faulted in: glibc's defaults fault all of every block.
    (Which fill reuses depends on how small allocations in between split the free chunk: seen
    every fill, or every other one.)"""
    return min(faults) < 0.05 * PAGES and sum(faults) <= 0.6 * len(faults) * PAGES


def test_reuse_serves_the_next_block_from_already_faulted_pages():
    out = _probe("reuse", "fill", "fill", "fill", "fill", "fill")
    assert out["reuse:mode"] == "reuse"
    assert out["faults"][0] > 0.9 * PAGES  # the heap grows once
    assert _mostly_reused(out["faults"][1:])


def test_system_mode_undoes_reuse():
    out = _probe("reuse", "fill", "fill", "fill", "system", "fill", "fill")
    assert out["system:mode"] == "system"
    assert _mostly_reused(out["faults"][1:3])
    assert min(out["faults"][3:]) > 0.9 * PAGES


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="reuse"):
        hostmem.apply("jemalloc")


def test_auto_reuses_on_cpu_only():
    assert hostmem.resolve("auto", "cpu") == "reuse"
    assert hostmem.resolve("auto", "cpu", memory_bound=True) == "system"  # ZeRO-3 or offload: RSS over speed
    assert hostmem.resolve("auto", "cuda") == "system"
    assert hostmem.resolve("system", "cpu") == "system" and hostmem.resolve("reuse", "cuda") == "reuse"
    out = _probe("auto:cuda", "fill", "fill")  # a GPU run leaves glibc alone: every block faults
    assert out["auto:cuda:mode"] == "unchanged" and out["faults"][1] > 0.9 * PAGES
