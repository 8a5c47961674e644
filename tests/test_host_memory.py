"""host_memory: malloc_trim really returns freed heap pages, and HeapTrimmer runs and stops its thread."""
import ctypes
import ctypes.util
import time

import pytest

from maskrcnn_tf.host_memory import HeapTrimmer, trim

pytestmark = pytest.mark.skipif(not HeapTrimmer.available, reason="malloc_trim is glibc only")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/self/status")


def test_trim_returns_freed_heap_pages_to_the_os():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024  # below glibc's mmap threshold (128 KiB): served from the heap, not mmap
    count = 3200  # 200 MB
    blocks = []
    for _ in range(count):
        pointer = libc.malloc(block)
        ctypes.memset(pointer, 1, block)  # touch the pages so they are resident
        blocks.append(pointer)
    for pointer in blocks[:-1]:  # the last block pins the heap's top, so free() alone cannot shrink it
        libc.free(pointer)
    before = _rss_mb()
    assert trim()
    after = _rss_mb()
    libc.free(blocks[-1])
    # ~200 MB were freed in the middle of the heap; all of it but allocator bookkeeping goes back.
    assert before - after > 150, (before, after)


def test_heap_trimmer_trims_periodically_and_stops_on_exit():
    with HeapTrimmer(period_s=0.05) as trimmer:
        time.sleep(0.5)
        assert trimmer.trims >= 3
    done = trimmer.trims
    time.sleep(0.2)
    assert trimmer.trims == done  # the thread is gone


def test_heap_trimmer_rejects_a_non_positive_period():
    with pytest.raises(ValueError, match="period_s"):
        HeapTrimmer(period_s=0)
