"""RoISampler: picks a fixed number of training RoIs per image and their targets (Fast R-CNN stage).

Candidates are the proposals plus the gt boxes themselves (detectron2 appends gt so that the heads see
perfect boxes from the first step on, when the RPN is still random). Each candidate is matched to the
gt with the highest IoU: foreground if IoU >= foreground_iou, background if IoU in
[background_iou_low, background_iou_high), ignored otherwise. `num_samples` RoIs are drawn with at most
`foreground_fraction` foreground, uniformly at random (static shapes, ops.sampling).

Shapes: B batch, R proposals, N padded gt, S = num_samples.
No gradient flows into the sampled boxes (they are targets' geometry, not predictions).
Randomness and the test hook `sampler`: as in layers/anchor_labeler.py; the sampler's indices point
into the candidates (proposals, then gt boxes).
"""

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.ops import boxes as box_ops
from maskrcnn_tf.ops import matching
from maskrcnn_tf.ops import sampling

_IGNORE = -1


_ROI = config_lib.RoIConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class RoISampler(keras.layers.Layer):
    """Samples RoIs and assigns them gt classes and boxes.

    call(proposals float32 [B, R, 4], proposal_valid bool [B, R], gt_boxes float32 [B, N, 4] (-1 padded),
    gt_classes int32 [B, N] (1..K, -1 padded), seed=None (int [2], stateless draw)) -> dict:
      rois              float32 [B, S, 4]  [y1, x1, y2, x2] pixels
      classes           int32   [B, S]     matched gt class for foreground, 0 for background
      box_targets       float32 [B, S, 4]  the matched gt box (meaningful for foreground only)
      matched_gt_index  int32   [B, S]     index into N (meaningful for foreground only)
      is_foreground     bool    [B, S]
      is_valid          bool    [B, S]     False for slots left empty (too few candidates)
    """

    def __init__(self, *, num_samples=_ROI.num_samples, foreground_fraction=_ROI.foreground_fraction,
                 foreground_iou=_ROI.foreground_iou, background_iou_high=_ROI.background_iou_high,
                 background_iou_low=_ROI.background_iou_low, append_gt_boxes=True, **kwargs):
        super().__init__(**kwargs)
        self.num_samples = num_samples
        self.foreground_fraction = foreground_fraction
        self.foreground_iou = foreground_iou
        self.background_iou_high = background_iou_high
        self.background_iou_low = background_iou_low
        self.append_gt_boxes = append_gt_boxes
        self.sampler = sampling.balanced_sample

    def call(self, proposals, proposal_valid, gt_boxes, gt_classes, seed=None):
        gt_valid = gt_classes > 0  # [B, N]
        candidates, candidate_valid = proposals, proposal_valid
        if self.append_gt_boxes:
            candidates = tf.concat([proposals, gt_boxes], axis=1)  # [B, R + N, 4]
            candidate_valid = tf.concat([proposal_valid, gt_valid], axis=1)  # [B, R + N]
        candidates = tf.stop_gradient(candidates)

        iou = box_ops.pairwise_iou(candidates, gt_boxes)  # [B, R + N, N]
        matched_gt_index, labels = matching.match(
            iou, gt_valid, positive_threshold=self.foreground_iou,
            negative_threshold=self.background_iou_high, allow_low_quality_matches=False)
        best_iou = tf.reduce_max(tf.where(gt_valid[:, None, :], iou, 0.0), axis=-1)  # [B, R + N]
        too_far = (labels == 0) & (best_iou < self.background_iou_low)
        labels = tf.where(too_far | ~candidate_valid, _IGNORE, labels)

        index, _, is_valid = self.sampler(labels, self.num_samples, self.foreground_fraction, seed)  # [B, S]
        # Foreground by the label of the chosen row, so a forced sampler cannot contradict the matching.
        is_foreground = is_valid & tf.equal(tf.gather(labels, index, batch_dims=1), 1)  # [B, S]
        rois = tf.gather(candidates, index, batch_dims=1)  # [B, S, 4]
        matched = tf.gather(matched_gt_index, index, batch_dims=1)  # [B, S]
        gt_class_of_roi = tf.gather(gt_classes, matched, batch_dims=1)  # [B, S]
        return {
            "rois": rois,
            "classes": tf.where(is_foreground, gt_class_of_roi, 0),
            "box_targets": tf.gather(gt_boxes, matched, batch_dims=1),  # [B, S, 4]
            "matched_gt_index": matched,
            "is_foreground": is_foreground,
            "is_valid": is_valid,
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            num_samples=self.num_samples, foreground_fraction=self.foreground_fraction,
            foreground_iou=self.foreground_iou, background_iou_high=self.background_iou_high,
            background_iou_low=self.background_iou_low, append_gt_boxes=self.append_gt_boxes)
        return config
