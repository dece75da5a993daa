"""The host allocator setting: with ``reuse`` a step's freed memory is reused without page faults."""

import resource

import pytest
import torch

from mindeye_dist import hostmem

BLOCK = 128 * 2**20  # well above glibc's largest mmap threshold (32 MiB)


def _faults_to_fill() -> int:
    """Minor page faults taken while allocating and writing a fresh BLOCK-byte tensor, then freeing it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(BLOCK // 4)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del t
    return after - before


@pytest.fixture
def glibc():
    if hostmem._libc() is None:
        pytest.skip("mallopt is glibc's; other platforms are left alone by design")
    yield
    hostmem.system_defaults()


def test_reuse_serves_the_next_block_from_already_faulted_pages(glibc):
    pages = BLOCK // 4096
    assert hostmem.apply("system") in ("system", "unchanged")
    hostmem.system_defaults()
    _faults_to_fill()
    # glibc defaults: the block is mmapped and unmapped on free, so every page faults again
    assert _faults_to_fill() > 0.9 * pages
    assert hostmem.apply("reuse") == "reuse"
    _faults_to_fill()  # grows the heap once
    assert _faults_to_fill() < 0.05 * pages


def test_system_mode_undoes_reuse(glibc):
    hostmem.apply("reuse")
    assert hostmem.apply("system") == "system"
    _faults_to_fill()
    assert _faults_to_fill() > 0.9 * (BLOCK // 4096)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="reuse"):
        hostmem.apply("jemalloc")
