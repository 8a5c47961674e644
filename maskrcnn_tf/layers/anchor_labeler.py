"""AnchorLabeler: RPN training targets, computed in the graph for the whole batch (static shapes).

Each anchor is matched to the gt box of highest IoU: positive if IoU >= positive_iou, negative if
IoU < negative_iou, ignored in between, and for every gt the anchors with its best IoU become
positive too (the paper's rule that gives every gt at least one anchor). `batch_size_per_image`
anchors per image are then sampled with at most `positive_fraction` positives (Faster R-CNN, section
3.1.3; detectron2 RPN defaults). No learned weights: it is a layer so that model.py reads as the figure.

Shapes: B batch, A anchors over all levels (concatenated P2..P6 in ops.anchors order), N padded gt.

Randomness: `seed` (int [2], see ops.sampling.sampling_seed) makes the draw reproducible; None draws
from TF's stateful RNG. `sampler` is the sampling function, ops.sampling.balanced_sample by default; a
test may replace it (before the first call: a traced step keeps the function it was traced with) to
force exact anchors, e.g. the ones another implementation drew. It has balanced_sample's signature and
returns its (indices [B, S], is_positive [B, S], is_valid [B, S]).
"""

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.ops import boxes as box_ops
from maskrcnn_tf.ops import matching
from maskrcnn_tf.ops import sampling


_RPN = config_lib.RPNConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class AnchorLabeler(keras.layers.Layer):
    """call(anchors float32 [A, 4], gt_boxes float32 [B, N, 4] (-1 padded), gt_classes int32 [B, N]
    (-1 padded), seed=None) -> dict:
      objectness   float32 [B, A]     1 for positive anchors, 0 otherwise
      box_targets  float32 [B, A, 4]  [dy, dx, dh, dw] of the matched gt (weights 1, 1, 1, 1)
      sampled      bool    [B, A]     anchors that enter the objectness loss
      positive     bool    [B, A]     sampled positives (enter the box loss)
    """

    def __init__(self, *, positive_iou=_RPN.positive_iou, negative_iou=_RPN.negative_iou,
                 batch_size_per_image=_RPN.batch_size_per_image, positive_fraction=_RPN.positive_fraction,
                 **kwargs):
        super().__init__(**kwargs)
        self.positive_iou = positive_iou
        self.negative_iou = negative_iou
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self._coder = box_ops.BoxCoder(weights=box_ops.RPN_BOX_WEIGHTS)
        self.sampler = sampling.balanced_sample

    def call(self, anchors, gt_boxes, gt_classes, seed=None):
        batch = tf.shape(gt_boxes)[0]
        anchors = tf.broadcast_to(anchors[None], [batch, anchors.shape[0], 4])  # [B, A, 4]
        gt_valid = gt_classes > 0  # [B, N]
        iou = box_ops.pairwise_iou(anchors, gt_boxes)  # [B, A, N]
        matched_gt_index, labels = matching.match(
            iou, gt_valid, positive_threshold=self.positive_iou, negative_threshold=self.negative_iou,
            allow_low_quality_matches=True)
        index, _, is_valid = self.sampler(labels, self.batch_size_per_image, self.positive_fraction, seed)
        sampled = sampling.indices_to_mask(index, is_valid, tf.shape(labels))  # [B, A]
        # A sampled anchor is positive by its label, so a forced sampler cannot contradict the matching.
        positive = sampled & (labels == 1)
        matched_boxes = tf.gather(gt_boxes, matched_gt_index, batch_dims=1)  # [B, A, 4]
        # Encode only where positive: unmatched rows may point at -1 padding boxes (log of <= 0).
        safe_boxes = tf.where(positive[..., None], matched_boxes, anchors)
        return {
            "objectness": tf.cast(positive, tf.float32),
            "box_targets": self._coder.encode(safe_boxes, anchors),
            "sampled": sampled,
            "positive": positive,
        }

    def get_config(self):
        config = super().get_config()
        config.update(positive_iou=self.positive_iou, negative_iou=self.negative_iou,
                      batch_size_per_image=self.batch_size_per_image,
                      positive_fraction=self.positive_fraction)
        return config
