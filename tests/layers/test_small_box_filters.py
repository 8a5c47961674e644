"""Small-box filters as torchvision's remove_small_boxes: proposals and detections are kept when width AND height
are >= min_box_size (torchvision: 1e-3 for proposals, 1e-2 for detections); min_box_size 0 keeps today's rule
(proposals: both sides > 0; detections: no filter)."""
import numpy as np
import tensorflow as tf

from maskrcnn_tf.layers.detection_generator import DetectionGenerator
from maskrcnn_tf.layers.proposal_generator import ProposalGenerator

IMAGE_INFO = np.array([[[64, 64], [64, 64], [1, 1], [0, 0]]], np.float32)


def _proposals(anchors, min_box_size):
    scores = {"P2": tf.constant(np.arange(len(anchors), 0, -1, dtype=np.float32).reshape(1, 1, -1, 1))}
    deltas = {"P2": tf.zeros([1, 1, len(anchors), 4])}
    layer = ProposalGenerator(post_nms_top_k_test=len(anchors), min_box_size=min_box_size, nms_iou=1.0)
    _, _, valid = layer(scores, deltas, tf.constant(IMAGE_INFO), anchors={"P2": np.asarray(anchors, np.float32)})
    return valid.numpy()[0].tolist()


def test_proposal_sides_at_the_threshold_are_kept():
    # heights 0.5 (exactly the threshold), 0.25 (below), 0 (empty); all 10 wide.
    anchors = [[10, 10, 10.5, 20], [30, 10, 30.25, 20], [40, 10, 40, 20]]
    assert _proposals(anchors, 0.5) == [True, False, False]
    assert _proposals(anchors, 0.0) == [True, True, False]  # default: only empty boxes go


def test_detection_min_box_size_drops_small_detections():
    logits = np.zeros([1, 3, 2], np.float32)
    logits[..., 1] = 4.0  # every RoI confident in class 1
    rois = np.array([[[0, 0, 10, 10], [20, 20, 20.25, 30], [40, 40, 40.5, 50]]], np.float32)  # heights 10, 0.25, 0.5
    args = (tf.constant(logits), tf.zeros([1, 3, 8]), tf.constant(rois), tf.ones([1, 3], tf.bool),
            tf.constant(IMAGE_INFO))
    kept = DetectionGenerator(max_detections=3, min_box_size=0.5)(*args)
    assert int(kept["num_detections"][0]) == 2
    np.testing.assert_allclose(np.sort(kept["detection_boxes"].numpy()[0, :2, 0]), [0, 40])
    assert int(DetectionGenerator(max_detections=3)(*args)["num_detections"][0]) == 3
