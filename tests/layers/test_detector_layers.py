"""Weightless detector layers: proposal generator, anchor labeler, RoI sampler, detection generator,
RoIAlign layer. Checked against NumPy written from the papers' rules (the Keras layer contract:
test_layer_contract.py)."""
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.layers.anchor_labeler import AnchorLabeler
from maskrcnn_tf.layers.detection_generator import DetectionGenerator
from maskrcnn_tf.layers.proposal_generator import ProposalGenerator
from maskrcnn_tf.layers.roi_align import MultilevelRoIAlign
from maskrcnn_tf.layers.roi_sampler import RoISampler
from maskrcnn_tf.ops import boxes as box_ops
from tests.numpy_reference import box_iou

IMAGE_INFO = np.array([[[64, 64], [64, 64], [1, 1], [0, 0]]], np.float32)  # one 64x64 image


def _np_greedy_nms(boxes, scores, threshold):
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if box_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= threshold]
    return keep


def test_roi_align_layer_declares_jit_support_and_keeps_boxes_float32():
    assert not MultilevelRoIAlign(backend="crop_and_resize").supports_jit
    assert MultilevelRoIAlign(backend="gather").supports_jit
    with pytest.raises(ValueError, match="crop_and_resize"):
        MultilevelRoIAlign(backend="bilinear")
    features = {f"P{l}": tf.ones([1, 64 // 2**l, 64 // 2**l, 4], tf.float16) for l in range(2, 7)}
    # Under a mixed policy the features stay float16 and the output too (boxes are not cast).
    out = MultilevelRoIAlign(output_size=3, dtype="mixed_float16")(features, tf.constant([[[8.25, 8.25, 40.5, 40.5]]]))
    assert out.dtype == tf.float16 and out.shape == (1, 1, 3, 3, 4)
    np.testing.assert_allclose(out.numpy().astype(np.float32), 1.0, atol=1e-3)


def test_proposal_generator_nms_is_per_level_and_keeps_top_scores():
    # Level P2 (2x2 grid of 1 anchor) and P3 (1x1). Anchors given directly; deltas 0 -> boxes = anchors.
    anchors = {"P2": np.array([[0, 0, 20, 20], [1, 1, 21, 21], [30, 30, 60, 60], [0, 40, 10, 50]], np.float32),
               "P3": np.array([[0, 0, 20, 20]], np.float32)}
    scores = {"P2": tf.constant([[[[3.0], [2.0]], [[1.0], [-1.0]]]]), "P3": tf.constant([[[[0.5]]]])}
    deltas = {"P2": tf.zeros([1, 2, 2, 4]), "P3": tf.zeros([1, 1, 1, 4])}
    layer = ProposalGenerator(pre_nms_top_k_test=4, post_nms_top_k_test=5, nms_iou=0.7)
    proposals, proposal_scores, valid = layer(scores, deltas, tf.constant(IMAGE_INFO), anchors=anchors)
    # P2 box 1 overlaps box 0 with IoU 361/439 = 0.82 > 0.7 -> suppressed. The identical P3 box survives
    # (NMS is per level). Box [0, 40, 10, 50] is kept. So 4 proposals, sorted by objectness.
    assert valid.numpy().tolist() == [[True, True, True, True, False]]
    np.testing.assert_allclose(proposal_scores.numpy()[0, :4], [3.0, 1.0, 0.5, -1.0])
    np.testing.assert_allclose(proposals.numpy()[0, :4],
                               [[0, 0, 20, 20], [30, 30, 60, 60], [0, 0, 20, 20], [0, 40, 10, 50]])
    np.testing.assert_allclose(proposals.numpy()[0, 4], 0.0)  # empty slot


def test_proposal_generator_clips_to_the_valid_image_and_drops_tiny_boxes():
    anchors = {"P2": np.array([[50, 50, 90, 90], [5, 5, 5.5, 30]], np.float32)}
    scores = {"P2": tf.constant([[[[2.0], [1.0]]]])}
    deltas = {"P2": tf.zeros([1, 1, 2, 4])}
    info = IMAGE_INFO.copy()
    info[0, 1] = [60, 64]  # valid region 60 rows x 64 columns
    layer = ProposalGenerator(post_nms_top_k_test=2, min_box_size=1.0)
    proposals, _, valid = layer(scores, deltas, tf.constant(info), anchors=anchors)
    assert valid.numpy().tolist() == [[True, False]]  # the 0.5-pixel-high box is removed
    np.testing.assert_allclose(proposals.numpy()[0, 0], [50, 50, 60, 64])


def test_anchor_labeler_targets_follow_the_rpn_rules():
    rng = np.random.default_rng(0)
    centers = rng.uniform(0, 64, size=(300, 2))
    sizes = rng.uniform(4, 40, size=(300, 2))
    anchors = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1).astype(np.float32)
    gt = np.array([[[10, 10, 40, 30], [35, 35, 60, 62], [-1, -1, -1, -1]]], np.float32)
    classes = np.array([[1, 2, -1]], np.int32)
    out = AnchorLabeler(batch_size_per_image=64, positive_fraction=0.5)(
        tf.constant(anchors), tf.constant(gt), tf.constant(classes))
    iou = box_iou(anchors, gt[0, :2])  # [300, 2]
    sampled, positive = out["sampled"].numpy()[0], out["positive"].numpy()[0]
    best_for_gt = iou.max(axis=0)
    allowed_positive = (iou.max(axis=1) >= 0.7) | np.any(iou == best_for_gt[None], axis=1)
    assert positive.any() and np.all(allowed_positive[positive])
    assert np.all(iou.max(axis=1)[sampled & ~positive] < 0.3 + 1e-6)  # sampled negatives are negatives
    assert sampled.sum() == min(64, sampled.sum()) and positive.sum() <= 32
    # Box targets of positives decode back to their matched gt box.
    decoded = box_ops.BoxCoder(weights=box_ops.RPN_BOX_WEIGHTS).decode(out["box_targets"], tf.constant(anchors[None]))
    matched = gt[0, iou.argmax(axis=1)]
    np.testing.assert_allclose(decoded.numpy()[0][positive], matched[positive], atol=1e-3)
    np.testing.assert_array_equal(out["objectness"].numpy()[0], positive.astype(np.float32))


def test_roi_sampler_counts_fractions_and_targets():
    rng = np.random.default_rng(1)
    gt = np.array([[[10, 10, 40, 30], [35, 35, 60, 62], [-1, -1, -1, -1]]], np.float32)
    classes = np.array([[3, 1, -1]], np.int32)
    # 40 jittered copies of the gt boxes (mostly foreground) and 60 random boxes (mostly background).
    jitter = np.repeat(gt[0, :2], 20, axis=0) + rng.uniform(-3, 3, size=(40, 4))
    corner = rng.uniform(0, 50, size=(60, 2))
    random_boxes = np.concatenate([corner, corner + rng.uniform(4, 14, size=(60, 2))], axis=1)
    proposals = np.concatenate([jitter, random_boxes]).astype(np.float32)[None]
    valid = np.ones([1, 100], bool)
    valid[0, -5:] = False  # invalid proposals must never be sampled
    out = RoISampler(num_samples=32, foreground_fraction=0.25)(
        tf.constant(proposals), tf.constant(valid), tf.constant(gt), tf.constant(classes))
    rois, fg, ok = out["rois"].numpy()[0], out["is_foreground"].numpy()[0], out["is_valid"].numpy()[0]
    assert ok.all() and fg.sum() == 8  # 25% of 32, enough foreground exists
    iou = box_iou(rois, gt[0, :2])
    assert np.all(iou.max(axis=1)[fg] >= 0.5) and np.all(iou.max(axis=1)[~fg] < 0.5)
    expected_class = classes[0, iou.argmax(axis=1)]
    np.testing.assert_array_equal(out["classes"].numpy()[0], np.where(fg, expected_class, 0))
    np.testing.assert_allclose(out["box_targets"].numpy()[0][fg], gt[0, iou.argmax(axis=1)][fg])
    invalid_rows = proposals[0, -5:]
    assert not any(np.all(np.isclose(rois, row), axis=1).any() for row in invalid_rows)


def test_roi_sampler_appended_gt_boxes_train_the_heads_without_proposals():
    gt = np.array([[[10, 10, 40, 30], [-1, -1, -1, -1]]], np.float32)
    out = RoISampler(num_samples=8)(tf.zeros([1, 4, 4]), tf.zeros([1, 4], tf.bool), tf.constant(gt),
                                    tf.constant([[2, -1]], tf.int32))
    fg = out["is_foreground"].numpy()[0]
    assert fg.sum() == 1 and out["classes"].numpy()[0][fg].tolist() == [2]
    assert out["is_valid"].numpy().sum() == 1  # nothing else is a candidate: the rest are empty slots


def _np_detections(logits, deltas, rois, height, width, score_threshold, nms_iou, max_detections):
    """Fast R-CNN inference from the definition: per class softmax score, class box, greedy NMS."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    num_classes = logits.shape[-1] - 1
    detections = []
    for c in range(1, num_classes + 1):
        d = deltas[:, 4 * c:4 * c + 4].astype(np.float64) / np.array([10, 10, 5, 5])
        h, w = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
        cy, cx = rois[:, 0] + 0.5 * h, rois[:, 1] + 0.5 * w
        dh, dw = np.minimum(d[:, 2], np.log(1000 / 16)), np.minimum(d[:, 3], np.log(1000 / 16))
        ncy, ncx, nh, nw = cy + d[:, 0] * h, cx + d[:, 1] * w, h * np.exp(dh), w * np.exp(dw)
        boxes = np.stack([ncy - nh / 2, ncx - nw / 2, ncy + nh / 2, ncx + nw / 2], -1)
        boxes = np.clip(boxes, 0, [height, width, height, width])
        keep = probs[:, c] > score_threshold
        idx = np.nonzero(keep)[0]
        for k in _np_greedy_nms(boxes[idx], probs[idx, c], nms_iou):
            detections.append((probs[idx[k], c], c, boxes[idx[k]]))
    detections.sort(key=lambda t: -t[0])
    return detections[:max_detections]


def test_detection_generator_matches_numpy_fast_rcnn_inference():
    rng = np.random.default_rng(2)
    num_rois, num_classes = 40, 3
    corner = rng.uniform(0, 48, size=(num_rois, 2))
    rois = np.concatenate([corner, corner + rng.uniform(4, 30, size=(num_rois, 2))], 1).astype(np.float32)
    logits = rng.normal(scale=2.0, size=(num_rois, num_classes + 1)).astype(np.float32)
    deltas = rng.normal(scale=0.5, size=(num_rois, 4 * (num_classes + 1))).astype(np.float32)
    layer = DetectionGenerator(score_threshold=0.2, nms_iou=0.5, max_detections=15,
                               pre_nms_top_k=num_rois * num_classes)  # keep every candidate
    out = layer(tf.constant(logits[None]), tf.constant(deltas[None]), tf.constant(rois[None]),
                tf.ones([1, num_rois], tf.bool), tf.constant(IMAGE_INFO))
    expected = _np_detections(logits, deltas, rois, 64, 64, 0.2, 0.5, 15)
    n = int(out["num_detections"][0])
    assert n == len(expected) and n > 5
    np.testing.assert_allclose(out["detection_scores"].numpy()[0, :n], [e[0] for e in expected], rtol=1e-5)
    np.testing.assert_array_equal(out["detection_classes"].numpy()[0, :n], [e[1] for e in expected])
    np.testing.assert_allclose(out["detection_boxes"].numpy()[0, :n], [e[2] for e in expected], atol=1e-3)
    assert np.all(out["detection_classes"].numpy()[0, n:] == 0)


def test_detection_generator_ignores_invalid_rois():
    logits = np.zeros([1, 4, 3], np.float32)
    logits[..., 1] = 5.0  # every RoI very confident in class 1
    rois = np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 30, 10, 40]]], np.float32)
    valid = np.array([[True, False, True, False]])
    out = DetectionGenerator(max_detections=4)(tf.constant(logits), tf.zeros([1, 4, 12]), tf.constant(rois),
                                               tf.constant(valid), tf.constant(IMAGE_INFO))
    assert int(out["num_detections"][0]) == 2
    np.testing.assert_allclose(np.sort(out["detection_boxes"].numpy()[0, :2, 0]), [0, 40])
