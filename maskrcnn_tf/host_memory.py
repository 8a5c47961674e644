"""Gives freed host memory back to the OS while training: glibc's malloc_trim on a background thread.

Why: the first call of the training step (and of the evaluation step) traces the graph, runs Grappler
and instantiates its kernels. That churns through hundreds of MB of C++ heap, and glibc keeps the freed
chunks resident: only the top of a heap is returned on free(), pages in the middle stay until
malloc_trim(0) releases them (madvise). Tensors do not come from that heap (they come from TF's
allocator pool), so what is released is garbage: peak RSS falls and step time does not change
(figures: benchmarks/README.md).

Decisions:
- A thread, not a call after each step: the peak is inside the first step, between graph optimisation
  and the end of the step, where no Python code of ours runs.
- The period (0.5 s) is short against a step (seconds) and long against one malloc_trim (milliseconds
  on this heap). Trimming also releases freed small blocks that the next step would reuse; the page
  faults to bring them back are too few to measure.
- Only glibc has malloc_trim; elsewhere (macOS, musl) `HeapTrimmer` does nothing and says so in
  `HeapTrimmer.available`.
"""

import ctypes
import ctypes.util
import threading
from typing import Optional

DEFAULT_PERIOD_S = 0.5


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


_MALLOC_TRIM = _load_malloc_trim()


def trim() -> bool:
    """Returns freed heap pages to the OS now; True if any were released (False without glibc)."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


class HeapTrimmer:
    """Context manager: calls `trim()` every `period_s` seconds on a daemon thread while it is open.

    with HeapTrimmer():
        model.fit(...)
    """

    available = _MALLOC_TRIM is not None

    def __init__(self, period_s: float = DEFAULT_PERIOD_S):
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.period_s = period_s
        self.trims = 0  # calls made so far
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self):
        while not self._stop.wait(self.period_s):
            trim()
            self.trims += 1

    def __enter__(self):
        if self.available:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="heap-trimmer", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return False
