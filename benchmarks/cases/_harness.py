"""Shared plumbing of the case scripts (benchmarks/cases/<side>_<what>.py): stdout discipline, timing,
peak RSS, load average, the one JSON line, and the synthetic inputs every side draws the same way.

Imports only the standard library (+ `resource`), so every side's venv can use it. Functions that need
arrays take the caller's `numpy` module as an argument instead of importing it here.

Decisions:
- `claim_stdout()` keeps a private copy of file descriptor 1 and points fd 1 at stderr, so anything a
  library prints (TF, Keras progress bars, Model Garden's config dumps, C++ logs) lands on stderr and
  stdout carries exactly one JSON line, written by `emit`.
- Peak RSS is `ru_maxrss` of this process (the high-water mark of the whole run: model build, first call
  and timed calls), which is why compare.py runs every case in its own process.
- `value` is the median of the timed runs; the first call (tracing, compilation, allocator warm-up) is
  reported separately as `first_s` and never enters the median.
- `cpu` holds this process's user and system CPU seconds and minor page faults up to the record (model
  build and all calls): kernel time spent faulting in freed-and-reallocated memory shows there, and
  unlike wall time these do not grow when other processes share the machine. compare.py adds the same
  counts for the whole child process (`process_cpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

_JSON_OUT = None  # private copy of the original stdout, set by claim_stdout()

# Ground-truth instances of the `train` case, for a 1024x1024 image (scaled to other sizes):
# (class id 1..80, [y1, x1, y2, x2] pixels, shape). Three per image, different sizes and FPN levels.
TRAIN_INSTANCES_1024 = (
    ((1, (100.0, 200.0, 400.0, 600.0), "rectangle"), (2, (500.0, 100.0, 900.0, 300.0), "ellipse"),
     (3, (600.0, 600.0, 700.0, 760.0), "rectangle")),
    ((4, (50.0, 50.0, 600.0, 500.0), "ellipse"), (5, (650.0, 400.0, 1000.0, 1000.0), "rectangle"),
     (6, (200.0, 700.0, 280.0, 780.0), "ellipse")),
)


def claim_stdout() -> None:
    """Routes fd 1 to stderr and keeps the real stdout for `emit`. Call before importing big libraries."""
    global _JSON_OUT
    if _JSON_OUT is None:
        sys.stdout.flush()
        _JSON_OUT = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)


def emit(record: dict) -> None:
    """Writes `record` as the one JSON line of this process (to the real stdout)."""
    out = _JSON_OUT if _JSON_OUT is not None else sys.stdout
    out.write(json.dumps(record) + "\n")
    out.flush()


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every case script accepts: --case, --image_size, --repeats, --threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--case", required=True)
    parser.add_argument("--image_size", type=int, default=1024, help="square input size, pixels")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls after the first")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    return parser


# The model cases (ours/torchvision/modelgarden _model.py) and their default timed calls. train_v2 (the
# torchvision v2 architecture with trainable BatchNorm) only in ours_model.py and torchvision_model.py.
MODEL_CASE_REPEATS = {"infer": 5, "train": 3, "train_v2": 3}


def parse_model_case_args(parser: argparse.ArgumentParser,
                          cases: Sequence[str] = ("infer", "train")) -> argparse.Namespace:
    """Parses a model case's flags: --case must be one of `cases` (the script's); --repeats defaults per case."""
    args = parser.parse_args()
    if args.case not in cases:
        parser.error(f"--case must be one of {', '.join(cases)}")
    if args.repeats is None:
        args.repeats = MODEL_CASE_REPEATS[args.case]
    return args


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def load_avg_1m() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_usage(who: int = resource.RUSAGE_SELF) -> dict:
    """{"user_s", "system_s", "minor_faults"} of this process (or of its waited-for children)."""
    usage = resource.getrusage(who)
    return {"user_s": round(usage.ru_utime, 2), "system_s": round(usage.ru_stime, 2),
            "minor_faults": usage.ru_minflt}


def time_calls(fn: Callable[[], object], repeats: int) -> Tuple[float, List[float], object]:
    """Calls fn once (first_s), then `repeats` more times. Returns (first_s, runs, last result).

    The previous result is dropped before each call, so a call's outputs (e.g. 100 pasted 1024x1024
    masks, 400 MB) never coexist with the next call's in the peak RSS.
    """
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    runs = []
    for i in range(repeats):
        result = None
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
        log(f"run {i + 1}/{repeats}: {runs[-1]:.3f} s")
    return first, runs, result


def record(case: str, side: str, metric: str, runs: Sequence[float], first_s: Optional[float],
           versions: dict, **fields) -> dict:
    """The common JSON record: value = median of runs (rounded), plus RSS, load and case fields."""
    return {
        "case": case, "side": side, "metric": metric,
        "value": round(statistics.median(runs), 4),
        "runs": [round(r, 4) for r in runs],
        "first_s": None if first_s is None else round(first_s, 3),
        "peak_rss_mb": peak_rss_mb(),
        "cpu": cpu_usage(),
        "load_avg_1m": load_avg_1m(),
        "versions": versions,
        **fields,
    }


def smooth_noise_image(np, size: int, seed: int = 0):
    """A natural-looking (spatially correlated) RGB image, uint8 [size, size, 3].

    Sum of value-noise octaves (random grids of 4..128 cells, bilinearly upsampled), so that
    convolution outputs and RPN scores look like those of a photo rather than of white noise.
    """
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.float64)
    coords = (np.arange(size) + 0.5) / size
    for cells, weight in ((4, 0.4), (16, 0.3), (64, 0.2), (128, 0.1)):
        grid = rng.uniform(0, 255, size=(cells + 1, cells + 1, 3))
        pos = coords * cells
        i = np.minimum(pos.astype(int), cells - 1)
        t = (pos - i)[:, None]
        rows = grid[i] * (1 - t[..., None]) + grid[i + 1] * t[..., None]  # [size, cells + 1, 3]
        cols = rows[:, i] * (1 - t.T[..., None]) + rows[:, i + 1] * t.T[..., None]  # [size, size, 3]
        image += weight * cols
    return np.clip(image, 0, 255).astype(np.uint8)


def train_instances(size: int):
    """TRAIN_INSTANCES_1024 scaled to a size x size image: per image [(class, (y1, x1, y2, x2), shape)]."""
    scale = size / 1024.0
    return [[(cls, tuple(v * scale for v in box), shape) for cls, box, shape in image]
            for image in TRAIN_INSTANCES_1024]


def full_mask(np, size: int, box, shape: str):
    """uint8 [size, size] binary mask of a filled rectangle or ellipse inscribed in box [y1, x1, y2, x2]."""
    y1, x1, y2, x2 = box
    ys = (np.arange(size) + 0.5)[:, None]
    xs = (np.arange(size) + 0.5)[None, :]
    if shape == "rectangle":
        mask = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
    else:
        cy, cx, ry, rx = (y1 + y2) / 2, (x1 + x2) / 2, (y2 - y1) / 2, (x2 - x1) / 2
        mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
    return mask.astype(np.uint8)
