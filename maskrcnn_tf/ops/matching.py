"""Matcher: similarity (IoU) of rows (anchors or RoIs) to gt columns -> matched gt index + label.

Semantics of detectron2's `Matcher` with thresholds [negative, positive]:
    label 1 (positive)  if max IoU >= positive_threshold
    label 0 (negative)  if max IoU <  negative_threshold
    label -1 (ignore)   otherwise.
With `allow_low_quality_matches` (RPN, Faster R-CNN section 3.1.2), for every valid gt the rows whose
IoU equals that gt's best IoU become positive (ties included), so every gt gets at least one anchor
even when no anchor reaches the positive threshold. The matched index of such a row stays its own
argmax over gt (as detectron2 / torchvision), not necessarily the gt that rescued it.

Decisions beyond docs/design.md:
- Padded gt columns (gt_valid False) are never matched and never rescue rows.
- A gt whose best IoU is 0 (e.g. it overlaps no anchor) rescues nothing, otherwise every row would
  become positive for it.
- Ties in the argmax over gt go to the lowest gt index, computed explicitly (tf.argmax leaves ties
  unspecified, and results must not depend on the device).
- No valid gt: every row is negative (0) with matched index 0; callers mask targets by label.
"""

import tensorflow as tf

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


def match(similarity, gt_valid, positive_threshold, negative_threshold, allow_low_quality_matches):
    """Assigns each row to its best valid gt column and labels it.

    Args:
      similarity: float [B, M, N], rows = anchors or RoIs, columns = gt (IoU, >= 0).
      gt_valid: bool [B, N], False for padded gt rows.
      positive_threshold: python float, rows with max IoU >= it are positive.
      negative_threshold: python float <= positive_threshold, rows with max IoU < it are negative.
      allow_low_quality_matches: python bool, rescue the best rows of every gt (see module docstring).
    Returns:
      matched_gt_index: int32 [B, M], argmax over valid gt (lowest index on ties; 0 without valid gt).
      labels: int32 [B, M], 1 positive, 0 negative, -1 ignore.
    """
    if negative_threshold > positive_threshold:
        raise ValueError(f"negative_threshold {negative_threshold} > positive_threshold {positive_threshold}")
    similarity = tf.cast(similarity, tf.float32)
    num_gt = tf.shape(similarity)[2]
    valid = gt_valid[:, tf.newaxis, :]  # [B, 1, N]
    # Padded columns get the lowest float so they lose every max; with no valid gt the max is this
    # sentinel, which is below any threshold, so all rows end up negative.
    lowest = tf.float32.min
    masked = tf.where(valid, similarity, lowest)  # [B, M, N]
    matched_value = tf.reduce_max(masked, axis=2)  # [B, M]
    is_max = tf.equal(masked, matched_value[:, :, tf.newaxis])  # [B, M, N]
    column = tf.range(num_gt, dtype=tf.int32)[tf.newaxis, tf.newaxis, :]  # [1, 1, N]
    matched_gt_index = tf.reduce_min(tf.where(is_max, column, num_gt), axis=2)  # [B, M]
    matched_gt_index = tf.minimum(matched_gt_index, tf.maximum(num_gt - 1, 0))  # N == 0 guard; no-op otherwise

    labels = tf.where(
        matched_value >= positive_threshold,
        POSITIVE,
        tf.where(matched_value < negative_threshold, NEGATIVE, IGNORE),
    )  # [B, M]
    if allow_low_quality_matches:
        best_per_gt = tf.reduce_max(masked, axis=1, keepdims=True)  # [B, 1, N]
        rescues = tf.logical_and(tf.equal(masked, best_per_gt), best_per_gt > 0.0)
        rescues = tf.logical_and(rescues, valid)  # [B, M, N]
        labels = tf.where(tf.reduce_any(rescues, axis=2), POSITIVE, labels)
    return tf.cast(matched_gt_index, tf.int32), tf.cast(labels, tf.int32)
