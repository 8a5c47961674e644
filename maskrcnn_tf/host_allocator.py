"""Keeps freed host memory for reuse instead of handing it back to the kernel on every step.

Why: TensorFlow's CPU tensors and its kernels' scratch buffers come from glibc malloc. glibc maps
every block above its (dynamic) mmap threshold with mmap and unmaps it on free, and returns the top of
a heap to the kernel as soon as it exceeds the trim threshold. A training step frees and reallocates
the same buffers every step, so each step faults the same pages in again: on the machine of issue 15 the
demo's training spent a sizeable share of its CPU time in the kernel, in minor page faults
(issue 15; the measurements are in benchmarks/README.md, "Host allocator").

What `configure()` does, once, at the start of each program (train.py, eval.py, predict.py,
export.py, the benchmark cases), before TensorFlow allocates anything:
- glibc `mallopt`: M_MMAP_THRESHOLD = 32 MiB (the largest value glibc accepts on 64-bit: it refuses
  more than half its 64 MiB per-thread heap), M_TRIM_THRESHOLD = 256 MiB, M_TOP_PAD = 64 MiB. Setting
  the mmap threshold also turns glibc's dynamic threshold off, so blocks below 32 MiB always come from
  the heaps and are reused; a heap's top is given back only beyond 256 MiB of free space (per-thread
  heaps hold at most 64 MiB, so only malloc_trim shrinks them).
- Environment variables would need the program to re-execute itself (glibc reads them at startup);
  `mallopt` through ctypes has the same effect in-process, so nothing is re-executed.

Decisions:
- host_memory.HeapTrimmer stays as it is (malloc_trim every 0.5 s around fit). It releases free pages
  the settings keep, so part of the gain goes (the demo keeps about two thirds of its fault reduction),
  but it holds the R50 step's peak RSS where it was. Rules that trimmed less (only after a burst of
  frees, only near the peak RSS) raised that peak.
- Not kept (measured in benchmarks/README.md): TensorFlow's BFC allocator on CPU
  (TF_CPU_ALLOCATOR_USE_BFC) removed fewer faults and none in the R50 step; tcmalloc and jemalloc have
  no PyPI wheel and would need LD_PRELOAD, i.e. a re-exec.
- Only glibc has `mallopt` with these meanings. Without it (macOS, musl) `configure()` does nothing and
  says so in its result, quietly: no warning, no error.
- Off switch: MASKRCNN_TF_HOST_ALLOCATOR=off (or 0/false/no) in the environment; then glibc's defaults
  stay and the trimmer trims every period as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_SWITCH = "MASKRCNN_TF_HOST_ALLOCATOR"
_OFF_VALUES = ("0", "off", "false", "no")

# glibc <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
KEEP_FREE_BYTES = 256 << 20  # trim threshold: free heap kept for reuse
TOP_PAD_BYTES = 64 << 20  # extra heap requested per sbrk/heap growth (virtual until touched)
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, KEEP_FREE_BYTES),
            (M_TOP_PAD, TOP_PAD_BYTES))


def _load_libc():
    """The C library, or None when ctypes cannot load it."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _glibc_function(libc, name: str, restype, argtypes):
    """libc.<name> when libc is glibc and has it, else None (macOS, musl, or an older glibc)."""
    if libc is None or getattr(libc, "gnu_get_libc_version", None) is None:
        return None
    function = getattr(libc, name, None)
    if function is not None:
        function.restype, function.argtypes = restype, argtypes
    return function


_LIBC = _load_libc()
_active = False  # configure() applied the settings in this process


def disabled_by_env(environ=None) -> bool:
    """True when MASKRCNN_TF_HOST_ALLOCATOR says off."""
    value = (os.environ if environ is None else environ).get(ENV_SWITCH, "")
    return value.strip().lower() in _OFF_VALUES


def configure(environ=None, libc=None) -> str:
    """Applies the malloc settings above to this process (idempotent). Returns what happened:
    "applied", "off" (switched off by MASKRCNN_TF_HOST_ALLOCATOR) or "unavailable" (no glibc mallopt,
    or glibc refused a value). `libc` replaces the loaded C library (tests)."""
    global _active
    if disabled_by_env(environ):
        return "off"
    mallopt = _glibc_function(_LIBC if libc is None else libc, "mallopt", ctypes.c_int,
                              [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return "unavailable"
    # mallopt returns 1 on success, 0 when glibc rejects the value.
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS):
        return "unavailable"
    _active = True
    return "applied"


def active() -> bool:
    """True once `configure()` applied the settings in this process."""
    return _active
