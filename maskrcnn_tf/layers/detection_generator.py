"""DetectionGenerator: box-head outputs -> final detections (score threshold, class-wise NMS, top D).

Every (RoI, class) pair is a candidate, as in detectron2's fast_rcnn_inference: softmax scores of the
K foreground classes, class-specific boxes decoded with weights (10, 10, 5, 5) and clipped to the valid
image. Decision: before NMS only the `pre_nms_top_k` best candidates over all classes are kept (a
static size; detectron2 keeps every candidate above the threshold, a dynamic count). A candidate
below rank pre_nms_top_k could only reach the final D if more than pre_nms_top_k - D better ones were
suppressed, so with pre_nms_top_k >> D the outputs are the same in practice. Class-wise NMS is one
padded NMS over boxes shifted by a class-dependent offset (boxes of different classes never overlap),
which keeps shapes static and needs no per-class loop.
`min_box_size` > 0 drops candidates whose clipped box has a side under it (torchvision's
remove_small_boxes(min_size=1e-2) on detections, sides >= min_size kept); 0 keeps every box.

Shapes: B batch, R RoIs, K foreground classes, D = max_detections.
"""

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.ops import boxes as box_ops
from maskrcnn_tf.ops import nms as nms_ops


_DETECTION = config_lib.DetectionConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class DetectionGenerator(keras.layers.Layer):
    """call(class_logits [B, R, K + 1], box_deltas [B, R, (K + 1) * 4], rois [B, R, 4], roi_valid bool
    [B, R], image_info [B, 4, 2]) -> dict:
      num_detections     int32   [B]
      detection_boxes    float32 [B, D, 4]  [y1, x1, y2, x2] pixels of the model input; padding -1
      detection_scores   float32 [B, D]     padding 0
      detection_classes  int32   [B, D]     contiguous 1..K; padding 0
    Detections are sorted by descending score.
    """

    def __init__(self, *, score_threshold=_DETECTION.score_threshold, nms_iou=_DETECTION.nms_iou,
                 max_detections=_DETECTION.max_detections, pre_nms_top_k=_DETECTION.pre_nms_top_k,
                 min_box_size=_DETECTION.min_box_size, **kwargs):
        super().__init__(**kwargs)
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.pre_nms_top_k = pre_nms_top_k
        self.min_box_size = min_box_size
        self._coder = box_ops.BoxCoder(weights=box_ops.RCNN_BOX_WEIGHTS)

    def call(self, class_logits, box_deltas, rois, roi_valid, image_info):
        batch = tf.shape(class_logits)[0]
        num_rois = int(class_logits.shape[1])
        num_classes = int(class_logits.shape[2]) - 1
        probs = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)[:, :, 1:]  # [B, R, K]
        probs = tf.where(roi_valid[:, :, None], probs, 0.0)
        deltas = tf.reshape(tf.cast(box_deltas, tf.float32), [batch, num_rois, num_classes + 1, 4])
        deltas = deltas[:, :, 1:, :]  # [B, R, K, 4]
        boxes = self._coder.decode(deltas, rois[:, :, None, :])  # [B, R, K, 4]
        boxes = box_ops.clip_boxes(boxes, image_info[:, 1:2, None, :])

        if self.min_box_size > 0:
            large = ((boxes[..., 2] - boxes[..., 0] >= self.min_box_size)
                     & (boxes[..., 3] - boxes[..., 1] >= self.min_box_size))  # [B, R, K]
            probs = tf.where(large, probs, 0.0)  # 0 never passes the score threshold (> it)
        flat_scores = tf.reshape(probs, [batch, num_rois * num_classes])  # [B, R * K]
        flat_boxes = tf.reshape(boxes, [batch, num_rois * num_classes, 4])  # [B, R * K, 4]
        k = min(self.pre_nms_top_k, num_rois * num_classes)
        scores, index = tf.math.top_k(flat_scores, k=k)  # [B, k]
        boxes = tf.gather(flat_boxes, index, batch_dims=1)  # [B, k, 4]
        classes = index % num_classes + 1  # [B, k], flat index = roi * K + (class - 1)

        # Class-wise NMS as one NMS: shift each class's boxes beyond every clipped coordinate.
        offset = tf.reduce_max(image_info[:, 1, :]) + 1.0
        shifted = boxes + tf.cast(classes, tf.float32)[..., None] * offset
        max_out = min(self.max_detections, k)
        keep, num_detections = nms_ops.batched_nms(
            shifted, scores, max_output_size=max_out, iou_threshold=self.nms_iou,
            score_threshold=self.score_threshold)
        valid = tf.range(max_out)[None, :] < num_detections[:, None]  # [B, D]
        detection_boxes = tf.where(valid[..., None], tf.gather(boxes, keep, batch_dims=1), -1.0)
        detection_scores = tf.where(valid, tf.gather(scores, keep, batch_dims=1), 0.0)
        detection_classes = tf.where(valid, tf.gather(classes, keep, batch_dims=1), 0)
        if max_out < self.max_detections:  # fewer candidates than D: pad to the static D
            pad = self.max_detections - max_out
            detection_boxes = tf.pad(detection_boxes, [[0, 0], [0, pad], [0, 0]], constant_values=-1.0)
            detection_scores = tf.pad(detection_scores, [[0, 0], [0, pad]])
            detection_classes = tf.pad(detection_classes, [[0, 0], [0, pad]])
        return {
            "num_detections": tf.cast(num_detections, tf.int32),
            "detection_boxes": detection_boxes,
            "detection_scores": detection_scores,
            "detection_classes": tf.cast(detection_classes, tf.int32),
        }

    def get_config(self):
        config = super().get_config()
        config.update(score_threshold=self.score_threshold, nms_iou=self.nms_iou,
                      max_detections=self.max_detections, pre_nms_top_k=self.pre_nms_top_k,
                      min_box_size=self.min_box_size)
        return config
