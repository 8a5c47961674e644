"""ProposalGenerator: RPN outputs -> a fixed number of proposals per image (detectron2 RPN semantics).

Per level: keep the top `pre_nms_top_k` anchors by objectness, decode their deltas (weights 1,1,1,1),
clip to the valid (unpadded) image, drop empty boxes and those with a side under `min_box_size`
(torchvision's remove_small_boxes keeps sides >= min_size; its min_size is 1e-3). Then NMS (IoU `nms_iou`)
runs *per level*, as detectron2 does, done in one padded batched NMS by shifting each level's boxes by
a level-dependent offset so that boxes of different levels never overlap. The best `post_nms_top_k`
survivors over all levels are the proposals.

Shapes: B batch, A per-location anchors, R = post_nms_top_k proposals.
Proposals carry no gradient (stop_gradient): detectron2 and the paper's approximate joint training.
Slots left empty (fewer survivors than R) have `proposal_valid` False and box [0, 0, 0, 0].
"""

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.ops import boxes as box_ops
from maskrcnn_tf.ops import nms as nms_ops

# Objectness given to removed candidates (tiny boxes); far below any real logit, still finite so that
# NMS and top-k see ordinary numbers.
_REMOVED_SCORE = -1e9


_RPN = config_lib.RPNConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class ProposalGenerator(keras.layers.Layer):
    """Turns per-level objectness logits and deltas into proposals.

    Inputs (call): scores {"P2": [B, H_l, W_l, A]}, deltas {"P2": [B, H_l, W_l, A * 4]}, image_info
    float32 [B, 4, 2] (row 1 = valid (h, w) used for clipping), keyword anchors {"P2": [H_l * W_l * A, 4]}
    ([y1, x1, y2, x2] pixels).
    Returns: proposals float32 [B, R, 4] ([y1, x1, y2, x2] pixels), proposal_scores float32 [B, R]
    (objectness logits), proposal_valid bool [B, R].
    """

    def __init__(self, *, pre_nms_top_k_train=_RPN.pre_nms_top_k_train,
                 post_nms_top_k_train=_RPN.post_nms_top_k_train, pre_nms_top_k_test=_RPN.pre_nms_top_k_test,
                 post_nms_top_k_test=_RPN.post_nms_top_k_test, nms_iou=_RPN.nms_iou,
                 min_box_size=_RPN.min_box_size, **kwargs):
        super().__init__(**kwargs)
        self.pre_nms_top_k_train = pre_nms_top_k_train
        self.post_nms_top_k_train = post_nms_top_k_train
        self.pre_nms_top_k_test = pre_nms_top_k_test
        self.post_nms_top_k_test = post_nms_top_k_test
        self.nms_iou = nms_iou
        self.min_box_size = min_box_size
        self._coder = box_ops.BoxCoder(weights=box_ops.RPN_BOX_WEIGHTS)

    def call(self, scores, deltas, image_info, *, anchors, training=False):
        pre_k = self.pre_nms_top_k_train if training else self.pre_nms_top_k_test
        post_k = self.post_nms_top_k_train if training else self.post_nms_top_k_test
        valid_hw = image_info[:, 1:2, :]  # [B, 1, 2]
        # Shift per level larger than any clipped coordinate so levels never suppress each other.
        level_offset = tf.reduce_max(image_info[:, 1, :]) + 1.0
        level_boxes, level_scores, level_shifted = [], [], []
        for i, level in enumerate(sorted(scores)):
            batch = tf.shape(scores[level])[0]
            logits = tf.reshape(tf.cast(scores[level], tf.float32), [batch, -1])  # [B, H_l * W_l * A]
            level_deltas = tf.reshape(tf.cast(deltas[level], tf.float32), [batch, -1, 4])  # [B, H_l*W_l*A, 4]
            k = min(pre_k, int(anchors[level].shape[0]))
            top_logits, top_index = tf.math.top_k(logits, k=k, sorted=False)  # [B, k]
            top_deltas = tf.gather(level_deltas, top_index, batch_dims=1)  # [B, k, 4]
            top_anchors = tf.gather(tf.convert_to_tensor(anchors[level], tf.float32), top_index)  # [B, k, 4]
            boxes = box_ops.clip_boxes(self._coder.decode(top_deltas, top_anchors), valid_hw)
            height = boxes[..., 2] - boxes[..., 0]
            width = boxes[..., 3] - boxes[..., 1]
            # A zero-size box can never be an object; min_box_size=0 still removes those.
            keep = (height > 0.0) & (width > 0.0)
            if self.min_box_size > 0:
                keep &= (height >= self.min_box_size) & (width >= self.min_box_size)
            top_logits = tf.where(keep, top_logits, _REMOVED_SCORE)
            level_boxes.append(boxes)
            level_scores.append(top_logits)
            level_shifted.append(boxes + level_offset * float(i))
        boxes = tf.stop_gradient(tf.concat(level_boxes, axis=1))  # [B, sum_k, 4]
        logits = tf.stop_gradient(tf.concat(level_scores, axis=1))  # [B, sum_k]
        shifted = tf.stop_gradient(tf.concat(level_shifted, axis=1))  # [B, sum_k, 4]

        post_k = min(post_k, int(boxes.shape[1]))
        keep_index, num_valid = nms_ops.batched_nms(
            shifted, logits, max_output_size=post_k, iou_threshold=self.nms_iou,
            score_threshold=_REMOVED_SCORE / 2)
        proposal_valid = tf.range(post_k)[None, :] < num_valid[:, None]  # [B, R]
        proposals = tf.gather(boxes, keep_index, batch_dims=1)  # [B, R, 4]
        proposal_scores = tf.gather(logits, keep_index, batch_dims=1)  # [B, R]
        proposals = tf.where(proposal_valid[..., None], proposals, 0.0)
        proposal_scores = tf.where(proposal_valid, proposal_scores, _REMOVED_SCORE)
        return proposals, proposal_scores, proposal_valid

    def get_config(self):
        config = super().get_config()
        config.update(
            pre_nms_top_k_train=self.pre_nms_top_k_train, post_nms_top_k_train=self.post_nms_top_k_train,
            pre_nms_top_k_test=self.pre_nms_top_k_test, post_nms_top_k_test=self.post_nms_top_k_test,
            nms_iou=self.nms_iou, min_box_size=self.min_box_size)
        return config
