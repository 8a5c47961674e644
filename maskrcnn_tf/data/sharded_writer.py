"""The sharded, parallel, atomic TFRecord writer both converters use (coco_converter, txt_converter).

`write_sharded(units, convert_fn, output_prefix, num_shards, num_workers)` writes
{output_prefix}-{i:05d}-of-{n:05d}.tfrecord; convert_fn(unit, stats) turns one unit (an image entry) into a
serialized tf.train.Example or None (skipped, counted in stats).

Decisions:
- Unit k goes to shard k % num_shards, and worker w writes shards w, w + num_workers, ..., so the shard
  contents do not depend on the worker count. Each worker streams: one example in memory at a time.
- Workers are processes started with "fork" where the platform has it (the parent's data is shared
  copy-on-write; workers use only protobuf, TFRecordWriter, OpenCV and pycocotools, never TF ops, which
  are not fork-safe), "spawn" elsewhere. A worker whose parent dies stops after its current unit.
- Atomic output: shards are written as "<final name>.tmp-<pid>" and renamed only after every shard is
  complete; the converters then rename their label map and summary (write_json_atomic). An interrupted
  run leaves only *.tmp-<pid> files, never a final name; the next run over the same output prefix
  deletes those whose process is gone (a live pid may be a conversion still running: left alone).
"""

import glob
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from typing import Callable, List, Optional, Sequence, Tuple

from maskrcnn_tf.data.conversion_report import ConversionError, Stats

SHARD_NAME = "{prefix}-{index:05d}-of-{count:05d}.tfrecord"
LABEL_MAP_SUFFIX = "_label_map.json"  # the converters' label map and summary, next to the shards
SUMMARY_SUFFIX = "_summary.json"
PROGRESS_INTERVAL_S = 0.2  # how often workers report and a tty progress line is redrawn
PLAIN_PROGRESS_INTERVAL_S = 10.0  # non-tty (log file) progress: one line per interval
_TMP_SUFFIX = re.compile(r"\.tmp-(\d+)$")


def shard_paths(output_prefix: str, num_shards: int) -> List[str]:
    return [SHARD_NAME.format(prefix=output_prefix, index=i, count=num_shards) for i in range(num_shards)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_dead_tmp_files(output_prefix: str) -> List[str]:
    """Deletes the *.tmp-<pid> shards and JSON files an interrupted conversion over output_prefix left
    behind, when <pid> is no longer running; returns the deleted paths."""
    removed = []
    candidates = glob.glob(glob.escape(output_prefix) + "-*-of-*.tfrecord.tmp-*") + \
        glob.glob(glob.escape(output_prefix) + "_*.json.tmp-*")
    for path in sorted(candidates):
        match = _TMP_SUFFIX.search(path)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:  # another run cleaned it first
                pass
    return removed


class _Progress:
    """`done/total images, images/s` on stderr: redrawn in place on a tty, plain lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.start = self.last = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()

    def update(self, n: int):
        self.done += n
        now = time.monotonic()
        interval = PROGRESS_INTERVAL_S if self.tty else PLAIN_PROGRESS_INTERVAL_S
        if self.enabled and now - self.last >= interval:
            self.last = now
            self._write(now, final=False)

    def finish(self):
        if self.enabled:
            self._write(time.monotonic(), final=True)

    def _write(self, now: float, final: bool):
        rate = self.done / max(now - self.start, 1e-9)
        line = f"{self.done}/{self.total} images  {rate:.1f} images/s  {now - self.start:.0f}s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _write_worker_shards(jobs, convert_fn, report: Callable, parent_pid: Optional[int]) -> Stats:
    """Writes each (tmp_path, units) job; convert_fn(unit, stats) -> serialized example or None."""
    import tensorflow as tf  # only tf.io.TFRecordWriter (C++ file writer, no TF runtime) is used here

    stats, pending, last = Stats(), 0, time.monotonic()
    for tmp_path, units in jobs:
        with tf.io.TFRecordWriter(tmp_path) as writer:
            for unit in units:
                if parent_pid is not None and os.getppid() != parent_pid:
                    sys.exit(1)  # the parent was killed: stop; its tmp files will never be renamed
                example = convert_fn(unit, stats)
                if example is not None:
                    writer.write(example)
                pending += 1
                if time.monotonic() - last >= PROGRESS_INTERVAL_S:
                    report("progress", pending)
                    pending, last = 0, time.monotonic()
    report("progress", pending)
    return stats


def _worker_main(jobs, convert_fn, queue, parent_pid):
    try:
        import cv2

        cv2.setNumThreads(1)  # one process per core already; OpenCV's pool is also not fork-safe
        stats = _write_worker_shards(jobs, convert_fn, lambda kind, n: queue.put((kind, n)), parent_pid)
        queue.put(("done", (dict(stats.counts), stats.examples)))
    except SystemExit:  # orphaned (parent killed): nobody to report to
        raise
    except BaseException:  # report anything else instead of dying silently
        queue.put(("error", traceback.format_exc()))
        raise


def write_sharded(units: Sequence, convert_fn: Callable, output_prefix: str, num_shards: int,
                  num_workers: int = 1, progress: bool = True) -> Tuple[List[str], Stats]:
    """Writes units[i::num_shards] into shard i with num_workers processes; renames only when all are done.

    convert_fn(unit, stats) -> serialized tf.train.Example bytes or None (skipped; it counts why in stats).
    It must be picklable (a module-level function or functools.partial of one) for "spawn" platforms.
    Returns (final shard paths, merged Stats).
    """
    if num_shards < 1 or num_workers < 1:
        raise ConversionError(f"num_shards ({num_shards}) and num_workers ({num_workers}) must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    finals = shard_paths(output_prefix, num_shards)
    removed = remove_dead_tmp_files(output_prefix)
    if removed:
        sys.stderr.write(f"removed {len(removed)} unfinished file(s) of an interrupted conversion, e.g. "
                         f"{removed[0]}\n")
    stale = sorted(set(glob.glob(glob.escape(output_prefix) + "-*-of-*.tfrecord")) - set(finals))
    if stale:
        sys.stderr.write(f"warning: {len(stale)} shard(s) of another run match {output_prefix}-*, e.g. "
                         f"{stale[0]}; a file pattern over this prefix would read them too\n")
    tmps = [f"{p}.tmp-{os.getpid()}" for p in finals]
    jobs = [(tmps[i], units[i::num_shards]) for i in range(num_shards)]
    num_workers = min(num_workers, num_shards)
    bar = _Progress(len(units), progress)
    stats = Stats()
    processes = []
    try:
        if num_workers == 1:
            stats = _write_worker_shards(jobs, convert_fn, lambda kind, n: bar.update(n), None)
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            queue = ctx.Queue()
            processes = [ctx.Process(target=_worker_main, args=(jobs[w::num_workers], convert_fn, queue,
                                                                os.getpid()), daemon=True)
                         for w in range(num_workers)]
            for p in processes:
                p.start()
            running = len(processes)
            while running:
                try:
                    kind, payload = queue.get(timeout=1.0)
                except Exception:  # queue.Empty: check that no worker died without a word
                    if any(p.exitcode not in (None, 0) for p in processes):
                        raise RuntimeError("a converter worker died (killed? out of memory?)") from None
                    continue
                if kind == "progress":
                    bar.update(payload)
                elif kind == "done":
                    worker_stats = Stats()
                    worker_stats.counts.update(payload[0])
                    worker_stats.examples = payload[1]
                    stats.merge(worker_stats)
                    running -= 1
                else:
                    raise RuntimeError(f"a converter worker failed:\n{payload}")
            for p in processes:
                p.join()
        bar.finish()
    except BaseException:
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join()
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, final in zip(tmps, finals):
        os.replace(tmp, final)
    return finals, stats


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
