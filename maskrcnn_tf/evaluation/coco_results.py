"""Model outputs of one batch -> COCO result dicts (the evaluation edge).

This is the only place detections leave the model's frame: boxes go from `[y1, x1, y2, x2]` pixels of
the padded model input to COCO `[x, y, w, h]` pixels of the ORIGINAL image, classes go from contiguous
1..K to the dataset's category ids, and 28x28 mask probabilities are pasted at the original image size
and run-length encoded.

Decisions:
- Back-mapping inverts the pipeline's resize: `original = (box + offset) / scale`, with `scale` and
  `offset` the rows 2 and 3 of `image_info` (the offset is the crop origin in resized pixels, as in TF
  Model Garden's `resize_and_crop_boxes`; it is 0 today). Boxes are then clipped to the original image.
- Masks are pasted in ORIGINAL pixels with the back-mapped box (not pasted at the input size and
  resized), like detectron2 and Model Garden, so no second resampling blurs them. Pasting runs eagerly per
  image (original sizes differ), in chunks of `PASTE_CHUNK` detections to bound memory
  (chunk x H x W floats).
- A pasted pixel is foreground when its probability is >= `MASK_THRESHOLD` (detectron2's rule).
- Every detection below `num_detections` is kept (no score filtering): the model already applied its test
  score threshold, and COCOeval keeps the top 100 per image itself.
- Values are plain Python ints/floats and RLE counts are `str`, so the list is JSON-serialisable.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from pycocotools import mask as mask_util

from maskrcnn_tf.config import MASK_THRESHOLD  # a pasted pixel is foreground at probability >= this
from maskrcnn_tf.ops.masks import paste_masks

# Detections pasted at once: bounds the float32 [1, chunk, H, W] buffer (~40 MB for a 640x640 image).
PASTE_CHUNK = 25
# image_info rows (docs/design.md section 5).
_ORIGINAL_SIZE, _SCALE, _OFFSET = 0, 2, 3


def map_boxes_to_original(boxes: np.ndarray, image_info: np.ndarray) -> np.ndarray:
    """Maps boxes of the padded model input back to the original image and clips them to it.

    Args:
      boxes: float [n, 4] `[y1, x1, y2, x2]` pixels of the padded model input.
      image_info: float [4, 2] of ONE image (original, resized, scale, offset rows).
    Returns:
      float64 [n, 4] `[y1, x1, y2, x2]` pixels of the original image, clipped to [0, h] x [0, w].
    """
    info = np.asarray(image_info, np.float64)
    scale = np.tile(info[_SCALE], 2)  # [4] (sy, sx, sy, sx)
    offset = np.tile(info[_OFFSET], 2)  # [4]
    original = (np.asarray(boxes, np.float64) + offset) / scale
    height, width = info[_ORIGINAL_SIZE]
    return np.clip(original, 0.0, np.array([height, width, height, width]))


def encode_masks(binary_masks: np.ndarray) -> List[dict]:
    """Compressed COCO RLE of binary masks.

    Args:
      binary_masks: bool or uint8 [n, H, W].
    Returns:
      n dicts {"size": [H, W], "counts": str} (counts decoded from bytes so the dict is JSON-ready).
    """
    # pycocotools wants a Fortran-ordered uint8 [H, W, n] array.
    stacked = np.asfortranarray(np.transpose(binary_masks, (1, 2, 0)).astype(np.uint8))  # [H, W, n]
    rles = mask_util.encode(stacked)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _paste_binary_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """masks float [n, M, M], boxes [n, 4] original pixels -> bool [n, height, width]."""
    out = np.zeros((len(masks), height, width), dtype=bool)
    for start in range(0, len(masks), PASTE_CHUNK):
        stop = start + PASTE_CHUNK
        pasted = paste_masks(masks[None, start:stop].astype(np.float32),
                             boxes[None, start:stop].astype(np.float32), (height, width))
        out[start:stop] = np.asarray(pasted)[0] >= MASK_THRESHOLD  # [chunk, H, W]
    return out


def detections_to_coco_results(
    outputs: Dict[str, np.ndarray],
    image_info: np.ndarray,
    source_id: np.ndarray,
    is_valid: np.ndarray,
    category_ids: Sequence[int] = (),
) -> List[dict]:
    """Converts the model outputs of one batch into COCO result dicts.

    Args:
      outputs: numpy dict of the model's inference outputs:
        `num_detections` int32 [B]; `detection_boxes` float [B, D, 4] `[y1, x1, y2, x2]` pixels of the
        padded model input; `detection_scores` float [B, D]; `detection_classes` int32 [B, D] contiguous
        1..K (0 = padding); optional `detection_masks` float [B, D, M, M] probabilities (absent for
        box-only models: the results then have no "segmentation").
      image_info: float [B, 4, 2]: original (h, w); resized valid (h, w); scale (y, x); offset (y, x).
      source_id: int64 [B] COCO image ids.
      is_valid: bool [B]; False rows (padding images of the last batch) are skipped.
      category_ids: contiguous class i + 1 -> dataset category id `category_ids[i]`; empty = identity.
    Returns:
      A list of dicts {"image_id": int, "category_id": int, "bbox": [x, y, w, h] float original pixels,
      "score": float, "segmentation": {"size": [h, w], "counts": str} (only with masks)}.
    Raises:
      ValueError: a detected class is outside 1..len(category_ids).
    """
    outputs = {key: np.asarray(value) for key, value in outputs.items()}
    image_info = np.asarray(image_info)
    lookup = np.asarray(category_ids, np.int64)
    has_masks = "detection_masks" in outputs
    results = []
    for b in np.flatnonzero(np.asarray(is_valid)):
        count = int(outputs["num_detections"][b])
        classes = outputs["detection_classes"][b, :count].astype(np.int64)
        keep = classes > 0  # padding rows should all be beyond num_detections; be safe
        classes = classes[keep]
        if classes.size == 0:
            continue
        if lookup.size:
            if classes.max() > lookup.size:
                raise ValueError(f"detection class {classes.max()} has no entry in category_ids "
                                 f"(len {lookup.size}); image {int(source_id[b])}")
            classes = lookup[classes - 1]
        scores = outputs["detection_scores"][b, :count][keep]
        boxes = map_boxes_to_original(outputs["detection_boxes"][b, :count][keep], image_info[b])
        height, width = (int(round(v)) for v in image_info[b, _ORIGINAL_SIZE])
        if has_masks:
            binary = _paste_binary_masks(outputs["detection_masks"][b, :count][keep], boxes,
                                         height, width)
            rles = encode_masks(binary)
        image_id = int(source_id[b])
        for i in range(len(classes)):
            y1, x1, y2, x2 = (float(v) for v in boxes[i])
            result = {"image_id": image_id, "category_id": int(classes[i]),
                      "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[i])}
            if has_masks:
                result["segmentation"] = rles[i]
            results.append(result)
    return results
