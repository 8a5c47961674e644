"""detections_to_coco_results: box mapping to original pixels, class mapping, mask pasting + RLE."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util

from maskrcnn_tf.evaluation.coco_results import (detections_to_coco_results, encode_masks,
                                                 map_boxes_to_original)

MASK_SIZE = 28
# One image, original 20 x 30 (h, w), resized by (2.0, 1.5): anisotropic on purpose so a y/x swap fails.
ORIGINAL_HW = (20, 30)
SCALE_YX = (2.0, 1.5)


def _image_info(original_hw=ORIGINAL_HW, scale_yx=SCALE_YX, offset_yx=(0.0, 0.0)):
    resized = [original_hw[0] * scale_yx[0], original_hw[1] * scale_yx[1]]
    return np.array([original_hw, resized, scale_yx, offset_yx], np.float32)  # [4, 2]


def _batch(boxes, classes, scores, masks=None, num=None, valid=(True,), source_ids=(7,)):
    """Batch of B = len(valid) images, all with the same detections (D = len(boxes))."""
    batch = len(valid)
    count = len(boxes) if num is None else num
    outputs = {
        "num_detections": np.full([batch], count, np.int32),
        "detection_boxes": np.tile(np.asarray(boxes, np.float32)[None], [batch, 1, 1]),
        "detection_classes": np.tile(np.asarray(classes, np.int32)[None], [batch, 1]),
        "detection_scores": np.tile(np.asarray(scores, np.float32)[None], [batch, 1]),
    }
    if masks is not None:
        outputs["detection_masks"] = np.tile(np.asarray(masks, np.float32)[None], [batch, 1, 1, 1])
    image_info = np.tile(_image_info()[None], [batch, 1, 1])  # [B, 4, 2]
    return outputs, image_info, np.asarray(source_ids, np.int64), np.asarray(valid)


def test_map_boxes_inverts_scale_and_offset_and_clips():
    info = _image_info(original_hw=(10, 10), scale_yx=(2.0, 4.0), offset_yx=(1.0, 2.0))
    boxes = np.array([[3.0, 6.0, 5.0, 10.0],  # inside
                      [-4.0, -8.0, 30.0, 60.0]])  # beyond every edge
    got = map_boxes_to_original(boxes, info)
    # (box + offset) / scale, by hand: [(3+1)/2, (6+2)/4, (5+1)/2, (10+2)/4]; second row clipped to
    # [0, 10] x [0, 10].
    np.testing.assert_allclose(got, [[2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 10.0, 10.0]])


def test_boxes_go_back_to_original_xywh_and_are_clipped():
    boxes = [[4.0, 6.0, 24.0, 30.0],  # original y 2..12, x 4..20
             [30.0, 40.0, 50.0, 60.0]]  # original y 15..25 (clip 20), x 26.67..40 (clip 30)
    results = detections_to_coco_results(*_batch(boxes, [1, 2], [0.9, 0.8]))
    assert [r["image_id"] for r in results] == [7, 7]
    np.testing.assert_allclose(results[0]["bbox"], [4.0, 2.0, 16.0, 10.0], atol=1e-5)
    np.testing.assert_allclose(results[1]["bbox"], [40 / 1.5, 15.0, 30 - 40 / 1.5, 5.0], atol=1e-5)
    np.testing.assert_allclose([r["score"] for r in results], [0.9, 0.8], atol=1e-6)
    # Box-only model: no masks in, no segmentation out.
    assert all("segmentation" not in r for r in results)


def test_category_mapping_padding_and_invalid_images():
    boxes = [[4.0, 6.0, 24.0, 30.0]] * 3
    outputs, info, ids, valid = _batch(boxes, [3, 1, 0], [0.9, 0.8, 0.0], num=2,
                                       valid=(True, False), source_ids=(7, 99))
    results = detections_to_coco_results(outputs, info, ids, valid, category_ids=(5, 7, 9))
    # Contiguous 3 -> category_ids[2] = 9, 1 -> 5; the padding row (beyond num_detections) and the
    # invalid image 99 give nothing.
    assert [(r["image_id"], r["category_id"]) for r in results] == [(7, 9), (7, 5)]
    # Empty category_ids = identity.
    identity = detections_to_coco_results(outputs, info, ids, valid)
    assert [r["category_id"] for r in identity] == [3, 1]
    with pytest.raises(ValueError, match="category_ids"):
        detections_to_coco_results(outputs, info, ids, valid, category_ids=(5, 7))


def test_masks_are_pasted_at_original_size_and_rle_encoded():
    boxes = [[4.0, 6.0, 24.0, 30.0]] * 2  # original y 2..12, x 4..20 (integer edges: no ambiguity)
    full = np.ones([MASK_SIZE, MASK_SIZE])
    left_half = np.zeros([MASK_SIZE, MASK_SIZE])
    left_half[:, : MASK_SIZE // 2] = 1.0
    results = detections_to_coco_results(*_batch(boxes, [1, 1], [0.9, 0.8], masks=[full, left_half]))
    assert json.loads(json.dumps(results)) == results  # JSON-ready: counts are str
    decoded = [mask_util.decode(r["segmentation"]) for r in results]
    assert all(m.shape == ORIGINAL_HW for m in decoded)
    expected_full = np.zeros(ORIGINAL_HW, np.uint8)
    expected_full[2:12, 4:20] = 1  # pixels whose centre is inside the original box
    np.testing.assert_array_equal(decoded[0], expected_full)
    # The left half of the 28 columns covers x 4..12 (half of the 16-pixel box). A transposed (y/x
    # swapped) mask would give the top half instead.
    expected_left = np.zeros(ORIGINAL_HW, np.uint8)
    expected_left[2:12, 4:12] = 1
    np.testing.assert_array_equal(decoded[1], expected_left)


def test_encode_masks_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random([3, 5, 7]) > 0.5
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    assert all(r["size"] == [5, 7] for r in rles)
    for mask, rle in zip(masks, rles):
        np.testing.assert_array_equal(mask_util.decode(rle), mask)  # decode accepts str counts
