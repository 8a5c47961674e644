"""COCOEvaluator: perfect detections give AP 1, mapping bugs are caught, edge cases behave.

Two fixtures: a tiny synthetic COCO json written to tmp_path (no dependency), and real COCO val2017
annotations (shared data; without it, its generated stand-in: tests/conftest.py coco_sample) from which
model-output-like arrays are built: boxes scaled into a padded model input, masks as 28 x 28 crops of the
gt masks, classes as contiguous ids.
"""
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from maskrcnn_tf.evaluation.coco_evaluator import STAT_NAMES, COCOEvaluator, write_results_json
from maskrcnn_tf.evaluation.coco_results import detections_to_coco_results

TABLE_FIRST_LINE = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"

# ---------------------------------------------------------------------------------------------------
# Synthetic tiny COCO file: 2 images, 2 categories with non-contiguous ids, one square object each.

SQUARE_A = (5.0, 5.0, 20.0, 10.0)  # image 7, category 3, [x, y, w, h]
SQUARE_B = (10.0, 10.0, 15.0, 15.0)  # image 42, category 11


def _polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture
def tiny_coco(tmp_path):
    dataset = {
        "images": [{"id": 7, "height": 40, "width": 50, "file_name": "a.jpg"},
                   {"id": 42, "height": 60, "width": 30, "file_name": "b.jpg"}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 11, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": list(SQUARE_A), "iscrowd": 0,
             "area": SQUARE_A[2] * SQUARE_A[3], "segmentation": _polygon(*SQUARE_A)},
            {"id": 2, "image_id": 42, "category_id": 11, "bbox": list(SQUARE_B), "iscrowd": 0,
             "area": SQUARE_B[2] * SQUARE_B[3], "segmentation": _polygon(*SQUARE_B)},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    return path


def _perfect_result(image_id, category_id, box, height, width):
    rle = mask_util.merge(mask_util.frPyObjects(_polygon(*box), height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": 0.9,
            "segmentation": rle}


def _perfect_results():
    return [_perfect_result(7, 3, SQUARE_A, 40, 50), _perfect_result(42, 11, SQUARE_B, 60, 30)]


def test_perfect_results_give_ap_1_and_print_the_tables(tiny_coco, capsys):
    evaluator = COCOEvaluator(str(tiny_coco))
    results = _perfect_results()
    evaluator.update(results)
    metrics = evaluator.evaluate()
    assert sorted(metrics) == sorted(f"{t}/{n}" for t in ("bbox", "segm") for n in STAT_NAMES)
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}/AP"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}/ARmax100"] == pytest.approx(1.0)
        # Both squares are "small" (area < 32**2): pycocotools' -1 for "no large gt" is kept.
        assert metrics[f"{iou_type}/APs"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}/APl"] == -1.0
    assert capsys.readouterr().out.count(TABLE_FIRST_LINE) == 2  # one bbox, one segm table
    # loadRes got copies: the caller's dicts are unchanged.
    assert results == _perfect_results()


def test_only_seen_images_count(tiny_coco):
    evaluator = COCOEvaluator(COCO(str(tiny_coco)), include_mask=False)
    evaluator.update([_perfect_result(7, 3, SQUARE_A, 40, 50)])
    # Image 42 was never evaluated: it is not a miss.
    assert evaluator.evaluate()["bbox/AP"] == pytest.approx(1.0)
    # Declared as evaluated without detections: category 11 gets AP 0, the mean over the two
    # categories with gt is (1 + 0) / 2.
    evaluator.update([], image_ids=np.array([42], np.int64))
    assert evaluator.image_ids == [7, 42]
    assert evaluator.evaluate()["bbox/AP"] == pytest.approx(0.5)
    evaluator.reset()
    assert evaluator.image_ids == []


def test_no_detections_give_zeros(tiny_coco):
    evaluator = COCOEvaluator(str(tiny_coco))
    metrics = evaluator.evaluate()  # nothing at all
    assert len(metrics) == 2 * len(STAT_NAMES) and all(v == 0.0 for v in metrics.values())
    evaluator.update([], image_ids=[7, 42])  # images seen, no detections
    assert all(v == 0.0 for v in evaluator.evaluate().values())


def test_unknown_ids_raise_value_error_naming_them(tiny_coco):
    evaluator = COCOEvaluator(str(tiny_coco))
    wrong_image = [dict(r, image_id=r["image_id"] + 1000) for r in _perfect_results()]
    with pytest.raises(ValueError, match="1007, 1042"):
        evaluator.update(wrong_image)
    with pytest.raises(ValueError, match="123"):
        evaluator.update([], image_ids=[123])
    with pytest.raises(ValueError, match="category ids.*: 4"):
        evaluator.update([dict(_perfect_results()[0], category_id=4)])
    box_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in _perfect_results()]
    with pytest.raises(ValueError, match="segmentation"):
        evaluator.update(box_only)
    assert evaluator.image_ids == []  # rejected updates leave no trace


def test_annotation_id_0_is_renumbered_so_its_match_counts(tiny_coco, capsys):
    # Roboflow numbers annotations from 0. Left as it is, pycocotools reads "matched annotation 0" as
    # "unmatched": the perfect detection of SQUARE_A would be a false positive (bbox AP 0.5).
    dataset = json.loads(tiny_coco.read_text())
    dataset["annotations"][0]["id"] = 0
    tiny_coco.write_text(json.dumps(dataset))
    evaluator = COCOEvaluator(str(tiny_coco))
    assert "ground-truth annotation id 0 renumbered to 3" in capsys.readouterr().out
    assert sorted(evaluator.coco_gt.anns) == [2, 3]
    evaluator.update(_perfect_results())
    metrics = evaluator.evaluate()
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)


def test_write_results_json_round_trip(tiny_coco, tmp_path):
    path = tmp_path / "results.json"
    write_results_json(path, _perfect_results())
    assert json.loads(path.read_text()) == _perfect_results()
    # pycocotools reads the file back as a result set.
    assert len(COCO(str(tiny_coco)).loadRes(str(path)).getAnnIds()) == 2


# ---------------------------------------------------------------------------------------------------
# Real COCO val2017 annotations -> model-output-like arrays -> results -> metrics.

PADDED_SIZE = 1024  # model input side; the long image side is resized to it
# x scale deliberately differs from y scale (by this factor) so a y/x swap in the back-mapping fails.
X_SCALE_FACTOR = 0.9
MAX_DETECTIONS = 32  # >= the most non-crowd instances of one image (26), plus padding rows
MODEL_MASK_SIZE = 28  # the mask head's output
FINE_MASK_SIZE = 56  # fine enough that every pasted gt crop keeps mask IoU >= 0.95


def _crop_to_box(mask, box_xywh, size):
    """size x size crop of a full-image {0,1} mask over a float [x, y, w, h] box.

    The crop resizes exactly the box region (cv2 bilinear, pixel centres); an integer-rounded crop would
    shift small masks by up to a pixel against their box.
    """
    x, y, w, h = box_xywh
    sx, sy = w / size, h / size
    # Output cell j samples source pixel coordinate x + (j + 0.5) * sx, in cv2's centre-at-integer frame.
    inverse = np.array([[sx, 0.0, x + 0.5 * sx - 0.5], [0.0, sy, y + 0.5 * sy - 0.5]])
    return cv2.warpAffine(mask.astype(np.float32), inverse, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


@pytest.fixture(scope="module")
def coco_val(coco_sample):
    """(COCO, category_ids, batch dict built from the gt with 28x28 masks, its 56x56 masks, real)."""
    sample = coco_sample("coco_val2017_10")
    coco = COCO(str(sample.annotation_file))
    category_ids = tuple(sorted(coco.getCatIds()))  # contiguous i + 1 <-> category_ids[i]
    contiguous = {cat: i + 1 for i, cat in enumerate(category_ids)}
    image_ids = sorted(coco.getImgIds())
    batch = len(image_ids)
    boxes = np.full([batch, MAX_DETECTIONS, 4], -1.0, np.float32)
    classes = np.zeros([batch, MAX_DETECTIONS], np.int32)
    scores = np.zeros([batch, MAX_DETECTIONS], np.float32)
    masks = {size: np.zeros([batch, MAX_DETECTIONS, size, size], np.float32)
             for size in (MODEL_MASK_SIZE, FINE_MASK_SIZE)}
    num = np.zeros([batch], np.int32)
    image_info = np.zeros([batch, 4, 2], np.float32)
    for b, image_id in enumerate(image_ids):
        image = coco.loadImgs(image_id)[0]
        height, width = image["height"], image["width"]
        scale_y = PADDED_SIZE / max(height, width)
        scale_x = scale_y * X_SCALE_FACTOR
        image_info[b] = [[height, width], [height * scale_y, width * scale_x], [scale_y, scale_x],
                         [0.0, 0.0]]
        # The model never detects crowd regions (they are not training targets).
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        num[b] = len(anns)
        for d, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            boxes[b, d] = [y * scale_y, x * scale_x, (y + h) * scale_y, (x + w) * scale_x]
            classes[b, d] = contiguous[ann["category_id"]]
            scores[b, d] = 1.0 - 0.01 * d
            gt_mask = coco.annToMask(ann)
            for size, array in masks.items():
                array[b, d] = _crop_to_box(gt_mask, ann["bbox"], size)
    outputs = {"num_detections": num, "detection_boxes": boxes, "detection_scores": scores,
               "detection_classes": classes, "detection_masks": masks[MODEL_MASK_SIZE]}
    return coco, category_ids, dict(outputs=outputs, image_info=image_info,
                                    source_id=np.asarray(image_ids, np.int64),
                                    is_valid=np.ones([batch], bool)), masks[FINE_MASK_SIZE], sample.real


def _evaluate(coco, batch, category_ids, include_mask=True):
    outputs = dict(batch["outputs"])
    if not include_mask:
        del outputs["detection_masks"]
    results = detections_to_coco_results(outputs, batch["image_info"], batch["source_id"],
                                         batch["is_valid"], category_ids)
    evaluator = COCOEvaluator(coco, include_mask=include_mask)
    evaluator.update(results, image_ids=batch["source_id"])
    return evaluator.evaluate()


def test_perfect_detections_give_ap_1(coco_val):
    coco, category_ids, batch, fine_masks, _ = coco_val
    # 56x56 crops pasted back reach mask IoU >= 0.95 for all 76 instances (measured: worst 0.96), so
    # every IoU threshold matches.
    fine = dict(batch, outputs=dict(batch["outputs"], detection_masks=fine_masks))
    metrics = _evaluate(coco, fine, category_ids)
    assert metrics["bbox/AP"] == pytest.approx(1.0)
    assert metrics["bbox/ARmax100"] == pytest.approx(1.0)
    assert metrics["segm/AP"] == pytest.approx(1.0)
    assert metrics["segm/ARmax100"] == pytest.approx(1.0)


def test_model_sized_28x28_masks_keep_segm_ap_near_1(coco_val):
    coco, category_ids, batch, _, real = coco_val
    metrics = _evaluate(coco, batch, category_ids)
    assert metrics["bbox/AP"] == pytest.approx(1.0)
    # 28x28 loses thin parts of a few large objects (7 of 76 fall below mask IoU 0.95, worst ~0.90,
    # measured with a float64 paste), so only the stricter thresholds lose a little.
    assert metrics["segm/AP50"] == pytest.approx(1.0)
    assert metrics["segm/AP75"] == pytest.approx(1.0)
    if real:
        assert 0.95 <= metrics["segm/AP"] < 1.0
    else:  # the stand-in's shapes: compact, at most 34 px wide; 28x28 loses nothing AP sees (measured: 1.0)
        assert metrics["segm/AP"] == pytest.approx(1.0)


def test_wrong_scale_is_caught(coco_val):
    coco, category_ids, batch, _, _ = coco_val
    info = batch["image_info"].copy()
    info[:, 2] = info[:, 2, ::-1]  # scale (y, x) read as (x, y): a 10% anisotropic error
    metrics = _evaluate(coco, dict(batch, image_info=info), category_ids)
    assert metrics["bbox/AP"] < 0.5 and metrics["segm/AP"] < 0.5
    info[:, 2] = 1.0  # scale ignored: boxes ~1.6x too large
    metrics = _evaluate(coco, dict(batch, image_info=info), category_ids)
    assert metrics["bbox/AP"] < 0.5 and metrics["segm/AP"] < 0.5


def test_one_off_category_mapping_gives_ap_0(coco_val):
    coco, category_ids, batch, _, _ = coco_val
    shifted = category_ids[1:] + category_ids[:1]  # contiguous c -> category_ids[c] (off by one)
    metrics = _evaluate(coco, batch, shifted, include_mask=False)
    assert metrics["bbox/AP"] == 0.0
    assert sorted(metrics) == sorted(f"bbox/{n}" for n in STAT_NAMES)
