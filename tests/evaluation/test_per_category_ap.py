"""Per-category AP (COCOEvaluator.per_category and its printed table) on a hand-built COCO case.

Three categories, listed in the JSON out of id order (pycocotools orders them by id, so a table indexed
by the JSON's order would name the wrong values):
- "car" (id 3): two ground truths in image 1, both detected exactly (scores 0.95 and 0.85): AP 1.0.
  Both are in one image, so a table read at maxDets 1 instead of 100 would give less.
- "person" (id 7): two ground truths (image 1 and image 3); a false positive at score 0.9 (image 3, far
  from any box) ranks before the one exact detection at 0.8 (image 1); the person of image 3 is missed.
- "zebra" (id 1): no ground truth, one (false positive) detection at 0.7: marked, not 0, not averaged.
Every box is 40 x 40 (area 1600, "medium"), so a table read at area "small" instead of "all" has nothing.

The person AP by hand, from the definition (pycocotools' 101-point interpolated AP):
  detections by score: 0.9 FP, 0.8 TP; 2 ground truths.
  cumulative TP = [0, 1], FP = [1, 1] -> recall = [0, 0.5], precision = [0, 0.5].
  interpolated precision (max of the precision at this and every later rank) = [0.5, 0.5].
  recall thresholds r = 0, 0.01, ..., 1.00 (101 points): each takes the interpolated precision of the
  first rank whose recall >= r: r = 0 -> rank 1 (0.5); 0 < r <= 0.5 -> rank 2 (0.5); r > 0.5 -> no rank
  reaches it -> 0. So 51 points (0.00 .. 0.50) at 0.5 and 50 at 0: AP = 51 * 0.5 / 101 = 0.252475...
  The same at every IoU threshold .50:.95 (the TP has IoU 1, the FP IoU 0), so AP@[.5:.95] = 25.5 / 101.
The category mean pycocotools reports (bbox/AP) is then (1 + 25.5 / 101) / 2, zebra left out.
"""
import json

import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from maskrcnn_tf.evaluation.coco_evaluator import (NO_GROUND_TRUTH, COCOEvaluator, category_names,
                                                   format_per_category_table)

PERSON_AP = 51 * 0.5 / 101
SIZE = 40.0


def _box(x, y):
    return [float(x), float(y), SIZE, SIZE]


def _polygon(box):
    x, y, w, h = box
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


CAR_1, CAR_2 = _box(5, 5), _box(55, 5)  # image 1
PERSON_1 = _box(5, 55)  # image 1
PERSON_3 = _box(5, 5)  # image 3
EMPTY_3 = _box(55, 55)  # image 3: overlaps nothing
ZEBRA_2 = _box(30, 30)  # image 2 (no ground truth at all)


def _coco():
    annotations = [(1, 3, CAR_1), (1, 3, CAR_2), (1, 7, PERSON_1), (3, 7, PERSON_3)]
    dataset = {
        "images": [{"id": i, "height": 100, "width": 100, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
        "categories": [{"id": 7, "name": "person"}, {"id": 3, "name": "car"}, {"id": 1, "name": "zebra"}],
        "annotations": [{"id": k + 1, "image_id": image_id, "category_id": category_id, "bbox": box,
                         "area": SIZE * SIZE, "iscrowd": 0, "segmentation": _polygon(box)}
                        for k, (image_id, category_id, box) in enumerate(annotations)],
    }
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _result(image_id, category_id, box, score):
    rle = mask_util.merge(mask_util.frPyObjects(_polygon(box), 100, 100))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score,
            "segmentation": rle}


def _evaluator_with_detections():
    evaluator = COCOEvaluator(_coco(), include_mask=True)
    evaluator.update([_result(1, 3, CAR_1, 0.95), _result(1, 3, CAR_2, 0.85),
                      _result(3, 7, EMPTY_3, 0.9), _result(1, 7, PERSON_1, 0.8),
                      _result(2, 1, ZEBRA_2, 0.7)], image_ids=[1, 2, 3])
    return evaluator


def test_two_classes_hand_computed_and_no_ground_truth_marked(capsys):
    evaluator = _evaluator_with_detections()
    metrics = evaluator.evaluate()
    out = capsys.readouterr().out
    assert set(evaluator.per_category) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        per_category = evaluator.per_category[iou_type]
        assert list(per_category) == ["zebra", "car", "person"]  # category id order: 1, 3, 7
        assert per_category["car"] == pytest.approx(1.0, abs=1e-9)
        assert per_category["person"] == pytest.approx(PERSON_AP, abs=1e-9)
        assert per_category["zebra"] is None
        # pycocotools' AP is the mean over the categories with ground truth: zebra is not averaged.
        assert metrics[f"{iou_type}/AP"] == pytest.approx((1.0 + PERSON_AP) / 2, abs=1e-9)
        table = format_per_category_table(iou_type, per_category)
        assert table in out
        assert table.splitlines() == [
            f"Per-category {iou_type} AP:",
            "| category | AP                    | category | AP     | category | AP     |",
            "|:---------|:----------------------|:---------|:-------|:---------|:-------|",
            f"| zebra    | {NO_GROUND_TRUTH} | car      | 1.0000 | person   | 0.2525 |",
        ]
    # The existing keys stay the 12 stats per IoU type; metrics.json writes None as null.
    assert all("AP-" not in key for key in metrics) and len(metrics) == 24
    assert json.loads(json.dumps(evaluator.per_category))["bbox"] == {"zebra": None, "car": 1.0,
                                                                       "person": pytest.approx(PERSON_AP)}


def test_no_detections_zero_for_categories_with_ground_truth_only(capsys):
    coco = _coco()
    evaluator = COCOEvaluator(coco, include_mask=False)
    evaluator.update([], image_ids=[2, 3])  # image 3 has a person; no image seen has a car
    evaluator.evaluate()
    assert evaluator.per_category == {"bbox": {"zebra": None, "car": None, "person": 0.0}}
    out = capsys.readouterr().out
    assert f"| zebra    | {NO_GROUND_TRUTH} | car      | {NO_GROUND_TRUTH} | person   | 0.0000 |" in out


def test_table_wraps_after_three_pairs_and_names_are_unique():
    coco = COCO()
    coco.dataset = {"images": [], "annotations": [],
                    "categories": [{"id": i, "name": "thing" if i < 3 else f"c{i}"} for i in range(1, 6)]}
    coco.createIndex()
    names = category_names(coco)
    assert names == {1: "thing (id 1)", 2: "thing (id 2)", 3: "c3", 4: "c4", 5: "c5"}
    table = format_per_category_table("segm", {name: 0.5 for name in names.values()}).splitlines()
    assert table[0] == "Per-category segm AP:" and len(table) == 5  # title, header, rule, 2 rows
    cells = [[cell.strip() for cell in row.split("|")[1:-1]] for row in table[1:]]
    assert cells[0] == ["category", "AP"] * 3
    assert cells[2] == ["thing (id 1)", "0.5000", "thing (id 2)", "0.5000", "c3", "0.5000"]
    assert cells[3] == ["c4", "0.5000", "c5", "0.5000", "", ""]
    assert len({len(row) for row in table[1:]}) == 1  # aligned columns
