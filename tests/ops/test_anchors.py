"""Tests of maskrcnn_tf.ops.anchors: counts, hand-computed values, order and a float64 loop oracle."""
import math

import numpy as np
import pytest

from maskrcnn_tf.ops import anchors as anchor_ops

SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)


def test_num_anchors_per_location():
    assert anchor_ops.num_anchors_per_location(RATIOS) == 3
    assert anchor_ops.num_anchors_per_location((1.0,)) == 1


@pytest.mark.parametrize(
    "image_size, expected",
    [
        # 128 x 128: grids 32, 16, 8, 4, 2 (128 / stride) squared, times 3 ratios.
        ((128, 128), {"P2": 3072, "P3": 768, "P4": 192, "P5": 48, "P6": 12}),
        # 100 x 60: ceil(100 / s) x ceil(60 / s) = 25x15, 13x8, 7x4, 4x2, 2x1, times 3.
        ((100, 60), {"P2": 1125, "P3": 312, "P4": 84, "P5": 24, "P6": 6}),
    ],
)
def test_count_per_level(image_size, expected):
    anchors = anchor_ops.multilevel_anchors(image_size, SIZES, RATIOS)
    assert sorted(anchors) == sorted(expected)
    for level, count in expected.items():
        assert anchors[level].shape == (count, 4)
        assert anchors[level].dtype == np.float32


def test_first_anchors_of_p2_hand_computed():
    anchors = anchor_ops.multilevel_anchors((128, 128), SIZES, RATIOS)["P2"]
    # P2: stride 4, size 32; cell (0, 0) has centre (2, 2).
    # ratio 0.5: h = 32 * sqrt(0.5) = 22.627417, w = 32 / sqrt(0.5) = 45.254834
    #   -> [2 - 11.3137085, 2 - 22.627417, 2 + 11.3137085, 2 + 22.627417]
    # ratio 1: h = w = 32 -> [-14, -14, 18, 18]
    # ratio 2: h = 45.254834, w = 22.627417 -> [2 - 22.627417, 2 - 11.3137085, 2 + 22.627417, 2 + 11.3137085]
    # next cell (0, 1), centre (2, 6), ratio 0.5 -> [-9.3137085, -16.627417, 13.3137085, 28.627417]
    expected = np.array(
        [
            [-9.3137085, -20.627417, 13.3137085, 24.627417],
            [-14.0, -14.0, 18.0, 18.0],
            [-20.627417, -9.3137085, 24.627417, 13.3137085],
            [-9.3137085, -16.627417, 13.3137085, 28.627417],
        ]
    )
    np.testing.assert_allclose(anchors[:4], expected, rtol=1e-6, atol=1e-5)
    # Last anchor of P2: cell (31, 31), centre (126, 126), ratio 2 -> [126 - 22.627417, 126 - 11.3137085, ...]
    np.testing.assert_allclose(
        anchors[-1], [103.372583, 114.6862915, 148.627417, 137.3137085], rtol=1e-6, atol=1e-4
    )


def test_order_matches_reshape_against_loop_oracle():
    image_size, ratios = (100, 60), (0.5, 1.0, 2.0)
    anchors = anchor_ops.multilevel_anchors(image_size, SIZES, ratios)
    for level, size in zip(range(2, 7), SIZES):
        stride = 2**level
        grid_h, grid_w = math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)
        grid = anchors[f"P{level}"].reshape(grid_h, grid_w, len(ratios), 4)  # [H_l, W_l, A, 4]
        # Independent float64 loop from the definition: centre ((i + .5) s, (j + .5) s), h = size sqrt(r),
        # w = size / sqrt(r).
        for i in range(grid_h):
            for j in range(grid_w):
                for a, r in enumerate(ratios):
                    cy, cx = (i + 0.5) * stride, (j + 0.5) * stride
                    h, w = size * math.sqrt(r), size / math.sqrt(r)
                    np.testing.assert_allclose(
                        grid[i, j, a], [cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], rtol=1e-6, atol=1e-4
                    )


def test_aspect_ratio_is_height_over_width_and_area_is_size_squared():
    anchors = anchor_ops.multilevel_anchors((64, 64), SIZES, (0.25, 1.0, 3.0))["P3"].reshape(8, 8, 3, 4)
    heights = anchors[..., 2] - anchors[..., 0]
    widths = anchors[..., 3] - anchors[..., 1]
    np.testing.assert_allclose(heights / widths, np.broadcast_to([0.25, 1.0, 3.0], (8, 8, 3)), rtol=1e-5)
    np.testing.assert_allclose(heights * widths, 64.0**2, rtol=1e-5)  # P3 size 64


def test_rejects_wrong_number_of_sizes():
    with pytest.raises(ValueError, match="one anchor size per level"):
        anchor_ops.multilevel_anchors((128, 128), (32, 64), RATIOS)
