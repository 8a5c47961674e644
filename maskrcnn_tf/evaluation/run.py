"""The COCO evaluation loop: TFRecords -> model inference -> COCO results -> pycocotools tables.

`evaluate_model(model, cfg, eval_file_pattern, val_json, output_dir=None, max_images=None,
match_by="id_and_file_name")` is used by eval.py, by train.py (--eval_every_epochs) and by the demo.

Decisions:
- Inputs are checked before any inference (`check_inputs`; eval.py calls it before it builds the model),
  so a wrong argument fails in seconds with a ValueError that names the file (not an assertion deep
  inside pycocotools): a missing or unreadable val JSON, a pattern that matches no file or only empty
  files, a non-integer image/source_id, and records that are not the JSON's images. Records are matched
  to the JSON's images by id AND file name, or by file name alone (`match_by`; image_matching.py has the
  rules and the one-line messages). The ids and names come from a scan that parses only image/source_id
  and image/filename (it still reads the files once: a few seconds for COCO val2017). Every record is
  checked, also with max_images. A val JSON with more images than the records is fine: only the images
  seen count. Matched by file name, detections carry the JSON's image ids.
- Box-only ground truth (a TXT conversion's JSON, or any JSON where an annotation of the evaluated images
  has no "segmentation" or an empty one, as Roboflow's box exports write): only bbox is evaluated,
  whatever the model, with one line saying so, and the model's masks are not pasted (detections.json
  has boxes only). pycocotools would otherwise fail in annToRLE after all the inference. A model
  without a mask head is evaluated on bbox as before.
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
- Each pycocotools table is followed by a per-category AP@[.5:.95] table (COCOEvaluator, detectron2's
  layout); metrics.json holds it as "per_category": {"bbox": {name: AP}, "segm": {...}}, with null for a
  category without ground truth in the evaluated images (printed "n/a (no ground truth)"). The "metrics"
  dict and the returned one keep only the 12 stats per IoU type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf
from pycocotools.coco import COCO

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import run_dir
from maskrcnn_tf.data import pipeline
from maskrcnn_tf.evaluation import image_matching
from maskrcnn_tf.evaluation.coco_evaluator import STAT_NAMES, COCOEvaluator
from maskrcnn_tf.evaluation.coco_results import detections_to_coco_results

DETECTIONS_FILE = "detections.json"
METRICS_FILE = "metrics.json"
# Seconds between two progress lines (plus one line at the end).
PROGRESS_INTERVAL_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """What check_inputs found: the loaded ground truth and which JSON image each record is.

    Attributes:
      eval_file_pattern, val_json: as given.
      coco_gt: the val JSON loaded by pycocotools.
      match: record image id -> JSON image id (image_matching.ImageMatch).
      num_records: records matching eval_file_pattern.
      gt_has_masks: every annotation of the records' images has a non-empty "segmentation" (segm can run).
      notes: one-line remarks printed before inference (unchecked names, renumbered ids, box-only gt).
    """
    eval_file_pattern: object
    val_json: str
    coco_gt: COCO
    match: image_matching.ImageMatch
    num_records: int
    gt_has_masks: bool
    notes: Tuple[str, ...]


def _load_coco(val_json: str) -> COCO:
    """pycocotools' COCO of val_json; ValueError naming the file when it is missing or not COCO JSON."""
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
        coco_gt = COCO(local)  # loads the whole JSON into memory
        if not isinstance(coco_gt.dataset.get("images"), list):
            raise ValueError("it has no 'images' list")
        return coco_gt
    except (ValueError, KeyError, TypeError, AssertionError) as e:  # json errors are ValueErrors
        raise ValueError(f"val json {val_json}: not a COCO instances file ({type(e).__name__}: {e})") from e
    finally:
        if local_dir:
            shutil.rmtree(local_dir, ignore_errors=True)


def _mask_note(coco_gt: COCO, json_ids) -> Tuple[bool, Optional[str]]:
    """(every annotation of these images has a mask, the one-line note when not).

    A mask is a non-empty "segmentation": box-only exports (Roboflow's object-detection format) write
    "segmentation": [], on which pycocotools' segm evaluation fails like on a missing key."""
    annotations = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(json_ids)))
    with_masks = sum(bool(a.get("segmentation")) for a in annotations)
    if with_masks == len(annotations):
        return True, None
    if with_masks == 0:
        return False, ("the val JSON has no masks (no annotation of these images has a non-empty "
                       "'segmentation'): evaluating bbox only")
    return False, (f"{len(annotations) - with_masks} of {len(annotations)} annotations of these images in the "
                   "val JSON have no (or an empty) 'segmentation': evaluating bbox only")


def check_inputs(eval_file_pattern, val_json: str,
                 match_by: str = image_matching.ID_AND_FILE_NAME) -> EvalInputs:
    """Loads val_json and matches the records to its images, before any model is built or run.

    Raises:
      ValueError (one line): val_json missing or not COCO; no records match eval_file_pattern; the
        records are not the JSON's images (image_matching.match_images says which and how many).
    """
    coco_gt = _load_coco(val_json)
    record_ids, record_names = image_matching.read_record_names(eval_file_pattern)
    try:
        match = image_matching.match_images(record_ids, record_names, coco_gt.dataset["images"], match_by)
    except (ValueError, KeyError, TypeError) as e:  # KeyError/TypeError: a JSON image without a usable id
        detail = str(e) if isinstance(e, ValueError) else f"a JSON image has no usable id ({type(e).__name__}: {e})"
        raise ValueError(f"val json {val_json} does not match the records {eval_file_pattern!r}: {detail}") from None
    gt_has_masks, mask_note = _mask_note(coco_gt, match.json_ids)
    return EvalInputs(eval_file_pattern, val_json, coco_gt, match, len(record_ids), gt_has_masks,
                      match.notes + ((mask_note,) if mask_note else ()))


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
                   output_dir: Optional[str] = None, max_images: Optional[int] = None,
                   match_by: str = image_matching.ID_AND_FILE_NAME,
                   inputs: Optional[EvalInputs] = None) -> Dict[str, float]:
    """Runs the model over eval records and computes the COCO metrics with pycocotools.

    Prints pycocotools' standard 12-line tables (bbox, then segm when cfg.model.include_mask and the
    ground truth has masks), each followed by a per-category AP table, progress lines with images/s, and
    a summary line per IoU type.

    Args:
      model: a built MaskRCNN; `model(inputs, training=False)` gives the inference dict of model.py
        (boxes [y1, x1, y2, x2] float32 pixels of the padded input, contiguous classes 1..K).
      cfg: the run's Config (model.image_size, pixel statistics, data.eval_batch_size,
        data.category_ids for mapping classes back to the val JSON's category ids).
      eval_file_pattern: glob (or list of globs) of TFRecords written by data_prep; image/source_id and
        image/filename must be the val JSON's image ids and file names (match_by "id_and_file_name"), or
        the file names must be (match_by "file_name").
      val_json: COCO instances JSON with the ground truth of (at least) those images.
      output_dir: when given (created if needed), `detections.json` and `metrics.json` (with the
        per-category APs under "per_category") are written there.
      max_images: evaluate only the first max_images records (None = all).
      match_by: "id_and_file_name" or "file_name" (image_matching.py).
      inputs: check_inputs(eval_file_pattern, val_json, match_by) when the caller ran it already (eval.py
        does, before building the model); None runs it here.
    Returns:
      {"bbox/AP": float, ..., "bbox/ARl", ["segm/AP", ..., "segm/ARl"]}: the 12 COCOeval stats per IoU
      type (pycocotools' -1 where an area range has no ground truth; all 0 without detections).
    Raises:
      ValueError: val_json missing or not COCO, no records match eval_file_pattern, records that are not
        the val JSON's images, detected categories that val_json does not have.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    if inputs is None:
        inputs = check_inputs(eval_file_pattern, val_json, match_by)
    for note in inputs.notes:
        print(f"eval: {note}", flush=True)
    include_mask = cfg.model.include_mask and inputs.gt_has_masks
    evaluator = COCOEvaluator(inputs.coco_gt, include_mask=include_mask)
    match = inputs.match
    total = inputs.num_records if max_images is None else min(inputs.num_records, max_images)
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
        if not include_mask:  # box-only ground truth: the masks would be pasted for nothing
            outputs.pop("detection_masks", None)
        source_id = batch["source_id"].numpy().copy()
        is_valid = batch["is_valid"].numpy().astype(bool)
        # Keep only the first `total` images (max_images).
        is_valid &= np.cumsum(is_valid) <= total - num_images
        # The JSON's image ids (the records' own unless matched by file name); padding rows keep theirs.
        source_id[is_valid] = match.to_json_ids(source_id[is_valid])
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
        summary = {"metrics": metrics, "per_category": evaluator.per_category,
                   "num_images": num_images, "num_detections": len(results),
                   "images_per_second": _rate(num_images, start, warm_images, warm_start, start + seconds),
                   "iou_types": list(evaluator.iou_types), "match_by": match.match_by,
                   "eval_file_pattern": eval_file_pattern,
                   "val_json": val_json if "://" in val_json else os.path.abspath(val_json)}
        run_dir.write_text(os.path.join(output_dir, METRICS_FILE), json.dumps(summary, indent=1))
        print(f"eval: wrote {DETECTIONS_FILE} and {METRICS_FILE} into {output_dir}", flush=True)
    return metrics
