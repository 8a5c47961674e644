"""Tests of maskrcnn_tf.ops.nms.batched_nms against a float64 NumPy greedy NMS, plus edge cases and XLA."""
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.ops import nms as nms_ops
from maskrcnn_tf.ops.nms import batched_nms

PAD = [-1.0, -1.0, -1.0, -1.0]


def _np_greedy_nms(boxes, scores, max_output_size, iou_threshold, score_threshold):
    """Textbook greedy NMS, float64, one image: visit by descending score (ties: lower index), keep a box
    unless a kept box overlaps it with IoU > threshold. Only valid boxes with score > threshold compete."""
    boxes = boxes.astype(np.float64)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (scores > score_threshold)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    for i in np.argsort(-scores.astype(np.float64), kind="stable"):
        if not valid[i]:
            continue
        if keep:
            k = boxes[keep]
            inter_h = np.clip(np.minimum(k[:, 2], boxes[i, 2]) - np.maximum(k[:, 0], boxes[i, 0]), 0, None)
            inter_w = np.clip(np.minimum(k[:, 3], boxes[i, 3]) - np.maximum(k[:, 1], boxes[i, 1]), 0, None)
            inter = inter_h * inter_w
            if np.any(inter / (areas[keep] + areas[i] - inter) > iou_threshold):
                continue
        keep.append(int(i))
        if len(keep) == max_output_size:
            break
    return keep


def _random_boxes(rng, batch, num, extent=100.0):
    yx = rng.uniform(0, extent, (batch, num, 2))
    boxes = np.concatenate([yx, yx + rng.uniform(4, 40, (batch, num, 2))], -1).astype(np.float32)
    scores = rng.uniform(size=(batch, num)).astype(np.float32)
    return boxes, scores


def _check_against_oracle(boxes, scores, k, iou, score_threshold, indices, num_valid):
    assert indices.shape == (boxes.shape[0], k) and num_valid.shape == (boxes.shape[0],)
    for b in range(boxes.shape[0]):
        ref = _np_greedy_nms(boxes[b], scores[b], k, iou, score_threshold)
        assert num_valid[b] == len(ref)
        assert indices[b, : num_valid[b]].tolist() == ref
        np.testing.assert_array_equal(indices[b, num_valid[b]:], 0)  # padding slots


@pytest.mark.parametrize("tile_size", [16, nms_ops.TILE_SIZE])  # 16: many tiles, buffer and early stop
@pytest.mark.parametrize(
    "max_output_size, iou_threshold, score_threshold",
    [(40, 0.5, float("-inf")), (200, 0.7, 0.3), (25, 0.3, 0.5)],
)
def test_matches_numpy_greedy_nms(monkeypatch, tile_size, max_output_size, iou_threshold, score_threshold):
    monkeypatch.setattr(nms_ops, "TILE_SIZE", tile_size)
    rng = np.random.default_rng(max_output_size)
    boxes, scores = _random_boxes(rng, 3, 150)
    boxes[1, 140:] = PAD  # padded rows in one image
    indices, num_valid = batched_nms(boxes, scores, max_output_size, iou_threshold, score_threshold)
    assert indices.dtype == tf.int32 and num_valid.dtype == tf.int32
    _check_against_oracle(boxes, scores, max_output_size, iou_threshold, score_threshold,
                          indices.numpy(), num_valid.numpy())


@pytest.mark.parametrize("tile_size", [1, 2, nms_ops.TILE_SIZE])  # 1, 2: the chain crosses tile borders
def test_hand_computed_chain(monkeypatch, tile_size):
    monkeypatch.setattr(nms_ops, "TILE_SIZE", tile_size)
    # IoU(A, B) = IoU(B, C) = 50 / 150 = 0.333 > 0.3, IoU(A, C) = 0 (they only share an edge).
    # Greedy: A kept, B suppressed by A, C kept because B (its only overlap) is gone. With tiles of 2,
    # A and B form tile 0 and C tile 1: a suppressed B must not reach the kept-box buffer.
    boxes = np.array([[[0, 5, 10, 15], [0, 0, 10, 10], [0, 10, 10, 20], [30, 30, 40, 40]]], np.float32)
    scores = np.array([[0.8, 0.9, 0.7, 0.1]], np.float32)  # B, A, C, D
    indices, num_valid = batched_nms(boxes, scores, 4, 0.3)
    assert num_valid.numpy().tolist() == [3]
    assert indices.numpy().tolist() == [[1, 2, 3, 0]]  # A, C, D by descending score, then one padding slot


def test_iou_equal_to_threshold_does_not_suppress():
    # [0, 0, 10, 10] vs [0, 0, 10, 20]: inter 100, union 200 -> IoU exactly 0.5; suppression needs > 0.5.
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 20]]], np.float32)
    scores = np.array([[0.9, 0.8]], np.float32)
    assert batched_nms(boxes, scores, 2, 0.5)[1].numpy().tolist() == [2]
    assert batched_nms(boxes, scores, 2, 0.49)[1].numpy().tolist() == [1]


def test_score_threshold_is_strict_and_ties_keep_lower_index():
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]]], np.float32)
    scores = np.array([[0.5, 0.7, 0.7, 0.2]], np.float32)
    indices, num_valid = batched_nms(boxes, scores, 4, 0.5, score_threshold=0.5)
    assert num_valid.numpy().tolist() == [2]  # 0.5 is not > 0.5
    assert indices.numpy().tolist() == [[1, 2, 0, 0]]  # equal scores: lower index first


def test_idempotent():
    rng = np.random.default_rng(9)
    boxes, scores = _random_boxes(rng, 2, 120)
    indices, num_valid = batched_nms(boxes, scores, 120, 0.5)
    for b in range(2):
        kept = indices.numpy()[b, : num_valid.numpy()[b]]
        again_idx, again_num = batched_nms(boxes[b:b + 1, kept], scores[b:b + 1, kept], 120, 0.5)
        assert again_num.numpy()[0] == len(kept)
        assert again_idx.numpy()[0, : len(kept)].tolist() == list(range(len(kept)))  # already score-sorted
    assert 0 < num_valid.numpy().min() < 120  # suppression did happen


def test_padding_only_and_more_slots_than_boxes():
    boxes = np.array([[PAD] * 5, [[0, 0, 10, 10], [1, 1, 11, 11], PAD, [50, 50, 60, 60], [0, 0, 0, 0]]], np.float32)
    scores = np.array([[0.9] * 5, [0.3, 0.8, 0.99, 0.5, 0.95]], np.float32)
    indices, num_valid = batched_nms(boxes, scores, 8, 0.5)  # K = 8 > N = 5
    assert indices.shape == (2, 8)
    # Image 0: only padding -> nothing. Image 1: padding (0.99) and zero-area (0.95) boxes never win;
    # box 1 (0.8) suppresses box 0 (IoU 81 / 119 = 0.68), box 3 is separate.
    assert num_valid.numpy().tolist() == [0, 2]
    assert indices.numpy().tolist() == [[0] * 8, [1, 3] + [0] * 6]


def test_runs_under_xla_and_matches_oracle():
    rng = np.random.default_rng(4)
    boxes, scores = _random_boxes(rng, 2, 300)
    fn = tf.function(lambda b, s: batched_nms(b, s, 50, 0.6, 0.2), jit_compile=True)
    indices, num_valid = fn(tf.constant(boxes), tf.constant(scores))
    _check_against_oracle(boxes, scores, 50, 0.6, 0.2, indices.numpy(), num_valid.numpy())


def test_nan_box_is_ignored(monkeypatch):
    monkeypatch.setattr(nms_ops, "TILE_SIZE", 16)  # several tiles, so the kept-box buffer is used
    rng = np.random.default_rng(6)
    boxes, scores = _random_boxes(rng, 1, 60)
    boxes[0, 3] = np.nan
    scores[0, 3] = 2.0  # would be visited first if it were a candidate
    indices, num_valid = batched_nms(boxes, scores, 60, 0.4)
    _check_against_oracle(boxes, scores, 60, 0.4, float("-inf"), indices.numpy(), num_valid.numpy())
