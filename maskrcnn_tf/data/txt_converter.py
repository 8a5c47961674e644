"""The MindSpore original's text list -> sharded TFRecords with boxes only (no mask key).

Format, one image per line, fields separated by whitespace:
    relative/path.jpg x1,y1,x2,y2,cls[,iscrowd] x1,y1,x2,y2,cls ...
The path may contain spaces: the trailing tokens that look like boxes (a comma, and a number before the
first comma) are boxes, the text before them is the path. So a path's last space-separated part must not
itself look like a box ("2019,photo.jpg" would be read as one).
Coordinates are pixels of the original image, continuous (x2 - x1 = width, as the original computes
w = x2 - x1). `cls` is an integer class id; the optional 6th field (iscrowd 0/1) is the one later
MindSpore versions add. A line with only a path is an image without instances.

Decisions:
- Class ids are written to the records unchanged, as the dataset's category ids (like COCO's ids), and
  the label map sorts them into contiguous ids 1..K, so 0-based and 1-based lists both work. With
  --class_names, line i (0-based, blank lines ignored) of the names file names class id i, as the
  original's config list names its txt class i; that list starts with "background", so a names file
  whose line 0 is "background" makes id 0 a non-class (instances with it are dropped as
  unknown_category). With a names file, ids it does not name are dropped as unknown_category; without
  one, the label map is the set of ids used, named "class_<id>".
- A line is all or nothing: a path that escapes --image_dir (absolute, drive letter or a ".."
  component), an unparsable box token, a non-integer class or fewer than 4 coordinates skips the line,
  counted under lines_skipped with its line number in the summary's examples. Symlinks inside
  --image_dir are followed (the check is on the text, not the resolved path).
- The same path on several lines is one image: the boxes of the later lines are merged into the first
  line's record (source_id = the first line's number), counted under "lines_merged" with a warning. Two
  records of one image would make evaluation count its instances twice.
- Per instance, as the COCO converter: degenerate boxes dropped, boxes clipped to the image, boxes
  entirely outside dropped; area = clipped box area. image/source_id is the 1-based line number (the
  text format has no image ids; evaluation needs an integer).
- A skipped image takes its boxes with it: counted under instances_lost_with_skipped_images by the
  image's reason. No image written is a ConversionError naming the likely cause.
- Image files (image_files.py), sharding, workers and atomic renames (sharded_writer.py) and the summary
  (conversion_report.py) are shared with the COCO converter.
- Next to the label map it writes `{output_prefix}_annotations.json`: the records' ground truth in COCO
  format, boxes only (records_coco_json.py, read back from the shards so ids and file names are the
  records'), the --val_json that eval.py needs for these records. The summary names it
  ("annotations_json").
"""

import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from maskrcnn_tf.data import image_files, records_coco_json, schema
from maskrcnn_tf.data.conversion_report import ConversionError, Stats, check_images_written, make_summary
from maskrcnn_tf.data.sharded_writer import LABEL_MAP_SUFFIX, SUMMARY_SUFFIX, write_json_atomic, write_sharded

ANNOTATIONS_SUFFIX = "_annotations.json"  # the COCO-format ground truth (boxes only), next to the label map
BACKGROUND_NAME = "background"
BOX_FIELDS = (5, 6)  # x1,y1,x2,y2,cls and optionally iscrowd
_TOKEN = re.compile(r"\S+")


def _looks_like_box(token: str) -> bool:
    """A comma and a number before it: a box (maybe malformed), not part of a path."""
    head = token.split(",", 1)[0]
    try:
        float(head)
    except ValueError:
        return False
    return "," in token


def split_line(line: str) -> Tuple[str, List[str]]:
    """A list line -> (path, box tokens): the trailing tokens that look like boxes, and the text before
    them (spaces inside kept) as the path."""
    tokens = list(_TOKEN.finditer(line))
    if not tokens:
        return "", []
    first_box = len(tokens)
    while first_box > 1 and _looks_like_box(tokens[first_box - 1].group()):
        first_box -= 1
    end = tokens[first_box - 1].end()
    return line[tokens[0].start():end], [t.group() for t in tokens[first_box:]]


def _parse_box(token: str) -> Tuple[float, float, float, float, int, int]:
    fields = token.split(",")
    if len(fields) not in BOX_FIELDS:
        raise ValueError(f"box {token!r} has {len(fields)} fields, expected x1,y1,x2,y2,cls[,iscrowd]")
    coords = [float(v) for v in fields[:4]]
    if not all(math.isfinite(v) for v in coords):
        raise ValueError(f"box {token!r} has a non-finite coordinate")
    crowd = int(fields[5]) if len(fields) == 6 else 0
    if crowd not in (0, 1):
        raise ValueError(f"box {token!r}: iscrowd must be 0 or 1")
    return coords[0], coords[1], coords[2], coords[3], int(fields[4]), crowd


def parse_txt(annotation_file: str, stats: Stats) -> List[Tuple[int, str, list]]:
    """-> [(line number, relative path, [(x1, y1, x2, y2, cls, iscrowd), ...])], one entry per path (later
    lines of a path merged into its first); bad lines are counted."""
    if not os.path.isfile(annotation_file):
        raise ConversionError(f"annotation file not found: {annotation_file}")
    try:
        with open(annotation_file, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise ConversionError(f"cannot read annotation file {annotation_file}: {e}") from None
    entries, first_line = [], {}
    for number, raw in enumerate(raw_lines, start=1):
        try:
            path, tokens = split_line(raw.decode("utf-8"))
        except UnicodeDecodeError:
            stats.count("lines_skipped:malformed_line", f"line {number}: not UTF-8")
            continue
        if not path:
            continue
        if not image_files.is_safe_relative_path(path):
            stats.count("lines_skipped:path_outside_image_dir", f"line {number}: {path}")
            continue
        try:
            boxes = [_parse_box(t) for t in tokens]
        except ValueError as e:
            stats.count("lines_skipped:malformed_line", f"line {number}: {e}")
            continue
        key = os.path.normpath(path)
        if key in first_line:
            index = first_line[key]
            entries[index][2].extend(boxes)
            stats.count("lines_merged", f"line {number}: {path} already on line {entries[index][0]}; "
                                        f"its {len(boxes)} box(es) merged there")
            continue
        first_line[key] = len(entries)
        entries.append((number, path, boxes))
    return entries


def read_class_names(class_names_file: str) -> Dict[int, str]:
    """names file -> {class id: name}; line i (0-based, blank lines ignored) names id i."""
    if not os.path.isfile(class_names_file):
        raise ConversionError(f"class names file not found: {class_names_file}")
    with open(class_names_file, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    return {i: n for i, n in enumerate(names) if not (i == 0 and n.lower() == BACKGROUND_NAME)}


@dataclasses.dataclass(frozen=True)
class _TxtContext:
    image_dir: str
    skip_empty: bool
    names: Dict[int, str]


def _txt_example(ctx: _TxtContext, unit, stats: Stats) -> Optional[bytes]:
    number, rel_path, raw_boxes = unit
    try:
        img = image_files.read_image_file(os.path.join(ctx.image_dir, rel_path))
    except image_files.BadImage as e:
        stats.count("images_skipped:" + e.reason, f"line {number}: {e}")
        stats.count("instances_lost_with_skipped_images:" + e.reason, n=len(raw_boxes))
        return None
    h, w = img.height, img.width
    boxes, labels, crowd, areas, clipped = [], [], [], [], 0
    for x1, y1, x2, y2, cls, is_crowd in raw_boxes:
        where = f"line {number}: box {x1},{y1},{x2},{y2},{cls}"
        reason = None
        if cls not in ctx.names:
            reason = "unknown_category"
        elif x2 <= x1 or y2 <= y1:
            reason = "degenerate_box"
        else:
            (x1, y1, x2, y2), was_clipped = image_files.clip_box(x1, y1, x2, y2, h, w)
            if x2 <= x1 or y2 <= y1:
                reason = "box_outside_image"
        if reason is not None:
            stats.count("instances_dropped:" + reason, where)
            continue
        clipped += was_clipped
        boxes.append((x1 / w, y1 / h, x2 / w, y2 / h))
        labels.append(cls)
        crowd.append(is_crowd)
        areas.append((x2 - x1) * (y2 - y1))
    if ctx.skip_empty and not boxes:
        stats.count("images_skipped:no_instances", f"line {number}: {rel_path}")
        return None
    example = schema.build_example(
        encoded=img.encoded, image_format=img.image_format, height=h, width=w, filename=rel_path,
        source_id=str(number), boxes_norm_xyxy=np.asarray(boxes, np.float64).reshape(-1, 4),
        labels=labels, texts=[ctx.names[c] for c in labels], is_crowd=crowd, areas=areas, png_masks=None)
    stats.count("images_written")
    stats.count("instances_written", n=len(boxes))
    stats.count("crowd_instances", n=sum(crowd))
    stats.count("boxes_clipped", n=clipped)
    return example.SerializeToString()


def convert_txt(image_dir: str, annotation_file: str, output_prefix: str, num_shards: int = 1,
                class_names_file: Optional[str] = None, num_workers: int = 1, skip_empty: bool = False,
                progress: bool = True) -> Dict:
    """Converts a MindSpore-style text list into sharded box-only TFRecords; returns the summary dict.

    Writes the same three kinds of files as coco_converter.convert_coco (shards, label map, summary) and
    `{output_prefix}_annotations.json`, the COCO-format ground truth of the records (boxes only; image
    ids = the records' source ids, file names as in the records), for eval.py. Records carry boxes
    (normalized xmin, ymin, xmax, ymax), class ids as given in the text, is_crowd, areas, and no
    image/object/mask key. Raises ConversionError for a missing list, image dir or names
    file, and when no image is written; bad lines, images and boxes are counted in the summary.
    """
    start = time.monotonic()
    stats = Stats()
    entries = parse_txt(annotation_file, stats)
    if not os.path.isdir(image_dir):
        raise ConversionError(f"image directory not found: {image_dir}")
    if class_names_file:
        names = read_class_names(class_names_file)
    else:
        names = {c: f"class_{c}" for c in sorted({b[4] for _, _, boxes in entries for b in boxes})}
    label_map = [{"id": c, "contiguous_id": i + 1, "name": names[c]} for i, c in enumerate(sorted(names))]
    ctx = _TxtContext(image_dir, skip_empty, names)
    finals, worker_stats = write_sharded(
        entries, functools.partial(_txt_example, ctx), output_prefix, num_shards, num_workers, progress)
    stats.merge(worker_stats)
    label_map_path = output_prefix + LABEL_MAP_SUFFIX
    annotations_path = output_prefix + ANNOTATIONS_SUFFIX
    summary_path = output_prefix + SUMMARY_SUFFIX
    summary = make_summary(
        stats, finals, len(entries), time.monotonic() - start,
        annotation_file=os.path.abspath(annotation_file), image_dir=os.path.abspath(image_dir),
        include_masks=False, skip_empty=skip_empty, num_workers=num_workers, label_map=label_map_path,
        annotations_json=annotations_path, num_classes=len(label_map),
        lines_skipped=stats.by_reason("lines_skipped"), lines_merged=stats.counts["lines_merged"])
    if summary["images_written"] == 0:  # leave no empty shard that a file pattern would pick up
        for path in finals:
            os.remove(path)
        summary["shards"] = []
        summary["annotations_json"] = None
    else:
        write_json_atomic(annotations_path, records_coco_json.coco_json_from_records(
            finals, label_map, description=f"boxes of {os.path.abspath(annotation_file)} (txt_to_tfrecord)"))
        write_json_atomic(label_map_path, label_map)
    write_json_atomic(summary_path, summary)
    if summary["lines_merged"]:
        print(f"WARNING: {summary['lines_merged']} line(s) repeat an earlier line's image; their boxes were "
              f"merged into it ({summary['examples']['lines_merged'][0]})", file=sys.stderr, flush=True)
    check_images_written(summary, os.path.abspath(image_dir), [e[1] for e in entries[:3]], summary_path)
    return summary
