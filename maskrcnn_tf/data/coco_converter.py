"""COCO instance annotations -> sharded TFRecords (schema.py), one tf.train.Example per image.

Outputs of `convert_coco(..., output_prefix=OUT/train, num_shards=n)`:
  OUT/train-00000-of-0000n.tfrecord ...   (sharded_writer.py: parallel, atomic)
  OUT/train_label_map.json                [{"id": dataset id, "contiguous_id": 1..K, "name"}], sorted by id
                                          (coco_categories.py: which categories it holds)
  OUT/train_summary.json                  counts of everything written, skipped, dropped, clipped, lost
                                          (conversion_report.py)
Image files are read and checked by image_files.py, masks made by coco_segmentation.py.

Decisions:
- Every annotation of the file is accounted for in the summary: instances_in_annotation_file =
  instances_written + sum(instances_dropped) + sum(instances_lost_with_skipped_images) +
  instances_beyond_max_images.
- Bad annotations are dropped per instance, each counted under the first reason that applies:
  unknown_image, malformed_annotation, unknown_category, malformed_bbox, degenerate_box (width or height
  <= 0), box_outside_image (nothing left after clipping), and with masks the reasons of
  coco_segmentation.py. Boxes partly outside the image are clipped to it ("boxes_clipped"). Crowd
  instances (uncompressed RLE in COCO) are kept with is_crowd = 1.
- A skipped image (missing, broken, duplicate id, path outside --image_dir) takes its annotations with it:
  they are counted under instances_lost_with_skipped_images by the image's reason.
- A JSON size that disagrees with the file header is counted ("images_size_mismatch"); the true size is
  used and boxes are clipped to it.
- The box is the JSON's bbox (clipped), not the mask's extent, and "area" is the JSON's area (mask or
  box area when missing), as Model Garden does.
- The annotation file is streamed once into a compact index (coco_json.py: per annotation its image
  id and where its text is in the file); each worker re-reads the annotations of the image it writes.
  Memory stays flat as the dataset grows (no json.load of the whole file), and grouping annotations by
  image is one stable sort, not a lookup per image.
- Images: the first --max_images in the JSON's "images" order.
- No image written is an error (ConversionError naming the likely cause, conversion_report.py); the
  empty shards are removed and only the summary is left for diagnosis. A file without an "annotations"
  key (an image-info file) is converted with a warning: every record then has no instance.
"""

import dataclasses
import functools
import os
import sys
import time
from typing import Dict, Optional

import numpy as np

from maskrcnn_tf.data import coco_categories, coco_json, coco_segmentation, image_files, rle_png, schema
from maskrcnn_tf.data.conversion_report import (MAX_EXAMPLES_PER_REASON, ConversionError, Stats,
                                                check_images_written, make_summary)
from maskrcnn_tf.data.sharded_writer import LABEL_MAP_SUFFIX, SUMMARY_SUFFIX, write_json_atomic, write_sharded


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


def _coco_example(ctx: _CocoContext, unit, stats: Stats) -> Optional[bytes]:
    """One image entry and its annotations' byte spans -> serialized tf.train.Example, or None (counted)."""
    image, first, last = unit
    name = image["file_name"]
    try:
        img = image_files.read_image_file(os.path.join(ctx.image_dir, name))
    except image_files.BadImage as e:
        stats.count("images_skipped:" + e.reason, str(e))
        stats.count("instances_lost_with_skipped_images:" + e.reason, n=last - first)
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
        bbox = coco_segmentation.finite_floats(ann.get("bbox")) if isinstance(ann.get("bbox"), (list, tuple)) else None
        if not isinstance(category, (int, float, str)) or category not in ctx.names:
            reason = "unknown_category"
        elif bbox is None or len(bbox) != 4:
            reason = "malformed_bbox"
        elif bbox[2] <= 0 or bbox[3] <= 0:
            reason = "degenerate_box"
        if reason is None:
            x, y, bw, bh = bbox
            (x1, y1, x2, y2), was_clipped = image_files.clip_box(x, y, x + bw, y + bh, h, w)
            if x2 <= x1 or y2 <= y1:
                reason = "box_outside_image"
        counts = None
        if reason is None and ctx.include_masks:
            counts, reason = coco_segmentation.segmentation_to_counts(ann.get("segmentation"), h, w, stats, where)
        if reason is not None:
            stats.count("instances_dropped:" + reason, f"{where}: bbox {ann.get('bbox')}")
            continue
        clipped += was_clipped
        area = coco_segmentation.finite_floats([ann.get("area")])
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
    a missing or unreadable annotation file, bad arguments or no image written; bad images and
    annotations are counted.
    """
    start = time.monotonic()
    annotation_file = os.path.abspath(annotation_file)
    index = load_coco_index(annotation_file)
    if not os.path.isdir(image_dir):
        raise ConversionError(f"image directory not found: {image_dir}")
    label_map, categories_left_out = coco_categories.label_map_and_left_out(index.categories,
                                                                            index.used_category_ids)
    stats = Stats()
    warnings = []
    if not index.annotations_present:
        warnings.append(f"{annotation_file} has no 'annotations' key (an image-info file?): every image is "
                        "written without instances")

    images, seen, skipped_ids = [], set(), {}
    for entry in index.images:
        if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str) and "id" in entry):
            stats.count("images_skipped:malformed_image_entry", repr(entry)[:200])
            continue
        try:
            duplicate = entry["id"] in seen
        except TypeError:  # an unhashable id (list, object)
            stats.count("images_skipped:malformed_image_entry", repr(entry)[:200])
            continue
        if duplicate:  # its annotations belong to the first entry of that id
            stats.count("images_skipped:duplicate_image_id", f"{entry['file_name']}: id {entry['id']}")
        elif not image_files.is_safe_relative_path(entry["file_name"]):
            stats.count("images_skipped:path_outside_image_dir", entry["file_name"])
            skipped_ids.setdefault(entry["id"], "path_outside_image_dir")
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
    outside = position < 0
    in_seen = _lookup(index, dict.fromkeys(seen, 0)) >= 0  # [A] images cut by max_images are not an error
    reasons = sorted(set(skipped_ids.values()))
    skipped = _lookup(index, {k: reasons.index(v) for k, v in skipped_ids.items()})  # [A] reason index or -1
    for r, reason in enumerate(reasons):
        lost = int(np.count_nonzero(outside & ~in_seen & (skipped == r)))
        if lost:
            stats.count("instances_lost_with_skipped_images:" + reason, n=lost)
    unknown = np.flatnonzero(outside & ~in_seen & (skipped < 0))
    if unknown.size:
        shown = unknown[:MAX_EXAMPLES_PER_REASON]
        for i, ann in zip(shown, coco_json.read_annotations(annotation_file, index.annotation_offsets[shown],
                                                              index.annotation_lengths[shown])):
            stats.count("instances_dropped:unknown_image",
                        f"annotation {ann.get('id')}: image_id {ann['image_id']}")
        if unknown.size > shown.size:
            stats.count("instances_dropped:unknown_image", n=unknown.size - shown.size)
    beyond_max_images = int(np.count_nonzero(outside & in_seen))
    order = np.argsort(position, kind="stable")  # [A] file order within each image
    order = order[np.searchsorted(position[order], 0):]  # drop the -1s
    bounds = np.searchsorted(position[order], np.arange(len(images) + 1))  # [images + 1]
    units = [(entry, int(bounds[i]), int(bounds[i + 1])) for i, entry in enumerate(images)]
    ctx = _CocoContext(image_dir, include_masks, skip_empty, {c["id"]: c["name"] for c in label_map},
                       annotation_file, index.annotation_offsets[order], index.annotation_lengths[order])
    num_images_in_file = len(index.images)
    num_annotations = int(index.annotation_image_ids.size) + index.num_malformed_annotations
    del index, position, order  # only the per-image spans are needed from here on
    finals, worker_stats = write_sharded(units, functools.partial(_coco_example, ctx), output_prefix,
                                         num_shards, num_workers, progress)
    stats.merge(worker_stats)
    summary_path = output_prefix + SUMMARY_SUFFIX
    label_map_path = output_prefix + LABEL_MAP_SUFFIX
    summary = make_summary(
        stats, finals, len(units), time.monotonic() - start,
        annotation_file=annotation_file, image_dir=os.path.abspath(image_dir),
        include_masks=include_masks, skip_empty=skip_empty, num_workers=num_workers,
        label_map=label_map_path, num_classes=len(label_map), categories_left_out=categories_left_out,
        images_in_annotation_file=num_images_in_file, instances_in_annotation_file=num_annotations,
        instances_beyond_max_images=beyond_max_images, warnings=warnings)
    summary["polygon_parts_dropped"] = stats.counts["polygon_parts_dropped"]
    if summary["images_written"] == 0:  # leave no empty shard that a file pattern would pick up
        for path in finals:
            os.remove(path)
        summary["shards"] = []
        write_json_atomic(summary_path, summary)
    else:
        write_json_atomic(label_map_path, label_map)
        write_json_atomic(summary_path, summary)
    for line in warnings:
        print(f"WARNING: {line}", file=sys.stderr, flush=True)
    check_images_written(summary, os.path.abspath(image_dir), [u[0]["file_name"] for u in units[:3]],
                         summary_path)
    return summary
