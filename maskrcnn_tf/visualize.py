"""Draw detections (translucent masks with contours, boxes, "name 0.93" labels) on an RGB image.

Decisions:
- Colours are a fixed function of the class id: hues stepped by the golden ratio (successive classes get
  far-apart hues) at fixed saturation/value, so the same class has the same colour in every picture.
- Drawing order: masks first (so boxes and labels stay readable on top), lowest score first (so the
  best detection ends on top where they overlap).
- A mask pixel is drawn when its probability is >= `MASK_THRESHOLD` (the evaluation threshold); it is
  blended as (1 - MASK_ALPHA) * pixel + MASK_ALPHA * colour and outlined with its contour.
- Class names: `class_names[c - 1]` for contiguous class c (1..K), as `DataConfig.class_names`; the
  number itself when no name is given.
- OpenCV only (opencv-python-headless): works on servers without GUI libraries. The input is not modified.
"""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import cv2
import numpy as np

from maskrcnn_tf.config import MASK_THRESHOLD  # the evaluation threshold (config.py has no TF imports)
MASK_ALPHA = 0.45
BOX_THICKNESS = 2
CONTOUR_THICKNESS = 1
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.45
FONT_THICKNESS = 1
LABEL_PADDING = 2  # pixels around the label text
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_SATURATION, _VALUE = 0.75, 0.95
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)
# Label text is black on backgrounds brighter than this (Rec. 601 luma, 0..255), else white.
_DARK_TEXT_LUMA = 150


def _text_color(background) -> tuple:
    r, g, b = background
    return _BLACK if 0.299 * r + 0.587 * g + 0.114 * b > _DARK_TEXT_LUMA else _WHITE


def class_color(class_id: int) -> tuple:
    """Deterministic RGB colour (3 ints in 0..255) of a class id."""
    hue = (class_id * _GOLDEN_RATIO_CONJUGATE) % 1.0
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, _SATURATION, _VALUE))


def _label_text(class_id: int, score: float, class_names: Sequence[str]) -> str:
    name = class_names[class_id - 1] if 1 <= class_id <= len(class_names) else str(class_id)
    return f"{name} {score:.2f}"


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    scores: np.ndarray,
    masks: Optional[np.ndarray] = None,
    class_names: Sequence[str] = (),
    score_threshold: float = 0.5,
) -> np.ndarray:
    """Returns a copy of `image` with the detections scoring >= score_threshold drawn on it.

    Args:
      image: uint8 [H, W, 3] RGB.
      boxes: float [n, 4] `[y1, x1, y2, x2]` pixels of `image` (continuous coordinates).
      classes: int [n] contiguous class ids 1..K.
      scores: float [n].
      masks: float [n, H, W] mask probabilities pasted at the image size, or None (boxes only).
      class_names: K names; class c is labelled `class_names[c - 1]`.
      score_threshold: detections below it are not drawn.
    Returns:
      uint8 [H, W, 3] RGB.
    """
    canvas = np.ascontiguousarray(image, dtype=np.uint8).copy()
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, np.float64).reshape(-1)
    order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold]

    if masks is not None:
        masks = np.asarray(masks)
        for i in order:
            binary = masks[i] >= MASK_THRESHOLD  # [H, W]
            if not binary.any():
                continue
            color = np.array(class_color(classes[i]), np.float64)
            blended = (1.0 - MASK_ALPHA) * canvas[binary] + MASK_ALPHA * color
            canvas[binary] = np.round(blended).astype(np.uint8)
            contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(canvas, contours, -1, class_color(classes[i]), CONTOUR_THICKNESS)

    height, width = canvas.shape[:2]
    for i in order:
        color = class_color(classes[i])
        y1, x1, y2, x2 = boxes[i]
        # Continuous [x1, x2) -> inclusive pixel corners for cv2.
        left, top = int(np.floor(x1)), int(np.floor(y1))
        right, bottom = max(left, int(np.ceil(x2)) - 1), max(top, int(np.ceil(y2)) - 1)
        cv2.rectangle(canvas, (left, top), (right, bottom), color, BOX_THICKNESS)

        text = _label_text(int(classes[i]), float(scores[i]), class_names)
        (text_w, text_h), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, FONT_THICKNESS)
        label_h = text_h + baseline + 2 * LABEL_PADDING
        # Above the box when there is room, else just inside its top edge.
        label_top = top - label_h if top - label_h >= 0 else top
        label_left = min(max(left, 0), max(width - text_w - 2 * LABEL_PADDING, 0))
        cv2.rectangle(canvas, (label_left, label_top),
                      (label_left + text_w + 2 * LABEL_PADDING, label_top + label_h), color, cv2.FILLED)
        cv2.putText(canvas, text, (label_left + LABEL_PADDING, label_top + LABEL_PADDING + text_h),
                    FONT, FONT_SCALE, _text_color(color), FONT_THICKNESS, cv2.LINE_AA)
    return canvas
