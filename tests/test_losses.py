"""Losses: values against float64 NumPy written from the definitions, normalizers, masking."""
import numpy as np
import tensorflow as tf

from maskrcnn_tf import losses


def _sigmoid_bce(labels, logits):
    p = 1.0 / (1.0 + np.exp(-logits))
    return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


def test_rpn_objectness_loss_sums_sampled_only_and_divides_by_normalizer():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50))
    targets = (rng.random((2, 50)) > 0.5).astype(np.float64)
    sampled = rng.random((2, 50)) > 0.3
    expected = (_sigmoid_bce(targets, logits) * sampled).sum() / 512.0
    got = losses.rpn_objectness_loss(tf.constant(logits, tf.float32), tf.constant(targets, tf.float32),
                                     tf.constant(sampled), 512.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_box_losses_l1_and_smooth_l1():
    diff = np.array([[[0.05, -0.5, 2.0, -0.01]]])
    positive = np.array([[True]])
    l1 = losses.rpn_box_loss(tf.constant(diff, tf.float32), tf.zeros([1, 1, 4]), tf.constant(positive), 2.0)
    np.testing.assert_allclose(l1.numpy(), np.abs(diff).sum() / 2.0, rtol=1e-6)
    beta = 0.1
    # smooth L1(beta): 0.5 x^2 / beta if |x| < beta else |x| - beta / 2  (Fast R-CNN, with beta)
    smooth = np.where(np.abs(diff) < beta, 0.5 * diff**2 / beta, np.abs(diff) - 0.5 * beta).sum()
    got = losses.rpn_box_loss(tf.constant(diff, tf.float32), tf.zeros([1, 1, 4]), tf.constant(positive), 1.0, beta)
    np.testing.assert_allclose(got.numpy(), smooth, rtol=1e-5)
    # Huber(delta) == delta * smooth_l1(beta=delta); Keras' Huber averages the last axis (4).
    huber = tf.keras.losses.Huber(delta=beta, reduction="sum")(np.zeros((1, 4)), diff[0])
    np.testing.assert_allclose(4 * huber.numpy(), beta * smooth, rtol=1e-5)
    none = losses.rpn_box_loss(tf.constant(diff, tf.float32), tf.zeros([1, 1, 4]), tf.constant([[False]]), 1.0)
    assert none.numpy() == 0.0


def test_rcnn_box_loss_uses_only_the_gt_class_deltas():
    num_classes = 3  # K; deltas have (K + 1) * 4 columns
    deltas = np.zeros((1, 2, (num_classes + 1) * 4), np.float32)
    deltas[0, 0, 2 * 4:3 * 4] = [1, 2, 3, 4]  # RoI 0, class 2
    deltas[0, 0, 1 * 4:2 * 4] = 100.0  # another class: must not count
    deltas[0, 1, :] = 50.0  # RoI 1 is background: must not count
    got = losses.rcnn_box_loss(tf.constant(deltas), tf.constant([[2, 0]]), tf.zeros([1, 2, 4]),
                               tf.constant([[True, False]]), 4.0)
    np.testing.assert_allclose(got.numpy(), (1 + 2 + 3 + 4) / 4.0)


def test_rcnn_class_loss_matches_softmax_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 4))
    classes = rng.integers(0, 4, size=(2, 5))
    valid = np.ones((2, 5), bool)
    valid[1, 4] = False
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_p, classes[..., None], -1)[..., 0]
    expected = (ce * valid).sum() / 10.0
    got = losses.rcnn_class_loss(tf.constant(logits, tf.float32), tf.constant(classes, tf.int32),
                                 tf.constant(valid), 10.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_mask_loss_is_mean_bce_over_weighted_rois():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 3, 4, 4))
    targets = (rng.random((1, 3, 4, 4)) > 0.5).astype(np.float64)
    weights = np.array([[1.0, 0.0, 1.0]])
    expected = (_sigmoid_bce(targets, logits)[0, [0, 2]]).mean()
    got = losses.mask_loss(tf.constant(logits, tf.float32), tf.constant(targets, tf.float32),
                           tf.constant(weights, tf.float32), 2.0 * 16)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
