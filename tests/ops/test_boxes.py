"""Tests of maskrcnn_tf.ops.boxes: hand-computed IoU, invariants, padding, clipping and the box coder."""
import math

import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.ops import boxes as box_ops
from tests.numpy_reference import box_iou

PAD = [-1.0, -1.0, -1.0, -1.0]


def _random_boxes(rng, shape, max_coord=100.0, min_size=1.0, max_size=50.0):
    yx = rng.uniform(0.0, max_coord, shape + (2,))
    hw = rng.uniform(min_size, max_size, shape + (2,))
    return np.concatenate([yx, yx + hw], axis=-1).astype(np.float32)



def test_iou_hand_computed():
    boxes1 = np.array([[[0, 0, 10, 10]]], np.float32)
    boxes2 = np.array(
        [[
            [5, 5, 15, 15],  # inter 5*5 = 25, union 100 + 100 - 25 = 175 -> 1/7
            [0, 0, 10, 20],  # inter 10*10 = 100, union 100 + 200 - 100 = 200 -> 0.5
            [2, 3, 6, 8],  # inside: inter = its area 4*5 = 20, union 100 -> 0.2
            [10, 0, 20, 10],  # shares an edge only: inter 0 -> 0
            [20, 20, 30, 30],  # disjoint -> 0
            [0, 0, 10, 10],  # itself -> 1
            PAD,  # padding -> 0
        ]],
        np.float32,
    )
    expected = [1 / 7, 0.5, 0.2, 0.0, 0.0, 1.0, 0.0]
    iou = box_ops.pairwise_iou(boxes1, boxes2).numpy()
    assert iou.shape == (1, 1, 7)
    np.testing.assert_allclose(iou[0, 0], expected, rtol=1e-6, atol=1e-7)


def test_iou_matches_float64_oracle_and_is_symmetric():
    rng = np.random.default_rng(1)
    a = _random_boxes(rng, (2, 7))
    b = _random_boxes(rng, (2, 5))
    iou_ab = box_ops.pairwise_iou(a, b).numpy()
    iou_ba = box_ops.pairwise_iou(b, a).numpy()
    assert iou_ab.shape == (2, 7, 5)
    np.testing.assert_allclose(iou_ab, np.transpose(iou_ba, (0, 2, 1)), rtol=1e-6, atol=1e-7)
    for i in range(2):
        np.testing.assert_allclose(iou_ab[i], box_iou(a[i], b[i]), rtol=1e-5, atol=1e-6)
    assert iou_ab.max() > 0.0  # the random boxes do overlap somewhere, so the comparison means something


def test_iou_of_padding_and_degenerate_boxes_is_zero_without_nan():
    rng = np.random.default_rng(2)
    real = _random_boxes(rng, (1, 3))
    degenerate = np.array([[PAD, PAD, [5, 5, 5, 9], [4, 4, 2, 2]]], np.float32)  # pad, pad, zero h, negative
    both = np.concatenate([real, degenerate], axis=1)  # [1, 7, 4]
    iou = box_ops.pairwise_iou(both, both).numpy()
    assert np.all(np.isfinite(iou))
    np.testing.assert_array_equal(iou[0, 3:, :], 0.0)  # invalid rows, even against themselves
    np.testing.assert_array_equal(iou[0, :, 3:], 0.0)
    np.testing.assert_allclose(np.diag(iou[0])[:3], 1.0, rtol=1e-6)


def test_area_and_is_valid_box():
    boxes = np.array([[0, 0, 2, 3], PAD, [5, 5, 5, 9], [4, 4, 2, 2], [1, 1, 3, 0]], np.float32)
    # 2 * 3 = 6; every other box has a zero or negative extent -> 0.
    np.testing.assert_allclose(box_ops.area(boxes).numpy(), [6, 0, 0, 0, 0])
    np.testing.assert_array_equal(box_ops.is_valid_box(boxes).numpy(), [True, False, False, False, False])


def test_clip_boxes_at_the_border():
    boxes = np.array(
        [[[-5, -3, 50, 70], [10, 20, 30, 40], [50, 70, 60, 80]], [[-5, -3, 50, 70], [10, 20, 30, 40], PAD]],
        np.float32,
    )
    height_width = np.array([[[40, 60]], [[20, 100]]], np.float32)  # [B, 1, 2], one size per image
    clipped = box_ops.clip_boxes(boxes, height_width).numpy()
    expected = np.array(
        [
            [[0, 0, 40, 60], [10, 20, 30, 40], [40, 60, 40, 60]],  # last box was fully outside
            [[0, 0, 20, 70], [10, 20, 20, 40], [0, 0, 0, 0]],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(clipped, expected)
    # Boxes fully outside and padding become invalid (zero area) boxes.
    np.testing.assert_array_equal(box_ops.is_valid_box(clipped).numpy(), [[True, True, False], [True, True, False]])
    # A python pair works the same as a tensor.
    np.testing.assert_array_equal(box_ops.clip_boxes(boxes[:1], (40, 60)).numpy(), expected[:1])


def test_normalize_denormalize():
    boxes = np.array([[[10, 20, 30, 60]]], np.float32)
    norm = box_ops.normalize_boxes(boxes, (40, 80)).numpy()
    np.testing.assert_allclose(norm, [[[0.25, 0.25, 0.75, 0.75]]])  # y / 40, x / 80
    np.testing.assert_allclose(box_ops.denormalize_boxes(norm, tf.constant([[[40.0, 80.0]]])).numpy(), boxes)


def test_encode_hand_computed():
    anchors = np.array([[0, 0, 10, 20]], np.float32)  # centre (5, 10), h 10, w 20
    boxes = np.array([[2, 4, 22, 24]], np.float32)  # centre (12, 14), h 20, w 20
    # dy = (12 - 5) / 10 = 0.7, dx = (14 - 10) / 20 = 0.2, dh = log(20 / 10), dw = log(20 / 20) = 0
    expected = np.array([0.7, 0.2, math.log(2.0), 0.0])
    rpn = box_ops.BoxCoder(box_ops.RPN_BOX_WEIGHTS).encode(boxes, anchors).numpy()
    rcnn = box_ops.BoxCoder(box_ops.RCNN_BOX_WEIGHTS).encode(boxes, anchors).numpy()
    np.testing.assert_allclose(rpn[0], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rcnn[0], expected * [10, 10, 5, 5], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", [box_ops.RPN_BOX_WEIGHTS, box_ops.RCNN_BOX_WEIGHTS])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(3)
    anchors = _random_boxes(rng, (2, 50), max_size=80.0)
    boxes = _random_boxes(rng, (2, 50), max_size=80.0)  # size ratios stay far below the clamp
    coder = box_ops.BoxCoder(weights)
    deltas = coder.encode(boxes, anchors)
    assert deltas.shape == (2, 50, 4)
    np.testing.assert_allclose(coder.decode(deltas, anchors).numpy(), boxes, rtol=1e-4, atol=1e-3)


def test_decode_clamps_log_scale():
    anchors = np.array([[0, 0, 16, 16]], np.float32)  # centre (8, 8), size 16
    clamp = box_ops.DEFAULT_SCALE_CLAMP
    assert clamp == pytest.approx(math.log(1000 / 16))
    for weights in (box_ops.RPN_BOX_WEIGHTS, box_ops.RCNN_BOX_WEIGHTS):
        coder = box_ops.BoxCoder(weights)
        wh, ww = weights[2], weights[3]
        # dh / wh = 10 > clamp: height becomes 16 * exp(log(1000 / 16)) = 1000, centred at 8 -> [-492, 508];
        # dw / ww = 2 < clamp: width 16 * e^2, unchanged by the clamp.
        deltas = np.array([[0.0, 0.0, 10.0 * wh, 2.0 * ww]], np.float32)
        decoded = coder.decode(deltas, anchors).numpy()[0]
        half_w = 8 * math.exp(2.0)
        np.testing.assert_allclose(decoded, [-492, 8 - half_w, 508, 8 + half_w], rtol=1e-5)
    # Encoding a box far larger than the clamp allows then decoding gives at most 1000/16 times the anchor.
    huge = np.array([[-5000, -5000, 5016, 5016]], np.float32)
    coder = box_ops.BoxCoder()
    decoded = coder.decode(coder.encode(huge, anchors), anchors).numpy()[0]
    np.testing.assert_allclose(decoded, [-492, -492, 508, 508], rtol=1e-5)


def test_encode_of_padding_is_finite_and_decode_broadcasts():
    anchors = np.array([[[0, 0, 16, 16], [4, 4, 8, 12]]], np.float32)  # [1, 2, 4]
    padded_gt = np.array([[PAD, PAD]], np.float32)
    assert np.all(np.isfinite(box_ops.BoxCoder().encode(padded_gt, anchors).numpy()))
    # Class-specific deltas [B, S, K + 1, 4] against anchors [B, S, 1, 4]: zero deltas give the anchors back.
    deltas = np.zeros([1, 2, 3, 4], np.float32)
    decoded = box_ops.BoxCoder(box_ops.RCNN_BOX_WEIGHTS).decode(deltas, anchors[:, :, None, :]).numpy()
    assert decoded.shape == (1, 2, 3, 4)
    np.testing.assert_allclose(decoded, np.broadcast_to(anchors[:, :, None, :], (1, 2, 3, 4)))
