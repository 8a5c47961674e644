"""COCO bbox / segm evaluation with pycocotools.

`COCOEvaluator` collects COCO result dicts (see `coco_results.detections_to_coco_results`) over
`update()` calls and `evaluate()` runs COCOeval, prints pycocotools' standard 12-line summary tables
unchanged and returns the 12 stats per IoU type as "bbox/AP", ..., "segm/ARl".

Decisions:
- Only the images that were evaluated count (`params.imgIds` = the ids seen), so evaluating a few
  batches of val2017 gives the AP of those images, not of the whole file with the rest as misses. An image
  with no detections is still "seen" when its id is passed to `update(results, image_ids=...)`.
- Result ids are checked in `update()`: unknown image or category ids raise a ValueError naming a few
  (pycocotools only asserts, or silently scores them 0).
- For segm, the "bbox" key is dropped from the results before `loadRes` so the detection area is the
  mask area (with a bbox present pycocotools uses the box area, which changes small/medium/large;
  detectron2 does the same).
- No detections at all (pycocotools' `loadRes` fails on an empty list): every metric is 0.0 and no
  table is printed. Otherwise pycocotools' numbers are returned as they are, including its -1 for "no
  ground truth in this area range".
- `loadRes` mutates its input dicts, so it gets shallow copies; the stored results stay as given.
- Ground-truth annotation id 0 is renumbered (to the largest id + 1, in the loaded ground truth only,
  with one printed line): COCOeval marks a matched detection by the id of its annotation, so a detection
  matching annotation 0 counts as a false positive and that annotation as missed. Roboflow exports
  number annotations from 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Names of COCOeval.stats in the order summarize() computes them.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "ARmax1", "ARmax10", "ARmax100", "ARs", "ARm", "ARl")
# How many offending ids an error message lists.
_IDS_SHOWN = 5


def write_results_json(path: Union[str, os.PathLike], results: Sequence[dict]) -> None:
    """Writes COCO result dicts to a JSON file (the format of the COCO detection challenge)."""
    with open(path, "w") as f:
        json.dump(list(results), f)


def _renumber_annotation_id_zero(coco_gt: COCO) -> None:
    """Gives ground-truth annotations with id 0 unused positive ids (COCOeval reads a match with
    annotation id 0 as no match) and rebuilds the index; prints one line when it does."""
    annotations = coco_gt.dataset.get("annotations") or []
    zero = [a for a in annotations if a.get("id") == 0]
    if not zero:
        return
    next_id = max(int(a["id"]) for a in annotations) + 1
    for k, annotation in enumerate(zero):
        annotation["id"] = next_id + k
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco_gt.createIndex()
    print(f"COCOEvaluator: ground-truth annotation id 0 renumbered to {next_id}" +
          (f" (and {len(zero) - 1} more)" if len(zero) > 1 else "") +
          ": pycocotools would count a detection matching it as a false positive")


def _few(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    shown = ", ".join(str(i) for i in ids[:_IDS_SHOWN])
    return shown + (f", ... ({len(ids)} in total)" if len(ids) > _IDS_SHOWN else "")


class COCOEvaluator:
    """Accumulates COCO results and computes the standard COCO metrics.

    Args:
      annotation: path of a COCO instances JSON file, or a loaded `pycocotools.coco.COCO` (an annotation
        id 0 in it is renumbered in place).
      include_mask: also evaluate "segm" (results must then carry "segmentation" RLEs).
    """

    def __init__(self, annotation: Union[str, os.PathLike, COCO], include_mask: bool = True):
        self.coco_gt = annotation if isinstance(annotation, COCO) else COCO(os.fspath(annotation))
        _renumber_annotation_id_zero(self.coco_gt)
        self.include_mask = include_mask
        self.iou_types = ("bbox", "segm") if include_mask else ("bbox",)
        self._known_image_ids = set(self.coco_gt.getImgIds())
        self._known_category_ids = set(self.coco_gt.getCatIds())
        self.reset()

    def reset(self) -> None:
        """Forgets all results and seen image ids."""
        self._results: List[dict] = []
        self._image_ids: set = set()

    @property
    def image_ids(self) -> List[int]:
        """Sorted ids of the images evaluated so far."""
        return sorted(self._image_ids)

    def update(self, results: Sequence[dict], image_ids: Optional[Iterable[int]] = None) -> None:
        """Adds COCO result dicts.

        Args:
          results: dicts with "image_id", "category_id", "bbox" [x, y, w, h], "score" and, when
            include_mask, "segmentation" (compressed RLE).
          image_ids: ids of all images these results cover, including images with no detection (pass
            the batch's valid `source_id`s); default: the ids that appear in `results`.
        Raises:
          ValueError: an image id or category id is not in the annotation file, or a result lacks
            "segmentation" while include_mask is True.
        """
        ids = {int(r["image_id"]) for r in results}
        if image_ids is not None:
            ids |= {int(i) for i in np.asarray(list(image_ids)).ravel()}
        unknown = ids - self._known_image_ids
        if unknown:
            raise ValueError(f"image ids not in the annotation file: {_few(unknown)} (is source_id "
                             "the COCO image id, and is this the right annotation file?)")
        bad_categories = {int(r["category_id"]) for r in results} - self._known_category_ids
        if bad_categories:
            raise ValueError(f"category ids not in the annotation file: {_few(bad_categories)} "
                             "(map contiguous classes back with the label map's category_ids)")
        if self.include_mask and any("segmentation" not in r for r in results):
            raise ValueError("include_mask=True but some results have no 'segmentation' "
                             "(box-only model? build the evaluator with include_mask=False)")
        self._results.extend(results)
        self._image_ids |= ids

    def evaluate(self) -> Dict[str, float]:
        """Runs COCOeval for each IoU type over the images seen.

        Returns:
          {"bbox/AP": float, ..., "bbox/ARl", "segm/AP", ...}: the 12 COCOeval stats per IoU type, all
          0.0 when there are no detections.
        """
        metrics = {}
        for iou_type in self.iou_types:
            stats = self._evaluate_one(iou_type)
            metrics.update({f"{iou_type}/{name}": float(v) for name, v in zip(STAT_NAMES, stats)})
        return metrics

    def _evaluate_one(self, iou_type: str) -> np.ndarray:
        if not self._results:
            print(f"COCOEvaluator: no detections on {len(self._image_ids)} images; "
                  f"{iou_type} metrics are 0.")
            return np.zeros(len(STAT_NAMES))
        # Shallow copies suffice: loadRes and COCOeval only add or replace top-level keys.
        drop = ("bbox",) if iou_type == "segm" else ()
        results = [{k: v for k, v in r.items() if k not in drop} for r in self._results]
        coco_dt = self.coco_gt.loadRes(results)
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
        coco_eval.params.imgIds = self.image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return np.asarray(coco_eval.stats)
