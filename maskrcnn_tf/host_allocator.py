"""Keeps freed host memory for reuse instead of handing it back to the kernel on every step.

Why: TensorFlow's CPU tensors and its kernels' scratch buffers come from glibc malloc (or, with oneDNN on,
partly from oneDNN's own pool). glibc maps every block above its (dynamic) mmap threshold with mmap and
unmaps it on free, and returns the top of a heap to the kernel as soon as it exceeds the trim threshold.
A training step frees and reallocates the same buffers every step, so each step faults the same pages in
again: with TF built without oneDNN, most of the demo's kernel time went to minor page faults.
Measurements: benchmarks/README.md, "Host allocator".

What `configure()` does, once, at the start of each program (train.py, eval.py, predict.py, export.py,
the benchmark cases), before TensorFlow allocates anything:
- glibc `mallopt`: M_MMAP_THRESHOLD = 32 MiB (the largest value glibc accepts on 64-bit: it refuses
  more than half its 64 MiB per-thread heap), M_TRIM_THRESHOLD = 256 MiB, M_TOP_PAD = 64 MiB. Setting
  the mmap threshold also turns glibc's dynamic threshold off, so blocks below 32 MiB always come from
  the heaps and are reused; a heap's top is given back only beyond 256 MiB of free space.
- TensorFlow's tensor pool on the CPU (TF_CPU_ALLOCATOR_USE_BFC=1, unless the environment already sets
  it): tensors of any size, including those above glibc's 32 MiB ceiling, are carved from regions the
  pool keeps. This is what removes the faults when TF runs without oneDNN (Eigen kernels, e.g. CPUs
  without AVX-512 VNNI/BF16 or AMX), where every tensor went through malloc. The pool grows to the
  program's peak and keeps it (TF's cap: TF_CPU_BFC_MEM_LIMIT_IN_MB, 64 GiB by default).
- Environment variables for glibc would need the program to re-execute itself (glibc reads them at
  start-up); `mallopt` through ctypes has the same effect in-process, so nothing is re-executed.

When: MASKRCNN_TF_HOST_ALLOCATOR = auto (default) | on | off.
- auto: only on a host without accelerator device nodes (/dev/nvidia*, /dev/kfd, /dev/accel*,
  /dev/vfio/*): both settings were measured on CPU-only hosts, never with a GPU or TPU attached.
- on: also on accelerator hosts. off: glibc's and TensorFlow's defaults.
- Only glibc has `mallopt` with these meanings. Without it (macOS, musl) `configure()` does nothing and
  says so in its result, quietly: no warning, no error, no tensor pool either.

Decisions:
- host_memory.HeapTrimmer stays as it is (malloc_trim every 0.5 s around fit). It releases free heap
  pages the settings keep, so part of the glibc gain goes, but it holds the R50 step's peak RSS where it
  was; rules that trimmed less raised that peak. Pool regions are not malloc's free memory: the trimmer
  does not touch them.
- M_MMAP_MAX = 0 (no mmap at all) instead of the pool: fewer faults than the thresholds alone but far
  more than the pool (benchmarks/README.md); tcmalloc and jemalloc have no PyPI wheel and would need
  LD_PRELOAD, i.e. a re-exec.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

ENV_SWITCH = "MASKRCNN_TF_HOST_ALLOCATOR"
_OFF_VALUES = ("0", "off", "false", "no")
_ON_VALUES = ("1", "on", "true", "yes")
TENSOR_POOL_ENV = "TF_CPU_ALLOCATOR_USE_BFC"  # read by TensorFlow when it creates its CPU allocator
# Device nodes of NVIDIA GPUs, AMD GPUs (ROCm), and Cloud TPU VMs (older: accel, newer: vfio).
ACCELERATOR_NODES = ("nvidia[0-9]*", "kfd", "accel[0-9]*", "vfio/[0-9]*")

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


def accelerator_device_nodes(dev_dir: str = "/dev") -> list:
    """Device nodes under dev_dir that belong to a GPU or TPU (empty on a CPU-only host)."""
    return sorted(path for pattern in ACCELERATOR_NODES for path in glob.glob(os.path.join(dev_dir, pattern)))


def configure(environ=None, libc=None, dev_dir: str = "/dev") -> str:
    """Applies the settings above to this process (idempotent). Returns what happened: "applied",
    "off" (MASKRCNN_TF_HOST_ALLOCATOR=off), "accelerator host" (auto, and a GPU/TPU device node exists)
    or "unavailable" (no glibc mallopt, or glibc refused a value). `environ` is where the tensor-pool
    variable goes (os.environ by default); `libc` and `dev_dir` replace the real ones (tests)."""
    global _active
    environ = os.environ if environ is None else environ
    if disabled_by_env(environ):
        return "off"
    forced = environ.get(ENV_SWITCH, "").strip().lower() in _ON_VALUES
    if not forced and accelerator_device_nodes(dev_dir):
        return "accelerator host"
    mallopt = _glibc_function(_LIBC if libc is None else libc, "mallopt", ctypes.c_int,
                              [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return "unavailable"
    # mallopt returns 1 on success, 0 when glibc rejects the value.
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS):
        return "unavailable"
    environ.setdefault(TENSOR_POOL_ENV, "1")  # an explicit choice in the environment wins
    _active = True
    return "applied"


def active() -> bool:
    """True once `configure()` applied the settings in this process."""
    return _active
