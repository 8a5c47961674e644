"""Tests of maskrcnn_tf.ops.matching.match: hand-made cases and a float64 NumPy reference."""
import numpy as np
import tensorflow as tf

from maskrcnn_tf.ops import boxes as box_ops
from maskrcnn_tf.ops.matching import match

POS, NEG = 0.7, 0.3  # RPN thresholds (docs/design.md section 10)


def _match(similarity, gt_valid, low_quality, pos=POS, neg=NEG):
    index, labels = match(
        tf.constant(similarity, tf.float32), tf.constant(gt_valid), pos, neg, allow_low_quality_matches=low_quality
    )
    assert index.dtype == tf.int32 and labels.dtype == tf.int32
    return index.numpy(), labels.numpy()


# 5 anchors x 3 gt; gt 2 is padding (its large values must be ignored).
SIMILARITY = np.array(
    [[
        [0.80, 0.10, 0.90],  # >= 0.7 for gt 0 -> positive, matched 0 (padded 0.9 ignored)
        [0.50, 0.20, 0.00],  # 0.5 in [0.3, 0.7) -> ignore; gt 0's best is row 0, so no rescue
        [0.10, 0.60, 0.00],  # 0.6 -> ignore, but it is gt 1's best (tie with row 3) -> rescued
        [0.20, 0.60, 0.95],  # same 0.6 for gt 1 (tie) -> rescued too; padded 0.95 ignored
        [0.10, 0.25, 0.00],  # 0.25 < 0.3 -> negative
    ]],
    np.float32,
)
GT_VALID = np.array([[True, True, False]])


def test_thresholds_without_low_quality_matches():
    index, labels = _match(SIMILARITY, GT_VALID, low_quality=False)
    np.testing.assert_array_equal(labels, [[1, -1, -1, -1, 0]])
    np.testing.assert_array_equal(index, [[0, 0, 1, 1, 1]])  # argmax over the valid columns 0 and 1


def test_low_quality_matches_rescue_best_anchor_per_gt_with_ties():
    index, labels = _match(SIMILARITY, GT_VALID, low_quality=True)
    np.testing.assert_array_equal(labels, [[1, -1, 1, 1, 0]])  # rows 2 and 3 tie at gt 1's best IoU 0.6
    np.testing.assert_array_equal(index, [[0, 0, 1, 1, 1]])


def test_threshold_boundaries():
    # Exactly 0.7 is positive (>=), exactly 0.3 is ignore (negative needs < 0.3).
    index, labels = _match([[[0.7], [0.3], [0.2999]]], [[True]], low_quality=False)
    np.testing.assert_array_equal(labels, [[1, -1, 0]])


def test_tie_between_gts_goes_to_lowest_index_and_rescue_keeps_argmax():
    similarity = [[
        [0.5, 0.5, 0.1],  # tie between gt 0 and 1 -> index 0
        [0.4, 0.1, 0.45],  # gt 0's best is 0.5 (row 0); this row's argmax is gt 2
        [0.1, 0.2, 0.3],  # gt 2's best is 0.45 (row 1)
    ]]
    index, labels = _match(similarity, [[True, True, True]], low_quality=True)
    np.testing.assert_array_equal(index, [[0, 2, 2]])
    # Row 0 is best for gt 0 and gt 1, row 1 for gt 2 -> rescued; row 2 stays ignore (0.3 in [0.3, 0.7)).
    np.testing.assert_array_equal(labels, [[1, 1, -1]])


def test_gt_overlapping_nothing_rescues_nothing():
    # gt 1 has IoU 0 with every anchor: it must not turn every anchor positive.
    index, labels = _match([[[0.1, 0.0], [0.05, 0.0]]], [[True, True]], low_quality=True)
    np.testing.assert_array_equal(labels, [[1, 0]])  # row 0 rescued by gt 0 only


def test_no_valid_gt_gives_all_negative():
    similarity = np.full([2, 4, 3], 0.9, np.float32)  # high values in padded columns only
    index, labels = _match(similarity, np.zeros([2, 3], bool), low_quality=True)
    np.testing.assert_array_equal(labels, np.zeros([2, 4]))
    np.testing.assert_array_equal(index, np.zeros([2, 4]))


def test_padded_gt_never_matched_with_real_iou():
    # Real boxes through pairwise_iou: padded gt rows (-1) have IoU 0 and are masked anyway.
    anchors = np.array([[[0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60]]], np.float32)
    gt = np.array([[[0, 0, 10, 11], [-1, -1, -1, -1]]], np.float32)
    similarity = box_ops.pairwise_iou(anchors, gt)  # [1, 3, 2]
    gt_valid = box_ops.is_valid_box(gt)
    index, labels = match(similarity, gt_valid, POS, NEG, allow_low_quality_matches=True)
    # IoU with gt 0: 100/110 = 0.909 (pos), 110/120 = 0.917 (pos, gt's best), 0 (neg).
    np.testing.assert_array_equal(labels.numpy(), [[1, 1, 0]])
    np.testing.assert_array_equal(index.numpy(), [[0, 0, 0]])


def _np_match(similarity, gt_valid, pos, neg, low_quality):
    """float64 reference written from detectron2's Matcher description, one image at a time."""
    batch, rows, _ = similarity.shape
    index = np.zeros([batch, rows], np.int64)
    labels = np.zeros([batch, rows], np.int64)
    for b in range(batch):
        cols = np.flatnonzero(gt_valid[b])
        if cols.size == 0:
            continue
        sim = similarity[b][:, cols].astype(np.float64)
        best = sim.max(axis=1)
        index[b] = cols[sim.argmax(axis=1)]  # numpy argmax: first maximum
        labels[b] = np.where(best >= pos, 1, np.where(best < neg, 0, -1))
        if low_quality:
            for c in range(len(cols)):
                col_best = sim[:, c].max()
                if col_best > 0:
                    labels[b][sim[:, c] == col_best] = 1
    return index, labels


def test_matches_numpy_reference_on_random_boxes():
    rng = np.random.default_rng(5)
    yx = rng.uniform(0, 60, (3, 40, 2))
    anchors = np.concatenate([yx, yx + rng.uniform(8, 30, (3, 40, 2))], -1).astype(np.float32)
    yx = rng.uniform(0, 60, (3, 6, 2))
    gt = np.concatenate([yx, yx + rng.uniform(8, 30, (3, 6, 2))], -1).astype(np.float32)
    gt[0, 4:] = -1  # padded rows
    gt[2, :] = -1  # an image without gt
    similarity = box_ops.pairwise_iou(anchors, gt).numpy()
    gt_valid = box_ops.is_valid_box(gt).numpy()
    for pos, neg, low_quality in [(0.7, 0.3, True), (0.5, 0.5, False)]:
        index, labels = _match(similarity, gt_valid, low_quality, pos, neg)
        ref_index, ref_labels = _np_match(similarity, gt_valid, pos, neg, low_quality)
        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_array_equal(index, ref_index)
        assert (ref_labels[:2] == 1).any() and (ref_labels[:2] == 0).any()  # a non-trivial case


def test_runs_under_xla():
    fn = tf.function(lambda s, v: match(s, v, POS, NEG, allow_low_quality_matches=True), jit_compile=True)
    index, labels = fn(tf.constant(SIMILARITY), tf.constant(GT_VALID))
    np.testing.assert_array_equal(labels.numpy(), [[1, -1, 1, 1, 0]])
    np.testing.assert_array_equal(index.numpy(), [[0, 0, 1, 1, 1]])
