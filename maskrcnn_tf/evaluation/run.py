"""The COCO evaluation loop: TFRecords -> model inference -> COCO results -> pycocotools tables.

`evaluate_model(model, cfg, eval_file_pattern, val_json, output_dir=None, max_images=None)` is used by
eval.py, by train.py (--eval_every_epochs) and by the demo.

Decisions:
- Inputs are checked before any inference, so a wrong argument fails in seconds with a ValueError that
  names the file (not an assertion deep inside pycocotools): a missing or unreadable val JSON, a pattern
  that matches no file or only empty files, a non-integer image/source_id, and record image ids that the
  val JSON does not have (a few are named). The ids come from a scan that parses only image/source_id
  (it still reads the files once: a few seconds for COCO val2017). Every record is checked, also with
  max_images. A val JSON with more images than the records is fine: only the images seen count.
- The model runs inside one tf.function over whole batches (static shapes from the pipeline, so it is
  traced once per call of evaluate_model); only the conversion to COCO results (mask pasting at the
  original size, RLE) is eager NumPy, per image, outside the graph.
- Every valid image of a batch is passed to the evaluator, also when it has no detection, so a missed
  image counts as a miss. The padding images of the last batch (is_valid 0) are skipped.
- `max_images` keeps the first max_images images in the pipeline's (deterministic) evaluation order
  and stops reading after them.
- A model without a single detection is not an error: the metrics are all 0 (COCOEvaluator cannot run
  COCOeval without detections, so no table), and the summary line below prints them.
- After the pycocotools tables one summary line per IoU type gives the 12 stats by name, so logs stay
  greppable; `metrics.json` holds those numbers plus the run's context, `detections.json` the COCO
  results (the format of the COCO detection challenge).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import run_dir
from maskrcnn_tf.data import pipeline, schema
from maskrcnn_tf.evaluation.coco_evaluator import STAT_NAMES, COCOEvaluator
from maskrcnn_tf.evaluation.coco_results import detections_to_coco_results

DETECTIONS_FILE = "detections.json"
METRICS_FILE = "metrics.json"
# Seconds between two progress lines (plus one line at the end).
PROGRESS_INTERVAL_SECONDS = 10.0
# Records parsed at once when scanning the image ids (only the source_id feature is parsed).
_ID_SCAN_BATCH = 256
# How many offending image ids an error message lists.
_IDS_SHOWN = 5


def _load_evaluator(val_json: str, include_mask: bool) -> COCOEvaluator:
    """COCOEvaluator over val_json; ValueError naming the file when it is missing or not COCO JSON."""
    if not val_json or not tf.io.gfile.exists(val_json) or tf.io.gfile.isdir(val_json):
        raise ValueError(f"val json {val_json!r} not found (the COCO instances JSON of the evaluated "
                         "images, e.g. annotations/instances_val2017.json)")
    # pycocotools opens local files only: a gs://... JSON is read through a local temporary copy.
    local_dir = tempfile.mkdtemp(prefix="maskrcnn_tf_val_json_") if "://" in val_json else None
    try:
        local = val_json
        if local_dir:
            local = os.path.join(local_dir, os.path.basename(val_json))
            tf.io.gfile.copy(val_json, local)
        return COCOEvaluator(local, include_mask=include_mask)  # loads the whole JSON into memory
    except (ValueError, KeyError, TypeError, AssertionError) as e:  # json errors are ValueErrors
        raise ValueError(f"val json {val_json}: not a COCO instances file ({type(e).__name__}: {e})") from e
    finally:
        if local_dir:
            shutil.rmtree(local_dir, ignore_errors=True)


def _record_image_ids(eval_file_pattern) -> np.ndarray:
    """int64 [num_records] image/source_id of every record (only that feature is parsed).

    Raises ValueError when no file matches, the files hold no record, or a source_id is not an integer.
    """
    pipeline.count_records(eval_file_pattern)  # ValueError naming the pattern when nothing matches
    patterns = [eval_file_pattern] if isinstance(eval_file_pattern, str) else list(eval_file_pattern)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    features = {schema.SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value="")}
    dataset = (tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
               .batch(_ID_SCAN_BATCH)
               .map(lambda serialized: tf.io.parse_example(serialized, features)[schema.SOURCE_ID]))
    ids = [i.decode() for chunk in dataset.as_numpy_iterator() for i in chunk]
    if not ids:
        raise ValueError(f"eval data: the files matching {eval_file_pattern!r} hold no records")
    bad = [i for i in ids if not i.lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"eval data: image/source_id must be the integer COCO image id; got {bad[:3]} in "
                         f"{eval_file_pattern!r}")
    return np.array([int(i) for i in ids], np.int64)


def _check_image_ids(record_ids: np.ndarray, evaluator: COCOEvaluator, val_json: str, eval_file_pattern):
    """ValueError naming a few record image ids that val_json does not have."""
    unknown = sorted(set(record_ids.tolist()) - set(evaluator.coco_gt.getImgIds()))
    if unknown:
        shown = ", ".join(str(i) for i in unknown[:_IDS_SHOWN])
        raise ValueError(f"val json {val_json} does not match the records {eval_file_pattern!r}: image ids not "
                         f"in the annotation file: {shown}{', ...' if len(unknown) > _IDS_SHOWN else ''} "
                         f"({len(unknown)} of {len(record_ids)} records; is this the right annotation file?)")


def _rate(num_images, start, warm_images, warm_start, now) -> float:
    """Images/s after the first (tracing) batch, or overall while there is only that batch."""
    if warm_start is not None and num_images > warm_images and now > warm_start:
        return (num_images - warm_images) / (now - warm_start)
    return num_images / max(now - start, 1e-9)


def format_metrics(metrics: Dict[str, float]) -> str:
    """One line per IoU type: 'bbox: AP 0.3712 | AP50 0.5890 | ...' (the keys of COCOEvaluator)."""
    lines = []
    for iou_type in ("bbox", "segm"):
        if f"{iou_type}/AP" in metrics:
            stats = " | ".join(f"{name} {metrics[f'{iou_type}/{name}']:.4f}" for name in STAT_NAMES)
            lines.append(f"{iou_type}: {stats}")
    return "\n".join(lines)


def evaluate_model(model, cfg: config_lib.Config, eval_file_pattern, val_json: str,
                   output_dir: Optional[str] = None, max_images: Optional[int] = None) -> Dict[str, float]:
    """Runs the model over eval records and computes the COCO metrics with pycocotools.

    Prints pycocotools' standard 12-line tables (bbox, then segm when cfg.model.include_mask), progress
    lines with images/s, and a summary line per IoU type.

    Args:
      model: a built MaskRCNN; `model(inputs, training=False)` gives the inference dict of model.py
        (boxes [y1, x1, y2, x2] float32 pixels of the padded input, contiguous classes 1..K).
      cfg: the run's Config (model.image_size, pixel statistics, data.eval_batch_size,
        data.category_ids for mapping classes back to the val JSON's category ids).
      eval_file_pattern: glob (or list of globs) of TFRecords written by data_prep; image/source_id must
        be the val JSON's image ids.
      val_json: COCO instances JSON with the ground truth of (at least) those images.
      output_dir: when given (created if needed), `detections.json` and `metrics.json` are written there.
      max_images: evaluate only the first max_images records (None = all).
    Returns:
      {"bbox/AP": float, ..., "bbox/ARl", ["segm/AP", ..., "segm/ARl"]}: the 12 COCOeval stats per IoU
      type (pycocotools' -1 where an area range has no ground truth; all 0 without detections).
    Raises:
      ValueError: val_json missing or not COCO, no records match eval_file_pattern, record image ids
        or detected categories that val_json does not have.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    evaluator = _load_evaluator(val_json, cfg.model.include_mask)
    record_ids = _record_image_ids(eval_file_pattern)
    _check_image_ids(record_ids, evaluator, val_json, eval_file_pattern)
    total = len(record_ids) if max_images is None else min(len(record_ids), max_images)
    dataset = pipeline.build_dataset(eval_file_pattern, cfg, training=False)
    # Only the last batch is padded, so this many batches hold the first `total` records.
    dataset = dataset.take(-(-total // cfg.data.eval_batch_size))
    category_ids = cfg.data.category_ids

    @tf.function
    def infer(images, image_info):
        return model({"images": images, "image_info": image_info}, training=False)

    results, num_images = [], 0
    start = last_report = time.monotonic()
    # The first batch also traces the model (seconds to minutes); the rate counts from its end.
    warm_start, warm_images = None, 0
    for batch in dataset:
        outputs = {key: value.numpy() for key, value in infer(batch["images"], batch["image_info"]).items()}
        source_id = batch["source_id"].numpy()
        is_valid = batch["is_valid"].numpy().astype(bool)
        # Keep only the first `total` images (max_images).
        is_valid &= np.cumsum(is_valid) <= total - num_images
        batch_results = detections_to_coco_results(outputs, batch["image_info"].numpy(), source_id, is_valid,
                                                   category_ids)
        try:
            evaluator.update(batch_results, image_ids=source_id[is_valid])
        except ValueError as e:
            raise ValueError(f"val json {val_json} does not match the records {eval_file_pattern!r}: {e}") from e
        results.extend(batch_results)
        num_images += int(is_valid.sum())
        now = time.monotonic()
        if warm_start is None:
            warm_start, warm_images = now, num_images
        if now - last_report >= PROGRESS_INTERVAL_SECONDS or num_images >= total:
            last_report = now
            print(f"eval: {num_images}/{total} images, {len(results)} detections, "
                  f"{_rate(num_images, start, warm_images, warm_start, now):.2f} images/s", flush=True)
    seconds = time.monotonic() - start

    metrics = evaluator.evaluate()
    print(format_metrics(metrics), flush=True)
    if output_dir:
        tf.io.gfile.makedirs(output_dir)  # gfile: output_dir may be gs://... (a model_dir's eval/)
        run_dir.write_text(os.path.join(output_dir, DETECTIONS_FILE), json.dumps(results))
        summary = {"metrics": metrics, "num_images": num_images, "num_detections": len(results),
                   "images_per_second": _rate(num_images, start, warm_images, warm_start, start + seconds),
                   "eval_file_pattern": eval_file_pattern,
                   "val_json": val_json if "://" in val_json else os.path.abspath(val_json)}
        run_dir.write_text(os.path.join(output_dir, METRICS_FILE), json.dumps(summary, indent=1))
        print(f"eval: wrote {DETECTIONS_FILE} and {METRICS_FILE} into {output_dir}", flush=True)
    return metrics
