"""COCO instance annotations -> sharded TFRecords (schema.py), plus the sharded writer the converters share.

Outputs of `convert_coco(..., output_prefix=OUT/train, num_shards=n)`:
  OUT/train-00000-of-0000n.tfrecord ...   one tf.train.Example per image (schema.build_example)
  OUT/train_label_map.json                [{"id": dataset id, "contiguous_id": 1..K, "name"}], sorted by id
  OUT/train_summary.json                  counts of everything written, skipped, dropped, clipped

Decisions (DESIGN.md is silent on them):
- Label map: every category listed in the JSON's "categories" gets a contiguous id (1..K in dataset-id
  order), used or not, so train and val conversions of one dataset agree. One exception: a category that
  no annotation uses AND whose name is the supercategory of another category is a Roboflow-style "parent"
  (potholes' id 0 "pothole" above id 1 "pothole") and is left out. COCO's "person" (its own supercategory)
  is not a parent of another category, so it stays.
- Images are copied byte for byte. Only JPEG and PNG are accepted (schema "image/format"); the true size
  comes from the file header (JPEG SOF / PNG IHDR), which is also what tf.io.decode_image returns (EXIF
  orientation is ignored by both). A file is validated by a cheap decode (JPEG at 1/8 scale, which still
  walks all entropy-coded data) and, because libjpeg only warns on truncated files while TensorFlow's
  decoder fails, by requiring the end-of-image marker after the start of scan (PNG: the IEND chunk).
  A JSON size that disagrees with the header is counted ("images_size_mismatch"); the true size is used
  and boxes are clipped to it.
- Bad annotations are dropped per instance, each counted under the first reason that applies:
  unknown_image, malformed_annotation, unknown_category, malformed_bbox, degenerate_box (width or height
  <= 0), box_outside_image (nothing left after clipping), and with masks: missing_segmentation,
  empty_or_broken_polygon (no polygon with >= 3 finite points), malformed_rle, rle_size_mismatch,
  empty_mask. Boxes partly outside the image are clipped to it ("boxes_clipped"); broken parts of a
  multi-part polygon are removed and the rest kept ("polygon_parts_dropped"). Polygons are filtered
  before pycocotools sees them because frPyObjects reads a list whose first entry has 4 numbers as
  boxes, not polygons. Crowd instances (uncompressed RLE in COCO) are kept with is_crowd = 1.
- A mask is exactly pycocotools' annToMask of the annotation (frPyObjects + merge for polygons) at the
  true image size, written as an 8-bit 0/1 PNG straight from its run lengths (rle_png.py: the cost
  follows the instance's box, not the image). Run lengths that do not cover the image exactly are
  "malformed_rle". The box is the JSON's bbox (clipped), not the mask's extent, and "area" is the
  JSON's area (mask or box area when missing), as Model Garden does.
- The annotation file is streamed once into a compact index (coco_json.py: per annotation its image
  id and where its text is in the file); each worker re-reads the annotations of the image it writes.
  Memory stays flat as the dataset grows (no json.load of the whole file), and grouping annotations by
  image is one stable sort, not a lookup per image.
- Images: the first --max_images in the JSON's "images" order. Image k goes to shard k % num_shards, and
  worker w writes shards w, w + num_workers, ..., so the shard contents do not depend on the worker
  count. Each worker streams: one example in memory at a time.
- Workers are processes started with "fork" where the platform has it (the index is shared
  copy-on-write; workers use only protobuf, TFRecordWriter, OpenCV and pycocotools, never TF ops, which
  are not fork-safe), "spawn" elsewhere. A worker whose parent dies stops after its current image.
- Atomic output: shards are written as "<final name>.tmp-<pid>" and renamed only after every shard is
  complete; the label map and then the summary are renamed last. An interrupted run leaves only
  *.tmp-<pid> files (delete them by hand), never a final name.
- Hook for tests: env MASKRCNN_TF_CONVERT_SLEEP_S (seconds) makes a worker sleep after each image so
  a test can kill a conversion mid-run.
"""

import collections
import dataclasses
import functools
import glob
import json
import math
import multiprocessing
import os
import struct
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from maskrcnn_tf.data import coco_json, rle_png, schema

SHARD_NAME = "{prefix}-{index:05d}-of-{count:05d}.tfrecord"
LABEL_MAP_SUFFIX = "_label_map.json"
SUMMARY_SUFFIX = "_summary.json"
SLEEP_ENV = "MASKRCNN_TF_CONVERT_SLEEP_S"
MAX_EXAMPLES_PER_REASON = 5  # messages kept per reason in the summary, so a bad dataset stays readable
PROGRESS_INTERVAL_S = 0.2  # how often workers report and a tty progress line is redrawn
PLAIN_PROGRESS_INTERVAL_S = 10.0  # non-tty (log file) progress: one line per interval
MIN_POLYGON_COORDS = 6  # 3 points: fewer cannot enclose a pixel
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carrying the image size (SOF0..SOF15 except DHT C4, JPG C8, DAC CC).
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_SOS = 0xDA
# Markers without a length field: TEM, RST0..7, SOI, EOI.
JPEG_STANDALONE_MARKERS = frozenset([0x01] + list(range(0xD0, 0xDA)))


class ConversionError(Exception):
    """An input problem that stops the whole run (missing/unreadable annotation file, bad arguments)."""


class BadImage(Exception):
    """An image file that cannot be used; `reason` is the summary key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageFile:
    encoded: bytes  # the file's bytes, unchanged
    image_format: str  # "jpeg" | "png"
    height: int
    width: int


# ----------------------------------------------------------------------------------------------------
# Image files


def _jpeg_size_and_scan(data: bytes) -> Tuple[int, int, int]:
    """Walks JPEG marker segments -> (height, width, offset of the first start-of-scan)."""
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in JPEG_SOF_MARKERS and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (height, width)
        if marker == JPEG_SOS:
            if size is None:
                raise ValueError("start of scan before any frame header")
            return size[0], size[1], pos
        pos += 2 + length
    raise ValueError("no start of scan (truncated header)")


def read_image_file(path: str) -> ImageFile:
    """Reads and validates one JPEG/PNG file; raises BadImage(reason) when it cannot be used."""
    import cv2  # local: the package itself does not need OpenCV

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadImage("missing_image_file", f"{path}: no such file") from None
    except OSError as e:
        raise BadImage("unreadable_image_file", f"{path}: {e}") from None
    try:
        if data.startswith(JPEG_SOI):
            image_format = "jpeg"
            height, width, scan = _jpeg_size_and_scan(data)
            # Inside entropy-coded data 0xFF is stuffed (FF 00), so FF D9 after the scan start is the EOI.
            if data.find(JPEG_EOI, scan) < 0:
                raise ValueError("truncated: no end-of-image marker")
            flags = cv2.IMREAD_REDUCED_GRAYSCALE_8
        elif data.startswith(PNG_SIGNATURE):
            image_format = "png"
            if data[12:16] != b"IHDR" or b"IEND" not in data[-12:]:
                raise ValueError("truncated or malformed PNG")
            width, height = struct.unpack(">II", data[16:24])
            flags = cv2.IMREAD_UNCHANGED
        else:
            raise BadImage("unsupported_image_format", f"{path}: not a JPEG or PNG file")
        if height <= 0 or width <= 0:
            raise ValueError(f"header size {height}x{width}")
        if cv2.imdecode(np.frombuffer(data, np.uint8), flags) is None:
            raise ValueError("OpenCV cannot decode it")
    except (ValueError, struct.error, cv2.error) as e:
        raise BadImage("undecodable_image", f"{path}: {e}") from None
    return ImageFile(data, image_format, int(height), int(width))


def is_safe_relative_path(name: str) -> bool:
    """True for a relative path that stays inside its root: not absolute, no '..' component."""
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    return ".." not in name.replace("\\", "/").split("/")


def clip_box(x1: float, y1: float, x2: float, y2: float, height: int, width: int):
    """Clips a pixel box (continuous coordinates) to [0, width] x [0, height] -> (box, changed)."""
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    return clipped, clipped != (x1, y1, x2, y2)


# ----------------------------------------------------------------------------------------------------
# Statistics shared by workers and the summary


class Stats:
    """Counters (flat keys; "images_skipped:<reason>" style for per-reason ones) and example messages."""

    def __init__(self):
        self.counts = collections.Counter()
        self.examples: Dict[str, List[str]] = {}

    def count(self, key: str, message: Optional[str] = None, n: int = 1):
        self.counts[key] += n
        if message is not None:
            kept = self.examples.setdefault(key, [])
            if len(kept) < MAX_EXAMPLES_PER_REASON:
                kept.append(message)

    def merge(self, other: "Stats"):
        self.counts.update(other.counts)
        for key, messages in other.examples.items():
            kept = self.examples.setdefault(key, [])
            kept.extend(messages[:MAX_EXAMPLES_PER_REASON - len(kept)])

    def by_reason(self, group: str) -> Dict[str, int]:
        return {k.split(":", 1)[1]: v for k, v in sorted(self.counts.items()) if k.startswith(group + ":")}


# ----------------------------------------------------------------------------------------------------
# Sharded, parallel, atomic writer


def shard_paths(output_prefix: str, num_shards: int) -> List[str]:
    return [SHARD_NAME.format(prefix=output_prefix, index=i, count=num_shards) for i in range(num_shards)]


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

    sleep_s = float(os.environ.get(SLEEP_ENV, "0") or 0)
    stats, pending, last = Stats(), 0, time.monotonic()
    for tmp_path, units in jobs:
        with tf.io.TFRecordWriter(tmp_path) as writer:
            for unit in units:
                if parent_pid is not None and os.getppid() != parent_pid:
                    sys.exit(1)  # the parent was killed: stop; its tmp files will never be renamed
                example = convert_fn(unit, stats)
                if example is not None:
                    writer.write(example)
                if sleep_s:
                    time.sleep(sleep_s)
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


def make_summary(stats: Stats, finals: List[str], num_inputs: int, seconds: float, **extra) -> Dict:
    """The summary JSON: counts written / skipped by reason / dropped by reason, and a few examples."""
    c = stats.counts
    summary = dict(extra)
    summary.update({
        "images_considered": num_inputs,
        "images_written": c["images_written"],
        "images_skipped": stats.by_reason("images_skipped"),
        "images_size_mismatch": c["images_size_mismatch"],
        "instances_written": c["instances_written"],
        "crowd_instances": c["crowd_instances"],
        "boxes_clipped": c["boxes_clipped"],
        "instances_dropped": stats.by_reason("instances_dropped"),
        "shards": finals,
        "seconds": round(seconds, 3),
        "images_per_second": round(num_inputs / max(seconds, 1e-9), 2),
        "examples": {k: v for k, v in sorted(stats.examples.items())},
    })
    return summary


# ----------------------------------------------------------------------------------------------------
# COCO


def load_coco_index(annotation_file: str) -> coco_json.CocoIndex:
    """Indexes a COCO instances JSON (coco_json.py) and checks its top level; ConversionError with a
    clear message when the file is missing, unreadable, not JSON or not an instances file."""
    if not os.path.isfile(annotation_file):
        raise ConversionError(f"annotation file not found: {annotation_file}")
    try:
        index = coco_json.index_coco_json(annotation_file)
    except coco_json.TopLevelNotObject:
        raise ConversionError(f"{annotation_file}: top level is not a JSON object") from None
    except (OSError, ValueError) as e:  # JSON errors and UnicodeDecodeError are ValueErrors
        raise ConversionError(f"cannot read annotation file {annotation_file}: {e}") from None
    for key, present in (("images", index.has_images_list), ("categories", index.has_categories_list)):
        if not present:
            raise ConversionError(f"{annotation_file}: no '{key}' list (is this a COCO instances file?)")
    if index.annotations_present and not index.annotations_is_list:
        raise ConversionError(f"{annotation_file}: 'annotations' is not a list")
    return index


def _label_map(categories: Sequence[Dict], used: set) -> List[Dict]:
    cats = []
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise ConversionError(f"malformed category entry: {c!r}")
        cats.append(c)
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise ConversionError(f"duplicate category ids in 'categories': {sorted(ids)}")

    def is_unused_parent(c):
        others_super = {o.get("supercategory") for o in cats if o is not c}
        return c["id"] not in used and c["name"] in others_super

    kept = sorted((c for c in cats if not is_unused_parent(c)), key=lambda c: c["id"])
    return [{"id": c["id"], "contiguous_id": i + 1, "name": str(c["name"])} for i, c in enumerate(kept)]


def build_label_map(categories: Sequence[Dict], annotations: Sequence[Dict]) -> List[Dict]:
    """[{"id", "contiguous_id", "name"}] sorted by dataset id; see the module docstring for the rule."""
    return _label_map(categories, {a.get("category_id") for a in annotations if isinstance(a, dict)})


def _int_key(value) -> Optional[int]:
    """value as an int64 lookup key when it is a JSON integer (or an integral float), else None."""
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is int and coco_json.INT64_MIN < value <= coco_json.INT64_MAX:
        return value
    return None


def _lookup(index: coco_json.CocoIndex, table: Dict) -> np.ndarray:
    """int64 [A]: table[image_id] of each indexed annotation (table values >= 0), -1 where absent.
    Matches ids by value, as a dict lookup on the parsed JSON would."""
    ids = index.annotation_image_ids  # [A]
    found = np.full(ids.shape, -1, np.int64)  # [A]
    pairs = [(key, value) for key, value in ((_int_key(k), v) for k, v in table.items()) if key is not None]
    if pairs and ids.size:
        keys = np.array([k for k, _ in pairs], np.int64)  # [I]
        values = np.array([v for _, v in pairs], np.int64)  # [I]
        order = np.argsort(keys)
        keys, values = keys[order], values[order]
        at = np.minimum(np.searchsorted(keys, ids), keys.size - 1)  # [A]
        hit = keys[at] == ids
        found[hit] = values[at[hit]]
    for i, image_id in index.non_int_image_ids.items():
        try:
            found[i] = table.get(image_id, -1)
        except TypeError:  # an unhashable image_id (list, object) matches no image
            found[i] = -1
    return found


@dataclasses.dataclass(frozen=True, eq=False)
class _CocoContext:
    image_dir: str
    include_masks: bool
    skip_empty: bool
    names: Dict[int, str]  # dataset category id -> name (label map)
    annotation_file: str
    offsets: np.ndarray  # int64 [A'] byte offset of each annotation, grouped by image (units index it)
    lengths: np.ndarray  # int64 [A'] its length in bytes


def _finite_floats(values) -> Optional[List[float]]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def segmentation_to_counts(segmentation, height: int, width: int, stats: Stats, where: str):
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> (int64 [m] run lengths, None) or
    (None, drop reason). The runs (rle_png.rle_counts format: column-major, 0-runs first) describe
    exactly pycocotools' annToMask of the annotation for valid input."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            coords = _finite_floats(polygon) if isinstance(polygon, (list, tuple)) else None
            if coords is not None and len(coords) >= MIN_POLYGON_COORDS and len(coords) % 2 == 0:
                polygons.append(coords)
        if not polygons:
            return None, "empty_or_broken_polygon"
        if len(polygons) < len(segmentation):
            stats.count("polygon_parts_dropped", f"{where}: {len(segmentation) - len(polygons)} part(s)",
                        n=len(segmentation) - len(polygons))
        counts = rle_png.rle_counts(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))["counts"])
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            return None, "malformed_rle"
        try:
            if [int(size[0]), int(size[1])] != [height, width]:
                return None, "rle_size_mismatch"
            if isinstance(counts, list):  # uncompressed RLE (COCO crowd regions)
                counts = np.asarray(counts)
                if counts.ndim != 1 or counts.dtype.kind not in "iu":
                    return None, "malformed_rle"
                counts = counts.astype(np.int64)
            elif isinstance(counts, (str, bytes)):
                counts = rle_png.rle_counts(counts)
            else:
                return None, "malformed_rle"
            rle_png.check_counts(counts, height, width)
        except (TypeError, ValueError, OverflowError):
            return None, "malformed_rle"
    else:
        return None, "missing_segmentation"
    return (counts, None) if counts[1::2].any() else (None, "empty_mask")


def _coco_example(ctx: _CocoContext, unit, stats: Stats) -> Optional[bytes]:
    """One image entry and its annotations' byte spans -> serialized tf.train.Example, or None (counted)."""
    image, first, last = unit
    name = image["file_name"]
    try:
        img = read_image_file(os.path.join(ctx.image_dir, name))
    except BadImage as e:
        stats.count("images_skipped:" + e.reason, str(e))
        return None
    h, w = img.height, img.width
    if (image.get("height"), image.get("width")) != (h, w):
        stats.count("images_size_mismatch",
                    f"{name}: JSON says {image.get('height')}x{image.get('width')}, file is {h}x{w}")
    anns = coco_json.read_annotations(ctx.annotation_file, ctx.offsets[first:last], ctx.lengths[first:last])
    boxes, labels, texts, crowd, areas, masks = [], [], [], [], [], []
    clipped = 0
    for ann in anns:
        where = f"{name} annotation {ann.get('id')}"
        reason = None
        category = ann.get("category_id")
        bbox = _finite_floats(ann.get("bbox")) if isinstance(ann.get("bbox"), (list, tuple)) else None
        if not isinstance(category, (int, float, str)) or category not in ctx.names:
            reason = "unknown_category"
        elif bbox is None or len(bbox) != 4:
            reason = "malformed_bbox"
        elif bbox[2] <= 0 or bbox[3] <= 0:
            reason = "degenerate_box"
        if reason is None:
            x, y, bw, bh = bbox
            (x1, y1, x2, y2), was_clipped = clip_box(x, y, x + bw, y + bh, h, w)
            if x2 <= x1 or y2 <= y1:
                reason = "box_outside_image"
        counts = None
        if reason is None and ctx.include_masks:
            counts, reason = segmentation_to_counts(ann.get("segmentation"), h, w, stats, where)
        if reason is not None:
            stats.count("instances_dropped:" + reason, f"{where}: bbox {ann.get('bbox')}")
            continue
        clipped += was_clipped
        area = _finite_floats([ann.get("area")])
        if area is None or area[0] <= 0:
            area = [float(counts[1::2].sum()) if counts is not None else (x2 - x1) * (y2 - y1)]
        boxes.append((x1 / w, y1 / h, x2 / w, y2 / h))
        labels.append(category)
        texts.append(ctx.names[category])
        crowd.append(1 if ann.get("iscrowd") else 0)
        areas.append(area[0])
        if counts is not None:
            masks.append(rle_png.encode_png_from_counts(counts, h, w))
    if ctx.skip_empty and not boxes:
        stats.count("images_skipped:no_instances", name)
        return None
    example = schema.build_example(
        encoded=img.encoded, image_format=img.image_format, height=h, width=w, filename=name,
        source_id=str(image["id"]), boxes_norm_xyxy=np.asarray(boxes, np.float64).reshape(-1, 4),
        labels=labels, texts=texts, is_crowd=crowd, areas=areas,
        png_masks=masks if ctx.include_masks else None)
    stats.count("images_written")
    stats.count("instances_written", n=len(boxes))
    stats.count("crowd_instances", n=sum(crowd))
    stats.count("boxes_clipped", n=clipped)
    return example.SerializeToString()


def convert_coco(image_dir: str, annotation_file: str, output_prefix: str, num_shards: int,
                 num_workers: int = 1, include_masks: bool = True, skip_empty: bool = False,
                 max_images: Optional[int] = None, progress: bool = True) -> Dict:
    """Converts a COCO instances JSON + image folder into sharded TFRecords; returns the summary dict.

    Writes {output_prefix}-{i:05d}-of-{n:05d}.tfrecord, {output_prefix}_label_map.json and
    {output_prefix}_summary.json (see the module docstring). Records keep the dataset's category ids;
    boxes are normalized (xmin, ymin, xmax, ymax) in the record (schema.py). Raises ConversionError for
    a missing or unreadable annotation file or bad arguments; bad images and annotations are counted.
    """
    start = time.monotonic()
    annotation_file = os.path.abspath(annotation_file)
    index = load_coco_index(annotation_file)
    if not os.path.isdir(image_dir):
        raise ConversionError(f"image directory not found: {image_dir}")
    label_map = _label_map(index.categories, index.used_category_ids)
    stats = Stats()

    images, seen = [], set()
    for entry in index.images:
        if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str) and "id" in entry):
            stats.count("images_skipped:malformed_image_entry", repr(entry)[:200])
            continue
        try:
            duplicate = entry["id"] in seen
        except TypeError:  # an unhashable id (list, object)
            stats.count("images_skipped:malformed_image_entry", repr(entry)[:200])
            continue
        if duplicate:
            stats.count("images_skipped:duplicate_image_id", f"{entry['file_name']}: id {entry['id']}")
        elif not is_safe_relative_path(entry["file_name"]):
            stats.count("images_skipped:path_outside_image_dir", entry["file_name"])
        else:
            seen.add(entry["id"])
            images.append(entry)
    if max_images is not None:
        images = images[:max(0, max_images)]

    for message in index.malformed_annotations:
        stats.count("instances_dropped:malformed_annotation", message)
    extra = index.num_malformed_annotations - len(index.malformed_annotations)
    if extra:
        stats.count("instances_dropped:malformed_annotation", n=extra)
    # Group the annotations by image without a per-image search: a stable sort by image position.
    position = _lookup(index, {image_id: i for i, image_id in enumerate(e["id"] for e in images)})  # [A]
    unknown = np.flatnonzero((position < 0) & (_lookup(index, dict.fromkeys(seen, 0)) < 0))  # images cut
    if unknown.size:  # by max_images are not an error
        shown = unknown[:MAX_EXAMPLES_PER_REASON]
        for i, ann in zip(shown, coco_json.read_annotations(annotation_file, index.annotation_offsets[shown],
                                                              index.annotation_lengths[shown])):
            stats.count("instances_dropped:unknown_image",
                        f"annotation {ann.get('id')}: image_id {ann['image_id']}")
        if unknown.size > shown.size:
            stats.count("instances_dropped:unknown_image", n=unknown.size - shown.size)
    order = np.argsort(position, kind="stable")  # [A] file order within each image
    order = order[np.searchsorted(position[order], 0):]  # drop the -1s
    bounds = np.searchsorted(position[order], np.arange(len(images) + 1))  # [images + 1]
    units = [(entry, int(bounds[i]), int(bounds[i + 1])) for i, entry in enumerate(images)]
    ctx = _CocoContext(image_dir, include_masks, skip_empty, {c["id"]: c["name"] for c in label_map},
                       annotation_file, index.annotation_offsets[order], index.annotation_lengths[order])
    num_images_in_file = len(index.images)
    del index, position, order  # only the per-image spans are needed from here on
    finals, worker_stats = write_sharded(units, functools.partial(_coco_example, ctx), output_prefix,
                                         num_shards, num_workers, progress)
    stats.merge(worker_stats)
    label_map_path = output_prefix + LABEL_MAP_SUFFIX
    write_json_atomic(label_map_path, label_map)
    summary = make_summary(
        stats, finals, len(units), time.monotonic() - start,
        annotation_file=annotation_file, image_dir=os.path.abspath(image_dir),
        include_masks=include_masks, skip_empty=skip_empty, num_workers=num_workers,
        label_map=label_map_path, num_classes=len(label_map),
        images_in_annotation_file=num_images_in_file)
    summary["polygon_parts_dropped"] = stats.counts["polygon_parts_dropped"]
    write_json_atomic(output_prefix + SUMMARY_SUFFIX, summary)
    return summary
