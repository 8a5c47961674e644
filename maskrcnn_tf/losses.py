"""Mask R-CNN losses: pure functions, float32, each divided by an explicit normalizer.

Every loss is a *sum* over the local (per-replica) batch divided by a normalizer that the caller
computes for the GLOBAL batch (all replicas). Gradients are summed over replicas, so N replicas give
exactly the update of one replica with the same global batch. Normalizers (detectron2's choices):

  rpn objectness   BCE summed over sampled anchors        / (global images * rpn batch_size_per_image)
  rpn box          L1 (or smooth L1) over positive anchors / (global images * rpn batch_size_per_image)
  rcnn class       softmax CE over sampled RoIs           / (global images * RoIs sampled per image)
  rcnn box         L1 over foreground RoIs, the gt class's deltas only
                                                          / (global images * RoIs sampled per image)
  mask             per-pixel BCE over foreground mask RoIs / (global count of those RoIs * M * M)

Box losses use L1 when beta == 0 (detectron2's default) and smooth L1 with that beta otherwise
(`tf.keras.losses.Huber(delta)` equals delta * smooth_l1(beta=delta)).
"""

import tensorflow as tf


def _box_regression_loss(diff, beta):
    """Elementwise L1 (beta == 0) or smooth L1 of `diff`."""
    abs_diff = tf.abs(diff)
    if beta <= 0.0:
        return abs_diff
    return tf.where(abs_diff < beta, 0.5 * tf.square(diff) / beta, abs_diff - 0.5 * beta)


def rpn_objectness_loss(logits, targets, sampled, normalizer):
    """logits float [B, A], targets float32 [B, A] in {0, 1}, sampled bool [B, A] -> scalar float32."""
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(tf.where(sampled, bce, 0.0)) / normalizer


def rpn_box_loss(deltas, targets, positive, normalizer, beta=0.0):
    """deltas float [B, A, 4], targets float32 [B, A, 4] ([dy, dx, dh, dw]), positive bool [B, A]."""
    loss = _box_regression_loss(tf.cast(deltas, tf.float32) - targets, beta)  # [B, A, 4]
    return tf.reduce_sum(tf.where(positive[..., None], loss, 0.0)) / normalizer


def rcnn_class_loss(logits, classes, valid, normalizer):
    """logits float [B, S, K + 1], classes int32 [B, S] (0 = background), valid bool [B, S]."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=classes, logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(tf.where(valid, ce, 0.0)) / normalizer


def rcnn_box_loss(deltas, classes, targets, foreground, normalizer, beta=0.0):
    """deltas float [B, S, (K + 1) * 4] class-specific, classes int32 [B, S], targets float32 [B, S, 4]
    ([dy, dx, dh, dw], weights 10, 10, 5, 5), foreground bool [B, S]. Only the gt class's 4 deltas count."""
    batch, num_rois = tf.shape(deltas)[0], tf.shape(deltas)[1]
    per_class = tf.reshape(tf.cast(deltas, tf.float32), [batch, num_rois, -1, 4])  # [B, S, K + 1, 4]
    chosen = tf.gather(per_class, classes, batch_dims=2)  # [B, S, 4]
    loss = _box_regression_loss(chosen - targets, beta)
    return tf.reduce_sum(tf.where(foreground[..., None], loss, 0.0)) / normalizer


def mask_loss(logits, targets, weights, normalizer):
    """logits float [B, S, M, M], targets float32 [B, S, M, M] in {0, 1}, weights float32 [B, S]
    (1 for foreground RoIs of images with masks). normalizer: M * M when the caller divides by the global
    sum of weights afterwards (model.compute_losses), or that sum times M * M."""
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(bce * weights[:, :, None, None]) / normalizer
