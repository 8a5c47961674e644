"""The samplers' test hook (a `sampler` callable forcing exact rows) and train.seed in the model."""
import numpy as np
import tensorflow as tf

from maskrcnn_tf.layers.anchor_labeler import AnchorLabeler
from maskrcnn_tf.layers.roi_sampler import RoISampler
from maskrcnn_tf.model import build_model
from tests.e2e.synthetic import TWO_IMAGES, make_batch, tiny_test_config


def _forced(rows, num_slots):
    index = np.zeros((1, num_slots), np.int32)
    valid = np.zeros((1, num_slots), bool)
    index[0, :len(rows)], valid[0, :len(rows)] = rows, True
    return lambda labels, num_samples, fraction, seed: (tf.constant(index), tf.constant(valid), tf.constant(valid))


def test_anchor_labeler_takes_forced_rows_and_keeps_positives_by_label():
    anchors = tf.constant([[0, 0, 10, 10], [0, 0, 9, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 30, 30]],
                          tf.float32)
    gt_boxes = tf.constant([[[0, 0, 10, 10]]], tf.float32)
    labeler = AnchorLabeler(batch_size_per_image=4, positive_fraction=0.5)
    labeler.sampler = _forced([0, 2, 3], 4)  # the hook claims all three are positive
    out = labeler(anchors, gt_boxes, tf.constant([[1]]))
    np.testing.assert_array_equal(out["sampled"].numpy()[0], [True, False, True, True, False])
    # Only anchor 0 matches the gt (IoU 1); anchor 1 (IoU 0.9) is positive but was not taken.
    np.testing.assert_array_equal(out["positive"].numpy()[0], [True, False, False, False, False])


def test_roi_sampler_takes_forced_rows_in_order():
    proposals = tf.constant([[[0, 0, 10, 10], [50, 50, 60, 60], [1, 1, 10, 10], [70, 70, 90, 90]]], tf.float32)
    gt_boxes = tf.constant([[[0, 0, 10, 10]]], tf.float32)
    sampler = RoISampler(num_samples=4, foreground_fraction=0.5)
    sampler.sampler = _forced([3, 2, 4], 4)  # row 4 is the appended gt box
    out = sampler(proposals, tf.ones([1, 4], tf.bool), gt_boxes, tf.constant([[2]]))
    np.testing.assert_allclose(out["rois"].numpy()[0, :3], [[70, 70, 90, 90], [1, 1, 10, 10], [0, 0, 10, 10]])
    np.testing.assert_array_equal(out["is_valid"].numpy()[0], [True, True, True, False])
    np.testing.assert_array_equal(out["is_foreground"].numpy()[0], [False, True, True, False])
    np.testing.assert_array_equal(out["classes"].numpy()[0, :3], [0, 2, 2])


def test_train_seed_makes_the_losses_a_function_of_the_step():
    cfg = tiny_test_config(**{"train.seed": 11, "data.train_batch_size": 2})
    model = build_model(cfg)
    data, _ = make_batch(cfg, TWO_IMAGES)
    data = {k: tf.constant(v) for k, v in data.items()}
    first = {k: float(v) for k, v in model.compute_losses(data).items()}
    again = {k: float(v) for k, v in model.compute_losses(data).items()}
    assert first == again  # the same step draws the same anchors and RoIs
    model.sampling_seed = 12  # another seed (or another step): other anchors and RoIs
    other = {k: float(v) for k, v in model.compute_losses(data).items()}
    assert other["rpn_cls_loss"] != first["rpn_cls_loss"] and other["rcnn_cls_loss"] != first["rcnn_cls_loss"]
