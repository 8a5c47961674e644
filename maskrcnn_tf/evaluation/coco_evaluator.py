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
- Per-category AP (detectron2's `_derive_coco_results`): after each pycocotools table, a table of
  AP@[.5:.95] per category of the ground truth (in category id order, named by the JSON's "name"),
  read from `eval["precision"]` at area "all" and maxDets 100: the mean over IoU thresholds and recall
  points of the entries > -1. A category without (non-crowd) ground truth among the evaluated images
  has only -1 entries: it is printed as "n/a (no ground truth)" and its value is None, never 0; like
  pycocotools' AP it is not averaged. Values are fractions (0..1, as the stats), not detectron2's percent.
  `per_category` holds {iou_type: {name: AP or None}} of the last `evaluate()` (a repeated name gets
  " (id N)" appended). Without detections every category with ground truth is 0.0.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Names of COCOeval.stats in the order summarize() computes them.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "ARmax1", "ARmax10", "ARmax100", "ARs", "ARm", "ARl")
# How many offending ids an error message lists.
_IDS_SHOWN = 5
# Printed (and absent from the averages) for a category without ground truth in the evaluated images.
NO_GROUND_TRUTH = "n/a (no ground truth)"
# (name, AP) pairs per row of the per-category table.
_TABLE_PAIRS = 3


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


def category_names(coco_gt: COCO) -> Dict[int, str]:
    """Category id -> name from the JSON's categories, in id order; a repeated (or missing) name gets
    " (id N)" appended so that every name is a unique key."""
    categories = coco_gt.loadCats(sorted(coco_gt.getCatIds()))
    counts: Dict[str, int] = {}
    for c in categories:
        counts[str(c.get("name", ""))] = counts.get(str(c.get("name", "")), 0) + 1
    names = {}
    for c in categories:
        name = str(c.get("name", ""))
        names[int(c["id"])] = name if name and counts[name] == 1 else f"{name} (id {c['id']})".lstrip()
    return names


def per_category_ap(coco_eval: COCOeval, names: Dict[int, str]) -> Dict[str, Optional[float]]:
    """AP@[.5:.95] per category of an accumulated COCOeval (detectron2's `_derive_coco_results`).

    eval["precision"] is [IoU thresholds, recall points, categories (params.catIds order), area ranges,
    maxDets]; at area "all" and maxDets 100 the AP of a category is the mean of its entries > -1, None
    when there are none (no ground truth of the category among params.imgIds)."""
    precision = coco_eval.eval["precision"]
    params = coco_eval.params
    area = params.areaRngLbl.index("all")
    max_dets = list(params.maxDets).index(100)
    result: Dict[str, Optional[float]] = {}
    for k, category_id in enumerate(params.catIds):
        values = precision[:, :, k, area, max_dets]
        values = values[values > -1]
        result[names[int(category_id)]] = float(np.mean(values)) if values.size else None
    return result


def format_per_category_table(iou_type: str, per_category: Dict[str, Optional[float]]) -> str:
    """'Per-category bbox AP:' and a pipe table of _TABLE_PAIRS (category, AP) pairs per row."""
    cells = [(name, NO_GROUND_TRUTH if ap is None else f"{ap:.4f}") for name, ap in per_category.items()]
    pairs = max(1, min(_TABLE_PAIRS, len(cells)))
    rows = [list(itertools.chain(*cells[i:i + pairs])) for i in range(0, len(cells), pairs)]
    if rows:
        rows[-1] += [""] * (2 * pairs - len(rows[-1]))
    header = ["category", "AP"] * pairs
    widths = [max(len(r[j]) for r in rows + [header]) for j in range(2 * pairs)]

    def line(cols: List[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"
    return "\n".join([f"Per-category {iou_type} AP:", line(header), rule] + [line(r) for r in rows])


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
        self._category_names = category_names(self.coco_gt)
        self.per_category: Dict[str, Dict[str, Optional[float]]] = {}
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
          0.0 when there are no detections. The per-category APs go to `self.per_category`.
        """
        metrics = {}
        self.per_category = {}
        for iou_type in self.iou_types:
            stats, per_category = self._evaluate_one(iou_type)
            metrics.update({f"{iou_type}/{name}": float(v) for name, v in zip(STAT_NAMES, stats)})
            self.per_category[iou_type] = per_category
            print(format_per_category_table(iou_type, per_category), flush=True)
        return metrics

    def _categories_with_ground_truth(self) -> set:
        annotations = self.coco_gt.loadAnns(self.coco_gt.getAnnIds(imgIds=self.image_ids))
        return {int(a["category_id"]) for a in annotations if not a.get("iscrowd", 0)}

    def _evaluate_one(self, iou_type: str) -> Tuple[np.ndarray, Dict[str, Optional[float]]]:
        if not self._results:
            print(f"COCOEvaluator: no detections on {len(self._image_ids)} images; "
                  f"{iou_type} metrics are 0.")
            with_gt = self._categories_with_ground_truth()
            return np.zeros(len(STAT_NAMES)), {name: (0.0 if category_id in with_gt else None)
                                               for category_id, name in self._category_names.items()}
        # Shallow copies suffice: loadRes and COCOeval only add or replace top-level keys.
        drop = ("bbox",) if iou_type == "segm" else ()
        results = [{k: v for k, v in r.items() if k not in drop} for r in self._results]
        coco_dt = self.coco_gt.loadRes(results)
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
        coco_eval.params.imgIds = self.image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return np.asarray(coco_eval.stats), per_category_ap(coco_eval, self._category_names)
