"""rle_png: COCO RLE -> run lengths -> PNG, checked against pycocotools' decoder on real and random masks."""
import io
import json

import cv2
import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils

from maskrcnn_tf.data import rle_png
from tests.conftest import shared_data


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _cv2_decode(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def _edge_case_masks():
    """Masks that stress the box logic: borders, full image, single pixels, runs wrapping a column."""
    h, w = 6, 5
    masks = []
    for y, x in ((0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0), (2, 3)):
        m = np.zeros((h, w), np.uint8)
        m[y, x] = 1
        masks.append(m)
    masks.append(np.ones((h, w), np.uint8))  # one run of h * w
    wrap = np.zeros((h, w), np.uint8)
    wrap[h - 2:, 1] = 1
    wrap[:2, 2] = 1  # column-major: one run crossing from column 1 into column 2
    masks.append(wrap)
    rows = np.zeros((h, w), np.uint8)
    rows[[0, h - 1], :] = 1  # top and bottom rows: every column has two runs, runs wrap columns
    masks.append(rows)
    masks.append(np.ones((1, 1), np.uint8))
    masks.append(np.eye(7, 3, dtype=np.uint8))
    return masks


def _random_masks(seed=0):
    rng = np.random.default_rng(seed)
    masks = []
    for h, w in ((1, 9), (9, 1), (13, 7), (64, 48), (120, 200)):
        for density in (0.01, 0.3, 0.97):
            masks.append((rng.random((h, w)) < density).astype(np.uint8))
    return [m for m in masks if m.any()]


def test_counts_and_png_equal_pycocotools_decode_on_edge_and_random_masks():
    for mask in _edge_case_masks() + _random_masks():
        rle = _rle(mask)
        h, w = rle["size"]
        counts = rle_png.rle_counts(rle["counts"])
        rle_png.check_counts(counts, h, w)
        np.testing.assert_array_equal(rle_png.counts_to_mask(counts, h, w), mask)
        png = rle_png.encode_png_from_counts(counts, h, w)
        np.testing.assert_array_equal(_cv2_decode(png), mask)
        np.testing.assert_array_equal(tf.io.decode_png(png, channels=1).numpy()[..., 0], mask)


def test_real_coco_polygons_and_crowd_rle_round_trip_exactly():
    # coco_val2017_10: 77 instances, one crowd region (uncompressed RLE); every PNG must decode (OpenCV
    # and TensorFlow, as the pipeline and Model Garden's decoder do) to pycocotools' annToMask, 0/1.
    root = shared_data("coco_val2017_10", "real COCO polygons and crowd RLE decode like pycocotools")
    data = json.load(open(root / "annotations" / "instances_val2017_subset.json"))
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
            counts = rle_png.rle_counts(rle["counts"])
        else:
            rle = mask_utils.frPyObjects(segmentation, h, w)
            counts = np.asarray(segmentation["counts"], np.int64)
        expected = mask_utils.decode(rle)
        png = rle_png.encode_png_from_counts(counts, h, w)
        np.testing.assert_array_equal(_cv2_decode(png), expected)
        np.testing.assert_array_equal(tf.io.decode_png(png, channels=1).numpy()[..., 0], expected)


def test_png_is_8bit_grayscale_holding_0_and_1():
    # Model Garden's decoder casts the PNG to float without thresholding: values must be 0/1, not 0/255
    # (why a 1-bit PNG is not used, see the module docstring).
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 10:30] = 1
    png = rle_png.encode_png_from_counts(rle_png.rle_counts(_rle(mask)["counts"]), 30, 40)
    assert png[:8] == rle_png.PNG_SIGNATURE and png[12:16] == b"IHDR"
    assert (png[24], png[25]) == (8, 0)  # bit depth 8, colour type 0 (grayscale)
    assert sorted(np.unique(tf.io.decode_png(png).numpy()).tolist()) == [0, 1]


def test_png_readable_by_pil_when_installed():
    image_module = pytest.importorskip("PIL.Image")
    mask = np.zeros((17, 9), np.uint8)
    mask[3:12, 2:7] = 1
    png = rle_png.encode_png_from_counts(rle_png.rle_counts(_rle(mask)["counts"]), 17, 9)
    np.testing.assert_array_equal(np.asarray(image_module.open(io.BytesIO(png))), mask)


def test_zero_row_segments_are_reused_across_masks_of_a_width():
    # Hand-checked: a 1000-row mask with one pixel at row 500 needs zero-row runs of 500 and 499 rows;
    # the cache then holds deflate segments for the set bits of 500 (256+128+64+32+16+4) and 499
    # (256+128+64+32+16+2+1) only, keyed by width.
    rle_png._zero_rows_cache.clear()
    mask = np.zeros((1000, 3), np.uint8)
    mask[500, 1] = 1
    png = rle_png.encode_png_from_counts(rle_png.rle_counts(_rle(mask)["counts"]), 1000, 3)
    np.testing.assert_array_equal(_cv2_decode(png), mask)
    assert sorted(rle_png._zero_rows_cache) == [(3, b) for b in (0, 1, 2, 4, 5, 6, 7, 8)]


@pytest.mark.parametrize("bad", [b"", b"a", b"0a", "é", b"0\x7f", b"\x20", b"o" * 20])
def test_malformed_compressed_strings_raise_value_error(bad):
    with pytest.raises(ValueError):
        rle_png.rle_counts(bad)


def test_counts_that_do_not_cover_the_image_are_rejected():
    rle_png.check_counts(np.array([3, 2, 1]), 2, 3)
    for counts in ([3, 2], [3, 2, 2], [-1, 7], []):
        with pytest.raises(ValueError):
            rle_png.check_counts(np.array(counts, np.int64), 2, 3)
