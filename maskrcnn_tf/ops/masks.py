"""Mask targets from gt mask crops, and pasting predicted masks into the image.

Shape shorthand: B batch, N gt instances, Mc gt crop size, S sampled RoIs, T = output_size of the
targets, D detections, M predicted mask size, H x W target image.

Both functions resample separably with bilinear "tent" weights max(0, 1 - |u - j|) of a sample at
cell coordinate u on cell j. A sample has at most two nonzero weights per axis (cells floor(u) and
floor(u) + 1), so each axis is a gather of those cells' rows / columns and an elementwise weighted
sum: no per-RoI loop, XLA friendly, static shapes. Not a matmul of dense weight matrices (on a CPU
the same values up to the last bit): accelerators round float32 matmul inputs (TF32 on Ampere+
GPUs keeps a 10-bit mantissa, a TPU's default float32 matmul is one bfloat16 pass, 8 bits), which
moves values across the 0.5 threshold; gathers and elementwise float32 arithmetic are exact
whatever the matmul precision. The weights are those of the dense rows bit for bit (the same
formula on the two cells); only the order of the final sums differs from a matmul's.
The cost on a CPU: paste_masks' full-size stage is two row gathers, two multiplies and an add
over [B, D, H, W] (a matmul writes its output once), ~2.5x the matmul's time at D=100, 800 x 800
and up to three [B, D, H, W] buffers alive when run eagerly (two in a tf.function).

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


def _tent_taps(cell_coords: tf.Tensor, num_cells) -> Tuple[tf.Tensor, tf.Tensor]:
    """The two cells a bilinear sample reads and their tent weights, zero beyond the row.

    A sample at cell coordinate u has tent weight max(0, 1 - |u - j|) on cell j (cell j centred at
    j), which is nonzero only for j = floor(u) and floor(u) + 1.

    Args:
      cell_coords: float32 [..., P] sample positions in cell units.
      num_cells: int (or int32 scalar) number of cells.

    Returns:
      indices: int32 [..., P, 2], cells floor(u) and floor(u) + 1 clamped into [0, num_cells) (safe
        to gather; a clamped cell has weight 0).
      weights: float32 [..., P, 2], max(0, 1 - |u - j|) of those cells, 0 for a cell that does not
        exist (j < 0 or j >= num_cells): the nonzero entries of the row of a dense tent-weight matrix.
    """
    last_cell = tf.cast(num_cells, tf.float32) - 1.0
    # Clipped so that the floor fits in int32 (a degenerate box puts samples ~1e10 cells away);
    # outside [-1, num_cells] every existing cell has weight 0 either way.
    lower = tf.floor(tf.clip_by_value(cell_coords, -2.0, last_cell + 2.0))
    cells = lower[..., None] + tf.constant([0.0, 1.0])  # [..., P, 2]
    weights = tf.maximum(0.0, 1.0 - tf.abs(cell_coords[..., None] - cells))
    weights = tf.where((cells >= 0.0) & (cells <= last_cell), weights, 0.0)
    indices = tf.clip_by_value(tf.cast(cells, tf.int32), 0, tf.cast(num_cells, tf.int32) - 1)
    return indices, weights


def _resample(values: tf.Tensor, indices: tf.Tensor, weights: tf.Tensor, axis: int) -> tf.Tensor:
    """Weighted sum of taps gathered along axis 2 (rows) or 3 (columns) of values [B, X, R, C].

    Args:
      values: float32 [B, X, R, C].
      indices: int32 [B, X, P, A], A taps per output sample, into R (axis 2) or C (axis 3).
      weights: float32 [B, X, P, A].
      axis: 2 or 3.

    Returns:
      float32 [B, X, P, C] (axis 2) or [B, X, R, P] (axis 3): output sample p is
      sum_a weights[p, a] * values[indices[p, a]] along `axis`, summed in tap order.
    """
    result = None
    for tap in range(indices.shape[-1]):
        weight = weights[..., tap, None] if axis == 2 else weights[..., None, :, tap]
        # One expression, so that eagerly the gathered tap is freed as soon as it is weighted.
        term = tf.gather(values, indices[..., tap], axis=axis, batch_dims=2) * weight
        result = term if result is None else result + term
        del term
    return result


def _to_cells(coords: tf.Tensor, start: tf.Tensor, extent: tf.Tensor, num_cells) -> tf.Tensor:
    """Continuous image coordinates [..., P] -> cell coordinates of a box [start, start + extent)
    split into num_cells cells (cell j covers [j, j + 1), so its centre is at index j after -0.5)."""
    scale = tf.cast(num_cells, tf.float32) / tf.maximum(extent, _MIN_EXTENT)
    return (coords - start[..., None]) * scale[..., None] - 0.5


def _target_axis_taps(roi_start, roi_extent, gt_start, gt_extent, mask_size, output_size):
    """Cells and weights along one axis of each target cell: the mean of TARGET_SAMPLING_RATIO
    bilinear samples.

    Samples inside the gt box are clamped to the crop's first/last cell centre (the crop is the whole
    mask inside the box, so its edge values hold up to the box edge); samples outside get weight 0.

    Returns:
      indices: int32 [B, S, T, 2 * TARGET_SAMPLING_RATIO], the cells the target cell's samples read
        (two per sample, clamped into [0, Mc)).
      weights: float32 [B, S, T, 2 * TARGET_SAMPLING_RATIO]; a cell read by several samples carries
        its whole weight (the mean over samples of their tent weights on it) at its first tap and 0
        at the others, so the distinct cells' weights are those of a dense weight matrix row.
    """
    samples_per_cell = TARGET_SAMPLING_RATIO
    num_samples = output_size * samples_per_cell
    fractions = (tf.range(num_samples, dtype=tf.float32) + 0.5) / num_samples  # [T * k]
    coords = roi_start[..., None] + fractions * roi_extent[..., None]  # [B, S, T * k] image pixels
    cells = _to_cells(coords, gt_start, gt_extent, mask_size)  # [B, S, T * k]
    last_cell = tf.cast(mask_size, tf.float32) - 1.0
    # Cell coordinate -0.5 is the box's first edge, last_cell + 0.5 its far edge; a degenerate
    # (padding) gt box puts every sample outside.
    inside = (cells >= -0.5) & (cells <= last_cell + 0.5) & (gt_extent[..., None] > 0.0)
    shape = tf.concat([tf.shape(roi_start), [output_size, samples_per_cell]], axis=0)
    clamped = tf.reshape(tf.clip_by_value(cells, 0.0, last_cell), shape)  # [B, S, T, k]
    inside = tf.reshape(inside, shape)  # [B, S, T, k]
    lower = tf.floor(clamped)  # in [0, Mc - 1]
    tap_cells = tf.reshape(lower[..., None] + tf.constant([0.0, 1.0]),
                           tf.concat([shape[:-1], [2 * samples_per_cell]], axis=0))  # [B, S, T, 2k]
    # Tent weight of every sample on every tap cell (exactly 0 on cells not next to the sample), then
    # the mean over the samples: the same operations, in the same order, as the dense weight rows.
    tent = tf.maximum(0.0, 1.0 - tf.abs(clamped[..., :, None] - tap_cells[..., None, :]))  # [B,S,T,k,2k]
    tent *= tf.cast(inside, tf.float32)[..., None]
    weights = tf.reduce_mean(tent, axis=-2)  # [B, S, T, 2k]
    # A cell read by two samples (samples less than two crop cells apart) counts once, at its first tap.
    taps = [tap_cells[..., tap] for tap in range(2 * samples_per_cell)]
    repeated = [tf.zeros_like(taps[0], tf.bool)]
    for tap in range(1, len(taps)):
        repeated.append(tf.reduce_any(tf.stack([tf.equal(taps[tap], taps[e]) for e in range(tap)]), axis=0))
    weights = tf.where(tf.stack(repeated, axis=-1), 0.0, weights)
    # floor(u) + 1 may be Mc (u on the last centre; weight 0 there): clamp for the gather.
    indices = tf.cast(tf.minimum(tap_cells, last_cell), tf.int32)
    return indices, weights


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
    boxes = tf.gather(tf.cast(gt_boxes, tf.float32), matched_gt_index, batch_dims=1)  # [B, S, 4]
    rois = tf.cast(roi_boxes, tf.float32)
    row_index, row_weights = _target_axis_taps(
        rois[..., 0], rois[..., 2] - rois[..., 0], boxes[..., 0], boxes[..., 2] - boxes[..., 0],
        mask_size, output_size,
    )  # [B, S, T, 2k] each
    col_index, col_weights = _target_axis_taps(
        rois[..., 1], rois[..., 3] - rois[..., 1], boxes[..., 1], boxes[..., 3] - boxes[..., 1],
        mask_size, output_size,
    )  # [B, S, T, 2k] each
    # Rows straight from the matched gt crop: row r of instance n is row n * Mc + r of [B, N * Mc, Mc]
    # (no [B, S, Mc, Mc] copy of the matched crops).
    shape = tf.shape(gt_masks)
    mask_rows = tf.reshape(gt_masks, [shape[0], 1, shape[1] * mask_size, mask_size])  # [B, 1, N * Mc, Mc]
    row_index += (tf.cast(matched_gt_index, tf.int32) * mask_size)[:, :, None, None]
    num_rois = tf.shape(matched_gt_index)[1]
    num_taps = 2 * TARGET_SAMPLING_RATIO
    resampled = _resample(
        mask_rows,
        tf.reshape(row_index, [shape[0], 1, num_rois * output_size, num_taps]),
        tf.reshape(row_weights, [shape[0], 1, num_rois * output_size, num_taps]),
        axis=2,
    )  # [B, 1, S * T, Mc]
    resampled = tf.reshape(resampled, [shape[0], num_rois, output_size, mask_size])  # [B, S, T, Mc]
    resampled = _resample(resampled, col_index, col_weights, axis=3)  # [B, S, T, T]
    return tf.cast(resampled >= MASK_THRESHOLD, tf.float32)


def paste_masks(
    masks: tf.Tensor,
    boxes: tf.Tensor,
    image_size: Tuple[Union[int, tf.Tensor], Union[int, tf.Tensor]],
    origin: Tuple[int, int] = (0, 0),
) -> tf.Tensor:
    """Pastes M x M mask probabilities into their boxes of an H x W image (or of the H x W window at
    `origin` of a larger image: the same values as the window of the full paste, bit for bit).

    Args:
      masks: float [B, D, M, M] probabilities (mask cell (i, j) covers the (i, j)-th 1/M x 1/M part of
        its box).
      boxes: float [B, D, 4] [y1, x1, y2, x2] in the target image's pixels (continuous coordinates;
        may extend past the image; -1 padding rows give zeros).
      image_size: (H, W) python ints or int32 scalar tensors.
      origin: (row, column) python ints, the window's top-left pixel in the image of `boxes`.

    Returns:
      float32 [B, D, H, W] probabilities sampled at pixel centres by bilinear interpolation of the
      mask zero-extended by one cell: 0 beyond half a mask cell outside the box, 0.5 level on the box
      edge for a mask of ones.
    """
    height, width = image_size
    masks = tf.cast(masks, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    mask_size = tf.shape(masks)[-1]
    top, left = origin
    pixel_centres_y = tf.cast(tf.range(height) + top, tf.float32) + 0.5  # [H]
    pixel_centres_x = tf.cast(tf.range(width) + left, tf.float32) + 0.5  # [W]
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)  # each [B, D]
    row_index, row_weights = _tent_taps(
        _to_cells(pixel_centres_y, y1, y2 - y1, mask_size), mask_size)  # [B, D, H, 2] each
    col_index, col_weights = _tent_taps(
        _to_cells(pixel_centres_x, x1, x2 - x1, mask_size), mask_size)  # [B, D, W, 2] each
    # Columns first, on the small mask; the full-size stage is then a gather of whole W-long rows
    # (contiguous), two of them weighted and added: [B, D, H, W] intermediates, nothing larger.
    columns = _resample(masks, col_index, col_weights, axis=3)  # [B, D, M, W]
    return _resample(columns, row_index, row_weights, axis=2)  # [B, D, H, W]
