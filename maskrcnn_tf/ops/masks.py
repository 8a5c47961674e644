"""Mask targets from gt mask crops, and pasting predicted masks into the image.

Shape shorthand: B batch, N gt instances, Mc gt crop size, S sampled RoIs, T = output_size of the
targets, D detections, M predicted mask size, H x W target image.

Both functions resample with separable bilinear weight matrices ("tent" weights max(0, 1 - |u - j|)
of a sample at cell coordinate u on cell j), so each is two batched matmuls: no gather, no per-RoI
loop, XLA friendly, static shapes.

Decisions beyond docs/design.md:

- `mask_targets` is RoIAlign (aligned convention, 2 x 2 samples per target cell, averaged) of the
  matched gt mask, evaluated directly in the gt crop: the RoI is expressed in the gt box's frame, so
  no full-size mask is ever built. Samples outside the gt box read 0; samples inside it but beyond
  the crop's outermost cell centres read the edge cell (clamped, as RoIAlign clamps at a map's
  border): the crop is the complete mask inside its box, so a mask touching its box edge stays
  crisp there (zero-extending the crop would round off its corners by half a crop cell, visibly so
  when a small crop is enlarged). The result is binarised at >= 0.5 (detectron2 and Model Garden
  both train on binary targets). Averaging 2 x 2 samples (rather than one bilinear sample, as Model
  Garden's crop_and_resize does) reduces aliasing of thin parts when a large gt crop is shrunk to T.
- `paste_masks` interpolates the mask zero-extended by one cell (tent weights of cells that do not
  exist are simply absent), like detectron2's paste which pads the mask with a ring of zeros: a
  mask fades to 0 over the half mask cell either side of its box edge, with the 0.5 level on the
  edge. It returns probabilities (no threshold), so callers choose their own (0.5 for COCO
  evaluation). Values are nonzero only inside the box and up to half a mask cell outside it.
- Degenerate boxes (padding rows -1, zero extent) give all-zero outputs, never NaN.
"""

from typing import Tuple, Union

import tensorflow as tf

# Also the binarisation level of the resampled gt mask (bilinear of a {0, 1} mask).
from maskrcnn_tf.config import MASK_THRESHOLD

# Target cells average sampling_ratio x sampling_ratio bilinear samples (RoIAlign's default of 2).
TARGET_SAMPLING_RATIO = 2
# Smallest box extent divided by; keeps degenerate (padding) boxes finite: their weights become 0.
_MIN_EXTENT = 1e-6


def _tent_weights(cell_coords: tf.Tensor, num_cells) -> tf.Tensor:
    """Bilinear weights of samples on a row of cells, zero beyond the row.

    Args:
      cell_coords: float32 [..., P] sample positions in cell units, cell j centred at j.
      num_cells: int (or int32 scalar) number of cells.

    Returns:
      float32 [..., P, num_cells]; weight of cell j = max(0, 1 - |u - j|).
    """
    centres = tf.cast(tf.range(num_cells), tf.float32)  # [num_cells]
    return tf.maximum(0.0, 1.0 - tf.abs(cell_coords[..., None] - centres))  # [..., P, num_cells]


def _to_cells(coords: tf.Tensor, start: tf.Tensor, extent: tf.Tensor, num_cells) -> tf.Tensor:
    """Continuous image coordinates [..., P] -> cell coordinates of a box [start, start + extent)
    split into num_cells cells (cell j covers [j, j + 1), so its centre is at index j after -0.5)."""
    scale = tf.cast(num_cells, tf.float32) / tf.maximum(extent, _MIN_EXTENT)
    return (coords - start[..., None]) * scale[..., None] - 0.5


def _target_axis_weights(roi_start, roi_extent, gt_start, gt_extent, mask_size, output_size):
    """[B, S, T, Mc] weights: mean of TARGET_SAMPLING_RATIO bilinear samples per target cell.

    Samples inside the gt box are clamped to the crop's first/last cell centre (the crop is the whole
    mask inside the box, so its edge values hold up to the box edge); samples outside get weight 0.
    """
    num_samples = output_size * TARGET_SAMPLING_RATIO
    fractions = (tf.range(num_samples, dtype=tf.float32) + 0.5) / num_samples  # [T * k]
    coords = roi_start[..., None] + fractions * roi_extent[..., None]  # [B, S, T * k] image pixels
    cells = _to_cells(coords, gt_start, gt_extent, mask_size)  # [B, S, T * k]
    last_cell = tf.cast(mask_size, tf.float32) - 1.0
    # Cell coordinate -0.5 is the box's first edge, last_cell + 0.5 its far edge; a degenerate
    # (padding) gt box puts every sample outside.
    inside = (cells >= -0.5) & (cells <= last_cell + 0.5) & (gt_extent[..., None] > 0.0)
    weights = _tent_weights(tf.clip_by_value(cells, 0.0, last_cell), mask_size)  # [B, S, T * k, Mc]
    weights *= tf.cast(inside, tf.float32)[..., None]
    shape = tf.concat(
        [tf.shape(roi_start), [output_size, TARGET_SAMPLING_RATIO, mask_size]], axis=0
    )
    weights = tf.reshape(weights, shape)  # [B, S, T, k, Mc]
    return tf.reduce_mean(weights, axis=-2)  # [B, S, T, Mc]


def mask_targets(
    gt_masks: tf.Tensor,
    gt_boxes: tf.Tensor,
    roi_boxes: tf.Tensor,
    matched_gt_index: tf.Tensor,
    output_size: int = 28,
) -> tf.Tensor:
    """Binary mask-head targets: the part of each RoI's matched gt mask inside the RoI.

    Args:
      gt_masks: float [B, N, Mc, Mc], values in [0, 1]; instance n's mask cropped to gt_boxes[:, n]
        and resized to Mc x Mc (the pipeline's `gt_masks`).
      gt_boxes: float [B, N, 4] [y1, x1, y2, x2] absolute pixels of the padded input.
      roi_boxes: float [B, S, 4] [y1, x1, y2, x2] same frame.
      matched_gt_index: int32 [B, S] index into N of each RoI's gt.
      output_size: T, target side (the mask head's 28).

    Returns:
      float32 [B, S, T, T] in {0, 1}: RoIAlign (aligned, 2 x 2 samples) of the matched mask over the
      RoI, 0 where the RoI lies outside the gt box, then >= 0.5. Rows whose RoI or gt box is
      degenerate are 0.
    """
    gt_masks = tf.cast(gt_masks, tf.float32)
    mask_size = tf.shape(gt_masks)[-1]
    masks = tf.gather(gt_masks, matched_gt_index, batch_dims=1)  # [B, S, Mc, Mc]
    boxes = tf.gather(tf.cast(gt_boxes, tf.float32), matched_gt_index, batch_dims=1)  # [B, S, 4]
    rois = tf.cast(roi_boxes, tf.float32)
    row_weights = _target_axis_weights(
        rois[..., 0], rois[..., 2] - rois[..., 0], boxes[..., 0], boxes[..., 2] - boxes[..., 0],
        mask_size, output_size,
    )  # [B, S, T, Mc]
    col_weights = _target_axis_weights(
        rois[..., 1], rois[..., 3] - rois[..., 1], boxes[..., 1], boxes[..., 3] - boxes[..., 1],
        mask_size, output_size,
    )  # [B, S, T, Mc]
    resampled = tf.matmul(tf.matmul(row_weights, masks), col_weights, transpose_b=True)  # [B, S, T, T]
    return tf.cast(resampled >= MASK_THRESHOLD, tf.float32)


def paste_masks(
    masks: tf.Tensor,
    boxes: tf.Tensor,
    image_size: Tuple[Union[int, tf.Tensor], Union[int, tf.Tensor]],
) -> tf.Tensor:
    """Pastes M x M mask probabilities into their boxes of an H x W image.

    Args:
      masks: float [B, D, M, M] probabilities (mask cell (i, j) covers the (i, j)-th 1/M x 1/M part of
        its box).
      boxes: float [B, D, 4] [y1, x1, y2, x2] in the target image's pixels (continuous coordinates;
        may extend past the image; -1 padding rows give zeros).
      image_size: (H, W) python ints or int32 scalar tensors.

    Returns:
      float32 [B, D, H, W] probabilities sampled at pixel centres by bilinear interpolation of the
      mask zero-extended by one cell: 0 beyond half a mask cell outside the box, 0.5 level on the box
      edge for a mask of ones.
    """
    height, width = image_size
    masks = tf.cast(masks, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    mask_size = tf.shape(masks)[-1]
    pixel_centres_y = tf.cast(tf.range(height), tf.float32) + 0.5  # [H]
    pixel_centres_x = tf.cast(tf.range(width), tf.float32) + 0.5  # [W]
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)  # each [B, D]
    row_weights = _tent_weights(
        _to_cells(pixel_centres_y, y1, y2 - y1, mask_size), mask_size
    )  # [B, D, H, M]
    col_weights = _tent_weights(
        _to_cells(pixel_centres_x, x1, x2 - x1, mask_size), mask_size
    )  # [B, D, W, M]
    rows = tf.matmul(row_weights, masks)  # [B, D, H, M]
    return tf.matmul(rows, col_weights, transpose_b=True)  # [B, D, H, W]
