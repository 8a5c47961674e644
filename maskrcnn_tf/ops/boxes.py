"""Box geometry: area, pairwise IoU, clipping, (de)normalisation and the delta coder.

Boxes are `[y1, x1, y2, x2]` float32 in continuous pixel coordinates (height = y2 - y1, no +1);
padded rows are -1 (package docstring). Every function broadcasts over leading dimensions.

Decisions beyond docs/design.md:
- A box is valid iff y2 > y1 and x2 > x1. Invalid boxes (padding rows, zero or negative extents) have
  area 0 and IoU 0 with everything, including themselves; IoU never divides by zero, so no NaN.
- `clip_boxes`, `normalize_boxes` and `denormalize_boxes` are plain arithmetic: they do not try to
  recognise padding. Padding rows stay invalid (zero area) but are no longer exactly -1 afterwards;
  re-pad with `tf.where(is_valid_box(...)...)` if a caller needs the -1 convention back.
- `BoxCoder.encode` guards degenerate boxes/anchors with a tiny minimum size, so deltas towards a padding
  row are finite (meaningless, but masked losses then stay NaN-free: 0 * NaN would poison gradients).
- `BoxCoder.decode` clamps only dh, dw (at log(1000/16), detectron2's `_DEFAULT_SCALE_CLAMP`), not
  dy, dx, and does not clip; callers clip to the image with `clip_boxes`.
- All math is done in float32 even when the inputs are float16/bfloat16 (mixed precision keeps box
  math in float32, docs/design.md section 10).
"""

import math

import tensorflow as tf

# Delta weights [wy, wx, wh, ww] (detectron2 / Faster R-CNN): RPN regresses raw deltas, the box head
# regresses deltas scaled up so that their spread is close to 1.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
RCNN_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest allowed log scale change: a box can grow at most 1000/16 times its anchor; prevents exp overflow.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
# Minimum height/width used by `encode` so that log() of a degenerate box stays finite.
_MIN_ENCODE_SIZE = 1e-6


def _as_float32(x):
    return tf.cast(x, tf.float32)


def _split(boxes):
    """[..., 4] -> four [...] tensors y1, x1, y2, x2."""
    return tf.unstack(boxes, num=4, axis=-1)


def _size_bounds(height_width, dtype):
    """height_width [..., 2] or (h, w) -> [..., 4] tensor (h, w, h, w)."""
    hw = tf.cast(height_width, dtype)
    return tf.concat([hw, hw], axis=-1)  # [..., 4]


def area(boxes):
    """Area of boxes.

    Args:
      boxes: float [..., 4] `[y1, x1, y2, x2]`.
    Returns:
      float32 [...]; boxes with negative extents (padding rows) give 0.
    """
    y1, x1, y2, x2 = _split(_as_float32(boxes))
    return tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)


def is_valid_box(boxes):
    """True for real boxes: y2 > y1 and x2 > x1 (False for -1 padding rows and degenerate boxes).

    Args:
      boxes: float [..., 4] `[y1, x1, y2, x2]`.
    Returns:
      bool [...].
    """
    y1, x1, y2, x2 = _split(boxes)
    return tf.logical_and(y2 > y1, x2 > x1)


def pairwise_iou(boxes1, boxes2):
    """Intersection over union of every pair of boxes of two sets, per batch element.

    Args:
      boxes1: float [B, N, 4] `[y1, x1, y2, x2]` (any leading dims, matching `boxes2`'s).
      boxes2: float [B, M, 4] `[y1, x1, y2, x2]`.
    Returns:
      float32 [B, N, M] in [0, 1]. Invalid boxes (see `is_valid_box`, incl. -1 padding) give 0, never NaN.
    """
    boxes1 = _as_float32(boxes1)[..., :, tf.newaxis, :]  # [B, N, 1, 4]
    boxes2 = _as_float32(boxes2)[..., tf.newaxis, :, :]  # [B, 1, M, 4]
    y1a, x1a, y2a, x2a = _split(boxes1)
    y1b, x1b, y2b, x2b = _split(boxes2)
    inter_h = tf.maximum(tf.minimum(y2a, y2b) - tf.maximum(y1a, y1b), 0.0)
    inter_w = tf.maximum(tf.minimum(x2a, x2b) - tf.maximum(x1a, x1b), 0.0)
    intersection = inter_h * inter_w  # [B, N, M]
    union = area(boxes1) + area(boxes2) - intersection  # [B, N, M]
    iou = tf.math.divide_no_nan(intersection, union)
    both_valid = tf.logical_and(is_valid_box(boxes1), is_valid_box(boxes2))  # [B, N, M]
    return tf.where(both_valid, iou, tf.zeros_like(iou))


def clip_boxes(boxes, height_width):
    """Clips boxes to the image rectangle [0, h] x [0, w].

    Args:
      boxes: float [..., 4] `[y1, x1, y2, x2]` absolute pixels.
      height_width: (h, w) python pair, or a tensor [..., 2] broadcastable to boxes' leading dims
        (e.g. [B, 1, 2] for boxes [B, R, 4]).
    Returns:
      float32 [..., 4]. Boxes fully outside become zero-area (invalid) boxes on the border.
    """
    boxes = _as_float32(boxes)
    return tf.minimum(tf.maximum(boxes, 0.0), _size_bounds(height_width, boxes.dtype))


def normalize_boxes(boxes, height_width):
    """Absolute pixel boxes -> 0..1 boxes (`_norm`), dividing y by h and x by w.

    Args:
      boxes: float [..., 4] `[y1, x1, y2, x2]` absolute pixels.
      height_width: (h, w) pair or tensor [..., 2] broadcastable as in `clip_boxes`.
    Returns:
      float32 [..., 4] normalised `[y1, x1, y2, x2]`.
    """
    boxes = _as_float32(boxes)
    return boxes / _size_bounds(height_width, boxes.dtype)


def denormalize_boxes(boxes_norm, height_width):
    """0..1 boxes -> absolute pixel boxes; the inverse of `normalize_boxes`.

    Args:
      boxes_norm: float [..., 4] normalised `[y1, x1, y2, x2]`.
      height_width: (h, w) pair or tensor [..., 2] broadcastable as in `clip_boxes`.
    Returns:
      float32 [..., 4] absolute pixel `[y1, x1, y2, x2]`.
    """
    boxes_norm = _as_float32(boxes_norm)
    return boxes_norm * _size_bounds(height_width, boxes_norm.dtype)


def _centers_sizes(boxes, min_size=0.0):
    y1, x1, y2, x2 = _split(boxes)
    h = tf.maximum(y2 - y1, min_size)
    w = tf.maximum(x2 - x1, min_size)
    return y1 + 0.5 * (y2 - y1), x1 + 0.5 * (x2 - x1), h, w


class BoxCoder:
    """Box <-> delta transform of R-CNN (Girshick et al. 2014, appendix C; Fast R-CNN 2015).

    With anchor centre (ya, xa) and size (ha, wa), box centre (y, x) and size (h, w), weights
    (wy, wx, wh, ww):
        dy = wy * (y - ya) / ha      dx = wx * (x - xa) / wa
        dh = wh * log(h / ha)        dw = ww * log(w / wa)
    `decode` inverts it, clamping dh / wh and dw / ww at `scale_clamp` before exp.
    """

    def __init__(self, weights=RPN_BOX_WEIGHTS, scale_clamp=DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 entries (wy, wx, wh, ww), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, boxes, anchors):
        """Regression targets that move `anchors` onto `boxes`.

        Args:
          boxes: float [..., 4] `[y1, x1, y2, x2]` target boxes (e.g. matched gt), absolute pixels.
          anchors: float [..., 4] `[y1, x1, y2, x2]` reference boxes, broadcastable with `boxes`.
        Returns:
          float32 [..., 4] deltas `[dy, dx, dh, dw]`; finite even for degenerate/padding boxes.
        """
        wy, wx, wh, ww = self.weights
        yb, xb, hb, wb = _centers_sizes(_as_float32(boxes), _MIN_ENCODE_SIZE)
        ya, xa, ha, wa = _centers_sizes(_as_float32(anchors), _MIN_ENCODE_SIZE)
        deltas = [
            wy * (yb - ya) / ha,
            wx * (xb - xa) / wa,
            wh * tf.math.log(hb / ha),
            ww * tf.math.log(wb / wa),
        ]
        return tf.stack(deltas, axis=-1)  # [..., 4]

    def decode(self, deltas, anchors):
        """Applies deltas to anchors.

        Args:
          deltas: float [..., 4] `[dy, dx, dh, dw]` (weighted, as produced by `encode` or a head).
          anchors: float [..., 4] `[y1, x1, y2, x2]` absolute pixels, broadcastable with `deltas`
            (e.g. [B, S, 1, 4] for class-specific deltas [B, S, K + 1, 4]).
        Returns:
          float32 [..., 4] `[y1, x1, y2, x2]` boxes, not clipped to the image.
        """
        wy, wx, wh, ww = self.weights
        dy, dx, dh, dw = _split(_as_float32(deltas))
        ya, xa, ha, wa = _centers_sizes(_as_float32(anchors))
        dh = tf.minimum(dh / wh, self.scale_clamp)
        dw = tf.minimum(dw / ww, self.scale_clamp)
        y = ya + dy / wy * ha
        x = xa + dx / wx * wa
        h = ha * tf.exp(dh)
        w = wa * tf.exp(dw)
        return tf.stack([y - 0.5 * h, x - 0.5 * w, y + 0.5 * h, x + 0.5 * w], axis=-1)  # [..., 4]
