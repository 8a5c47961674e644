"""RoIAlign (He et al. 2017) on one feature level or on the FPN pyramid, with two backends.

Shape shorthand: B batch, R boxes per image, C channels, S = output_size, n = S * sampling_ratio
(sample points per side of a box), L number of pyramid levels used.

Contract (docs/design.md section 6), identical for both backends:

- Half-pixel aligned convention (detectron2 ``ROIAlignV2``, ``aligned=True``): a box [y1, x1, y2, x2]
  in continuous coordinates is shifted by -0.5 so that pixel centres sit on integer positions; bin
  (i, j) of an S x S grid averages ``sampling_ratio**2`` bilinear samples taken at the centres of a
  regular sub-grid of the bin. Degenerate boxes are not enlarged to one pixel (that was the
  un-aligned legacy behaviour).
- Boundary rule of detectron2's kernel: a sample with y < -1 or y > H (or the same in x) contributes
  0; otherwise its coordinate is clamped into [0, H - 1] before interpolating. The average always
  divides by ``sampling_ratio**2``.
- No gradient flows into the boxes (``tf.stop_gradient``), as in detectron2 and Model Garden: RoIs are
  treated as constants by the box and mask heads. Gradients flow into the features.
- Box math is float32; the output has the dtype of the features (float32, float16 or bfloat16).
  Sampling, and so the gradient's accumulation into the feature maps, runs in float32 whatever the
  features' dtype: many RoIs add into one pixel, and a float16 or bfloat16 sum (with a GPU's atomics)
  loses the small contributions.
- ``aligned=False`` (torchvision's MultiScaleRoIAlign): no half-pixel shift and RoIs enlarged to at
  least one pixel per side; implemented by rewriting the boxes into aligned boxes that sample the same
  points, so both backends and their gradients follow. ``sampling_ratio=0`` (adaptive, detectron2's
  default pooler): ceil(roi_size / S) samples per bin and axis, capped (MAX_ADAPTIVE_SAMPLING_RATIO),
  computed with the gather formulation in both backends (its gradient is TensorFlow's for gather).

Backends:

- ``"crop_and_resize"``: ``tf.image.crop_and_resize`` samples box corners with spacing
  (size - 1) / (crop - 1), not bin centres, and returns 0 outside [0, H - 1]. We (a) pad the
  features by one pixel with SYMMETRIC padding, which makes samples in [-1, 0) and (H - 1, H] read the
  border pixel and samples beyond them read 0 - exactly the detectron2 boundary rule above - and
  (b) rewrite each box (tensorpack's ``transform_fpcoor_for_tf`` idea) so that the op's first and last
  sample land on the first and last sub-bin centres; we crop n x n and average-pool
  sampling_ratio x sampling_ratio.
  The gradient is ours (``_crop_and_resize_adjoint``): the level is linear in the features, so its
  gradient is the transposed sparse sampling matrix (pad and average pool folded in) times the
  upstream gradient, one ``tf.sparse.sparse_dense_matmul``. TensorFlow's own gradient has two defects
  on CPU: CropAndResizeGradImage adds into the image gradient from several threads without atomics
  (tensorflow/tensorflow#42033), so updates are occasionally lost (benchmarks/README.md), and the
  chain AvgPoolGrad -> CropAndResizeGradImage -> MirrorPadGrad
  holds a [K, n, n, C] crop gradient and two padded image-sized tensors, which sat at the top of the
  R50 training step's memory profile (box RoIs on P2 at 1024 px, batch 2: 205 + 130 + 130 MB). Ours
  is deterministic and its only large tensor is the [B, H, W, C] result.
  CropAndResize has no XLA kernel: this backend must not run inside ``jit_compile=True`` functions
  or on TPUs; the Keras layer that calls it declares itself non-jittable. For the pyramid, boxes
  are split by level with ``tf.dynamic_partition`` and put back with ``tf.dynamic_stitch`` so each
  box is sampled once (work proportional to R, not L * R); the per-level box counts are data
  dependent but every output shape is static.
- ``"gather"``: XLA/TPU friendly, static shapes only (Model Garden's ``multilevel_crop_and_resize``
  idea). The levels are flattened and concatenated into one [B, sum_l H_l * W_l, C] tensor; each box
  gathers the 2n x 2n grid of pixels around its n x n sample points (two neighbours per sample and
  axis) with one batched ``tf.gather``, multiplies by the separable bilinear kernel and sums the
  2 * sampling_ratio taps per bin and axis. Memory: the gathered tensor is
  [B, R, 2n, 2n, C] (4 * sampling_ratio**2 times the output), e.g. 820 MB float32 for B=2, R=512,
  7 x 7, C=256 - the price of a gather-based XLA kernel. The multiply-and-sum form is chosen for
  XLA, which fuses it into the gather: under XLA it beats crop_and_resize, without XLA it is slower
  (figures: benchmarks/README.md), so crop_and_resize stays the default outside XLA. Coordinates are
  float32, so on large maps (P2 of a 1024 px input) the two
  backends differ by ~1e-4 of the feature scale.

Level assignment (FPN paper, eq. 1): k = floor(4 + log2(sqrt(area) / 224)) clamped to [2, 5]. A tiny
epsilon keeps padding rows (area 0) finite; they go to the lowest level.
"""

from typing import Dict, List, Sequence

import tensorflow as tf

from maskrcnn_tf.config import ROI_ALIGN_BACKENDS as BACKENDS  # the one list of backend names

# Gradient implementations of the crop_and_resize backend (which is deterministic where:
# device_defaults.py): our sparse adjoint as one sparse_dense_matmul, the same adjoint as a segment
# sum (deterministic on GPU under enable_op_determinism), or TensorFlow's CropAndResizeGradImage.
GRADIENTS = ("sparse_matmul", "segment_sum", "native")

# FPN paper eq. 1: a 224 x 224 box (ImageNet pre-training size) is pooled from P4.
CANONICAL_SIZE = 224.0
CANONICAL_LEVEL = 4
# Keeps log2 finite for zero-area (padding) boxes and absorbs float32 rounding of exact powers of two
# (detectron2 adds 1e-8 to the same ratio; float32 needs a larger guard).
_LEVEL_EPSILON = 1e-6
# Half-pixel shift of the aligned convention: pixel i's centre is at continuous coordinate i + 0.5.
_HALF_PIXEL = 0.5
# Border added by SYMMETRIC padding in the crop_and_resize backend (one pixel per side).
_PAD = 1
# Adaptive sampling (sampling_ratio=0): ceil(roi_size / output_size) samples per bin and axis, at most this
# many. Shapes are static, so every box carries this many sample slots per bin and axis, the unused ones
# weighted 0, gathered one (row slot, column slot) pair at a time ([B, R, 2S, 2S, C] each, 16 gathers).
# Exact (as detectron2 / torchvision) for RoI sides up to 4 * output_size level pixels, which covers
# square boxes on P2..P4 (a box pooled from level l < 5 has sqrt(area) < 224 * 2**(l - 3), i.e. under 28
# level pixels); longer sides (elongated boxes, P5 boxes over 28 * 32 = 896 px at output 7) are averaged
# over 4 samples per bin instead of more.
MAX_ADAPTIVE_SAMPLING_RATIO = 4
# Un-aligned RoIAlign (aligned=False) enlarges RoIs to at least this many level pixels per side.
_UNALIGNED_MIN_SIZE = 1.0
# Feature dtypes sampled as they are; 16-bit features are sampled (and their gradients summed) in float32.
_SAMPLING_DTYPES = (tf.float32, tf.float64)


def _level_key(level: int) -> str:
    return f"P{level}"


def assign_levels(
    boxes: tf.Tensor,
    min_level: int = 2,
    max_level: int = 5,
    canonical_size: float = CANONICAL_SIZE,
    canonical_level: int = CANONICAL_LEVEL,
    torchvision_epsilon: bool = False,
) -> tf.Tensor:
    """FPN level of each box: floor(canonical_level + log2(sqrt(area) / canonical_size)), clamped.

    Args:
      boxes: float [B, R, 4] (or any [..., 4]) [y1, x1, y2, x2] in input-image pixels. Padding rows
        (-1) and other zero-area boxes get min_level.
      min_level, max_level: inclusive clamp range.
      canonical_size, canonical_level: a box of side canonical_size maps to canonical_level.
      torchvision_epsilon: add the 1e-6 guard after the log (torchvision's LevelMapper:
        floor(k0 + log2(s / s0) + 1e-6)) instead of to the ratio; the two differ for boxes within a
        relative ~1e-6 of a level boundary.

    Returns:
      int32 [B, R] levels in [min_level, max_level].
    """
    boxes = tf.cast(boxes, tf.float32)
    heights = tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    widths = tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    if torchvision_epsilon:
        # log2(0) = -inf for zero-area boxes: floor and clamp give min_level, as torchvision's clamp does.
        log2_ratio = tf.math.log(tf.sqrt(heights * widths) / canonical_size) / tf.math.log(2.0) + _LEVEL_EPSILON
    else:
        ratio = tf.sqrt(heights * widths) / canonical_size + _LEVEL_EPSILON
        log2_ratio = tf.math.log(ratio) / tf.math.log(2.0)
    levels = tf.floor(float(canonical_level) + log2_ratio)
    levels = tf.clip_by_value(levels, float(min_level), float(max_level))
    return tf.cast(levels, tf.int32)


# ----------------------------------------------------------------------------------------------
# crop_and_resize backend
# ----------------------------------------------------------------------------------------------


def _crop_and_resize_boxes(boxes: tf.Tensor, padded_hw: tf.Tensor, num_samples: int) -> tf.Tensor:
    """Rewrites aligned RoIAlign boxes into tf.image.crop_and_resize's normalized corner boxes.

    Sample j (0..n-1) of RoIAlign sits at y1 - 0.5 + (j + 0.5) * h / n in the original features, i.e.
    at y1 + 0.5 + (j + 0.5) * h / n in the features padded by one pixel. crop_and_resize puts sample j
    at ny1 * (Hp - 1) + j * (ny2 - ny1) * (Hp - 1) / (n - 1), so ny1 is the first sample divided by
    (Hp - 1) and ny2 - ny1 spans (n - 1) sample spacings.

    Args:
      boxes: float32 [K, 4] [y1, x1, y2, x2] in the level's (unpadded) pixel coordinates.
      padded_hw: float32 [2] (Hp, Wp) of the padded features.
      num_samples: n, samples per side.

    Returns:
      float32 [K, 4] normalized [y1, x1, y2, x2] for tf.image.crop_and_resize.
    """
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    spacing_y = (y2 - y1) / num_samples
    spacing_x = (x2 - x1) / num_samples
    first_y = y1 + _PAD - _HALF_PIXEL + 0.5 * spacing_y
    first_x = x1 + _PAD - _HALF_PIXEL + 0.5 * spacing_x
    last_y = first_y + (num_samples - 1) * spacing_y
    last_x = first_x + (num_samples - 1) * spacing_x
    scale_y = padded_hw[0] - 1.0
    scale_x = padded_hw[1] - 1.0
    return tf.stack([first_y / scale_y, first_x / scale_x, last_y / scale_y, last_x / scale_x], axis=-1)


def _crop_and_resize_level(
    features: tf.Tensor,
    boxes: tf.Tensor,
    box_indices: tf.Tensor,
    output_size: int,
    sampling_ratio: int,
    gradient: str = "sparse_matmul",
) -> tf.Tensor:
    """RoIAlign of K boxes on one level: crop_and_resize forward, `_crop_and_resize_adjoint` backward
    (`gradient` one of GRADIENTS; "native" = TensorFlow's own gradient of the composition).

    Args:
      features: [B, H, W, C] any float dtype (unpadded; the SYMMETRIC pad is applied here).
      boxes: float32 [K, 4] [y1, x1, y2, x2] in the level's pixels.
      box_indices: int32 [K] batch index of each box.

    Returns:
      float32 [K, S, S, C]; the gradient w.r.t. `features` has their dtype.
    """
    if features.dtype not in _SAMPLING_DTYPES:
        features = tf.cast(features, tf.float32)
    num_samples = output_size * sampling_ratio
    padded_hw = tf.cast(tf.shape(features)[1:3] + 2 * _PAD, tf.float32)
    crop_boxes = _crop_and_resize_boxes(boxes, padded_hw, num_samples)  # [K, 4] normalized
    window = [1, sampling_ratio, sampling_ratio, 1]

    def forward(features):
        padded = tf.pad(features, [[0, 0], [_PAD, _PAD], [_PAD, _PAD], [0, 0]], mode="SYMMETRIC")
        crops = tf.image.crop_and_resize(
            padded, crop_boxes, box_indices, [num_samples, num_samples]
        )  # [K, n, n, C] float32
        return tf.nn.avg_pool2d(crops, window, window, padding="VALID")  # [K, S, S, C]

    if gradient == "native":
        return forward(features)

    @tf.custom_gradient
    def pooled(features):
        def adjoint(upstream):  # [K, S, S, C] float32 -> [B, H, W, C]
            grad = _crop_and_resize_adjoint(
                upstream, crop_boxes, box_indices, tf.shape(features), output_size, sampling_ratio,
                segment_sum=gradient == "segment_sum",
            )
            return tf.cast(grad, features.dtype)

        return forward(features), adjoint

    return pooled(features)


def _adjoint_axis_taps(norm_start, norm_end, size, output_size: int, sampling_ratio: int):
    """Both bilinear taps of every sample tf.image.crop_and_resize takes along one axis, as unpadded pixels.

    Positions follow the CPU kernel's arithmetic (sample s at start * (Hp - 1) + s * (end - start) *
    (Hp - 1) / (n - 1); none outside [0, Hp - 1]; taps floor and ceil). Padded pixel p is unpadded
    pixel clip(p - 1, 0, H - 1): that is the SYMMETRIC pad's own adjoint.

    Args:
      norm_start, norm_end: float32 [K] normalized crop box corners (y1, y2 or x1, x2) on the padded axis.
      size: int32 scalar H (or W) of the unpadded level.

    Returns:
      int64 pixel indices [K, S, 2 * sampling_ratio] and float32 weights of the same shape; bin i owns
      the two taps of each of its sampling_ratio samples.
    """
    num_samples = output_size * sampling_ratio
    padded_last = tf.cast(size + 2 * _PAD - 1, tf.float32)
    if num_samples > 1:
        spacing = (norm_end - norm_start) * padded_last / (num_samples - 1)
        steps = tf.range(num_samples, dtype=tf.float32)
        coords = norm_start[:, None] * padded_last + steps * spacing[:, None]  # [K, n]
    else:  # the kernel samples a one-pixel crop at the box centre
        coords = (0.5 * (norm_start + norm_end) * padded_last)[:, None]
    inside = tf.cast((coords >= 0.0) & (coords <= padded_last), tf.float32)  # [K, n]
    low = tf.floor(coords)
    frac = coords - low
    taps = tf.stack([low, tf.math.ceil(coords)], axis=-1) - _PAD  # [K, n, 2] unpadded coordinates
    taps = tf.clip_by_value(taps, 0.0, tf.cast(size - 1, tf.float32))
    weights = tf.stack([(1.0 - frac) * inside, frac * inside], axis=-1)  # [K, n, 2]
    shape = [-1, output_size, 2 * sampling_ratio]
    return tf.reshape(tf.cast(taps, tf.int64), shape), tf.reshape(weights, shape)


def _crop_and_resize_adjoint(
    upstream: tf.Tensor,
    crop_boxes: tf.Tensor,
    box_indices: tf.Tensor,
    features_shape: tf.Tensor,
    output_size: int,
    sampling_ratio: int,
    segment_sum: bool = False,
) -> tf.Tensor:
    """Gradient of `_crop_and_resize_level` w.r.t. its unpadded features, computed deterministically.

    The level is linear in the features, out = A @ f with A sparse [K * S * S, B * H * W] (each bin
    holds (2 * sampling_ratio)**2 taps of weight w_y * w_x / sampling_ratio**2; the pad and the
    average pool are folded into A), so the gradient is A^T @ upstream: one
    tf.sparse.sparse_dense_matmul, whose CPU kernel accumulates in a fixed serial order. It replaces
    TensorFlow's CropAndResizeGradImage, which loses updates between threads (module docstring),
    AvgPoolGrad's [K, n, n, C] crop gradient (205 MB for the box head's P2 RoIs of the R50 training
    step) and the padded [B, H + 2, W + 2, C] image gradient (130 MB).

    Args:
      upstream: float32 [K, S, S, C] gradient of the pooled output.
      crop_boxes: float32 [K, 4] the normalized boxes crop_and_resize sampled.
      box_indices: int32 [K] batch index of each box.
      features_shape: int32 [4] (B, H, W, C) of the unpadded features.
      segment_sum: A^T @ upstream as tf.math.unsorted_segment_sum over the taps instead of
        sparse_dense_matmul: deterministic on GPU under enable_op_determinism (sparse_dense_matmul
        raises there), for a [K * S * S * (2 * sampling_ratio)**2, C] temporary of weighted taps.

    Returns:
      float32 [B, H, W, C].
    """
    height, width, channels = features_shape[1], features_shape[2], features_shape[3]
    y1, x1, y2, x2 = tf.unstack(crop_boxes, axis=-1)
    rows, row_weights = _adjoint_axis_taps(y1, y2, height, output_size, sampling_ratio)  # [K, S, 2k]
    cols, col_weights = _adjoint_axis_taps(x1, x2, width, output_size, sampling_ratio)  # [K, S, 2k]
    images = tf.cast(box_indices, tf.int64)[:, None, None, None, None]
    pixels = (
        (images * tf.cast(height, tf.int64) + rows[:, :, None, :, None]) * tf.cast(width, tf.int64)
        + cols[:, None, :, None, :]
    )  # [K, S, S, 2k, 2k] flat (b, y, x) index of each tap
    weights = row_weights[:, :, None, :, None] * col_weights[:, None, :, None, :] / float(sampling_ratio**2)
    num_bins = tf.cast(tf.size(upstream) // channels, tf.int64)  # K * S * S
    bins = tf.repeat(tf.range(num_bins), (2 * sampling_ratio) ** 2)  # row of A of each tap, row-major
    if segment_sum:
        taps = tf.gather(tf.reshape(upstream, [-1, channels]), bins) * tf.reshape(weights, [-1, 1])
        grad = tf.math.unsorted_segment_sum(taps, tf.reshape(pixels, [-1]), tf.reduce_prod(features_shape[:3]))
        return tf.reshape(grad, features_shape)  # [B, H, W, C]
    matrix = tf.sparse.SparseTensor(
        tf.stack([bins, tf.reshape(pixels, [-1])], axis=1),
        tf.reshape(weights, [-1]),
        dense_shape=tf.stack([num_bins, tf.cast(tf.reduce_prod(features_shape[:3]), tf.int64)]),
    )
    grad = tf.sparse.sparse_dense_matmul(matrix, tf.reshape(upstream, [-1, channels]), adjoint_a=True)
    return tf.reshape(grad, features_shape)  # [B, H, W, C]


def _roi_align_crop_and_resize(
    features_list: List[tf.Tensor],
    boxes: tf.Tensor,
    level_index: tf.Tensor,
    output_size: int,
    sampling_ratio: int,
    gradient: str = "sparse_matmul",
) -> tf.Tensor:
    """crop_and_resize backend over L levels; boxes [B, R, 4] already in their level's pixels."""
    batch_size, num_boxes = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat_boxes = tf.reshape(boxes, [-1, 4])  # [B * R, 4]
    box_indices = tf.repeat(tf.range(batch_size), num_boxes)  # [B * R]
    if len(features_list) == 1:
        crops = _crop_and_resize_level(
            features_list[0], flat_boxes, box_indices, output_size, sampling_ratio, gradient
        )  # [B * R, S, S, C]
    else:
        # Each box is sampled only on its own level; partition/stitch keep the output order.
        positions = tf.range(batch_size * num_boxes)
        parts = tf.dynamic_partition(positions, tf.reshape(level_index, [-1]), len(features_list))
        level_crops = []
        for features, part in zip(features_list, parts):
            level_crops.append(
                _crop_and_resize_level(
                    features,
                    tf.gather(flat_boxes, part),  # [K_l, 4]
                    tf.gather(box_indices, part),  # [K_l]
                    output_size,
                    sampling_ratio,
                    gradient,
                )
            )  # [K_l, S, S, C]
        crops = tf.dynamic_stitch(parts, level_crops)  # [B * R, S, S, C]
    channels = tf.shape(features_list[0])[-1]
    crops = tf.reshape(crops, [batch_size, num_boxes, output_size, output_size, channels])
    return tf.cast(crops, features_list[0].dtype)  # [B, R, S, S, C]


# ----------------------------------------------------------------------------------------------
# gather backend
# ----------------------------------------------------------------------------------------------


def _axis_taps(start, length, size, output_size: int, sampling_ratio: int):
    """Pixel indices and bilinear weights along one axis for every sample of every box.

    Args:
      start, length: float32 [B, R] box start (y1 or x1) and extent in the level's pixels.
      size: float32 [B, R] feature height (or width) of each box's level.

    Returns:
      indices int32 [B, R, 2n] and weights float32 [B, R, 2n]; entry 2 * s + t is tap t (low, high)
      of sample s = bin * sampling_ratio + k, so each bin owns 2 * sampling_ratio consecutive entries.
    """
    num_samples = output_size * sampling_ratio
    fractions = (tf.range(num_samples, dtype=tf.float32) + 0.5) / num_samples  # [n]
    coords = (start - _HALF_PIXEL)[..., None] + fractions * length[..., None]  # [B, R, n]
    return _bilinear_taps(coords, size, sample_weights=1.0)


def _bilinear_taps(coords, size, sample_weights):
    """coords float32 [B, R, n] sample positions along one axis, size float32 [B, R] the level's extent,
    sample_weights broadcastable to [B, R, n] -> (indices int32 [B, R, 2n], weights float32 [B, R, 2n]),
    entry 2 * s + t = tap t (low, high) of sample s."""
    size = size[..., None]  # [B, R, 1]
    # detectron2's rule: samples more than one pixel outside the map contribute nothing.
    inside = tf.cast((coords >= -1.0) & (coords <= size), tf.float32) * sample_weights
    coords = tf.clip_by_value(coords, 0.0, size - 1.0)
    low = tf.floor(coords)
    high = tf.minimum(low + 1.0, size - 1.0)
    frac = coords - low
    indices = tf.stack([low, high], axis=-1)  # [B, R, n, 2]
    weights = tf.stack([(1.0 - frac) * inside, frac * inside], axis=-1)  # [B, R, n, 2]
    batch_size, num_boxes, num_samples = tf.shape(coords)[0], tf.shape(coords)[1], coords.shape[-1]
    indices = tf.reshape(tf.cast(indices, tf.int32), [batch_size, num_boxes, 2 * num_samples])
    weights = tf.reshape(weights, [batch_size, num_boxes, 2 * num_samples])
    return indices, weights


def _adaptive_axis_taps(start, length, size, output_size: int):
    """`_axis_taps` for adaptive sampling: ceil(length / S) samples per bin (at most G =
    MAX_ADAPTIVE_SAMPLING_RATIO; the G slots beyond a box's count weigh 0), each weighted 1 / count so
    the bin average needs no further division (torchvision's and detectron2's kernel: count = g_y * g_x,
    a zero count gives 0).

    Args: start, length, size float32 [B, R] as in `_axis_taps`.
    Returns: indices int32 [B, R, 2 * S * G], weights float32 of the same shape (entry 2 * s + t is tap
    t of slot s = bin * G + k).
    """
    max_grid = MAX_ADAPTIVE_SAMPLING_RATIO
    bin_size = length / output_size  # [B, R]
    grid = tf.clip_by_value(tf.math.ceil(bin_size), 0.0, float(max_grid))  # [B, R] samples per bin
    bins = tf.repeat(tf.range(output_size, dtype=tf.float32), max_grid)  # [n] bin of each slot
    slots = tf.tile(tf.range(max_grid, dtype=tf.float32), [output_size])  # [n] k of each slot
    # The kernels' arithmetic: y = start + bin * bin_size + (k + 0.5) * bin_size / grid.
    coords = ((start - _HALF_PIXEL)[..., None] + bins * bin_size[..., None]
              + (slots + 0.5) * (bin_size / tf.maximum(grid, 1.0))[..., None])  # [B, R, n]
    used = tf.cast(slots < grid[..., None], tf.float32) / tf.maximum(grid, 1.0)[..., None]  # [B, R, n]
    return _bilinear_taps(coords, size, sample_weights=used)


def _roi_align_gather(
    features_list: List[tf.Tensor],
    boxes: tf.Tensor,
    level_index: tf.Tensor,
    output_size: int,
    sampling_ratio: int,
) -> tf.Tensor:
    """gather backend over L levels; boxes [B, R, 4] already in their level's pixels.
    sampling_ratio 0 = adaptive (`_adaptive_axis_taps`)."""
    output_dtype = features_list[0].dtype
    dtype = output_dtype if output_dtype in _SAMPLING_DTYPES else tf.float32
    batch_size, num_boxes = tf.shape(boxes)[0], tf.shape(boxes)[1]
    channels = tf.shape(features_list[0])[-1]
    # One flat pixel axis over all levels so a single gather serves boxes of every level.
    flat_features = tf.concat(
        [tf.reshape(tf.cast(f, dtype), [batch_size, -1, channels]) for f in features_list], axis=1
    )  # [B, sum_l H_l * W_l, C]
    heights = tf.stack([tf.shape(f)[1] for f in features_list])  # [L]
    widths = tf.stack([tf.shape(f)[2] for f in features_list])  # [L]
    offsets = tf.cumsum(heights * widths, exclusive=True)  # [L]

    box_heights = tf.cast(tf.gather(heights, level_index), tf.float32)  # [B, R]
    box_widths = tf.gather(widths, level_index)  # [B, R] int32, row stride of the flat index
    box_offsets = tf.gather(offsets, level_index)  # [B, R]

    def pooled_taps(rows, row_weights, cols, col_weights, taps_per_bin):
        """Sum over each bin's taps of the weighted gathered pixels: [B, R, S, S, C]."""
        flat_indices = (
            box_offsets[..., None, None]
            + rows[..., :, None] * box_widths[..., None, None]
            + cols[..., None, :]
        )  # [B, R, 2n, 2n]
        taps = tf.gather(flat_features, flat_indices, batch_dims=1)  # [B, R, 2n, 2n, C]
        kernel = row_weights[..., :, None] * col_weights[..., None, :]  # [B, R, 2n, 2n]
        taps = taps * tf.cast(kernel, dtype)[..., None]
        taps = tf.reshape(
            taps, [batch_size, num_boxes, output_size, taps_per_bin, output_size, taps_per_bin, channels]
        )  # [B, R, S, 2k, S, 2k, C]
        return tf.reduce_sum(taps, axis=[3, 5])  # [B, R, S, S, C]

    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    if sampling_ratio == 0:
        # One gather per (row slot, column slot) pair instead of one over all G x G slots: the same sum
        # with a G**2 times smaller gathered tensor ([B, R, 2S, 2S, C] each). The adaptive weights
        # already divide by the sample count.
        max_grid = MAX_ADAPTIVE_SAMPLING_RATIO
        rows, row_weights = _adaptive_axis_taps(y1, y2 - y1, box_heights, output_size)
        cols, col_weights = _adaptive_axis_taps(x1, x2 - x1, tf.cast(box_widths, tf.float32), output_size)

        def slot(values, k):  # [B, R, S * G * 2] -> taps of slot k of every bin, [B, R, S * 2]
            values = tf.reshape(values, [batch_size, num_boxes, output_size, max_grid, 2])[:, :, :, k]
            return tf.reshape(values, [batch_size, num_boxes, 2 * output_size])

        pooled = None
        for ky in range(max_grid):
            for kx in range(max_grid):
                part = pooled_taps(slot(rows, ky), slot(row_weights, ky), slot(cols, kx), slot(col_weights, kx), 2)
                pooled = part if pooled is None else pooled + part
        return pooled
    rows, row_weights = _axis_taps(y1, y2 - y1, box_heights, output_size, sampling_ratio)
    cols, col_weights = _axis_taps(
        x1, x2 - x1, tf.cast(box_widths, tf.float32), output_size, sampling_ratio
    )
    pooled = pooled_taps(rows, row_weights, cols, col_weights, 2 * sampling_ratio)
    return tf.cast(pooled / tf.cast(sampling_ratio * sampling_ratio, dtype), output_dtype)


def _unaligned_to_aligned(boxes: tf.Tensor) -> tf.Tensor:
    """Boxes of the un-aligned convention (torchvision aligned=False: no half-pixel shift, RoIs at least
    one pixel per side) rewritten as aligned boxes that sample the same points: start + 0.5, and the
    side max(side, 1). boxes float32 [..., 4] [y1, x1, y2, x2] level pixels."""
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    height = tf.maximum(y2 - y1, _UNALIGNED_MIN_SIZE)
    width = tf.maximum(x2 - x1, _UNALIGNED_MIN_SIZE)
    y1, x1 = y1 + _HALF_PIXEL, x1 + _HALF_PIXEL
    return tf.stack([y1, x1, y1 + height, x1 + width], axis=-1)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def _dispatch(features_list, boxes, level_index, output_size, sampling_ratio, backend, gradient="sparse_matmul",
              aligned=True):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if sampling_ratio < 0:
        raise ValueError(f"sampling_ratio must be >= 1, or 0 (adaptive), got {sampling_ratio}")
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    if not aligned:
        boxes = _unaligned_to_aligned(boxes)
    # Adaptive sampling has a per-box sample count, which crop_and_resize's fixed crop cannot express:
    # both backends run it through the gather formulation.
    if backend == "gather" or sampling_ratio == 0:
        return _roi_align_gather(features_list, boxes, level_index, output_size, sampling_ratio)
    return _roi_align_crop_and_resize(features_list, boxes, level_index, output_size, sampling_ratio, gradient)


def roi_align(
    features: tf.Tensor,
    boxes: tf.Tensor,
    output_size: int,
    sampling_ratio: int = 2,
    backend: str = "crop_and_resize",
    gradient: str = "sparse_matmul",
    aligned: bool = True,
) -> tf.Tensor:
    """RoIAlign of every box on one feature map.

    Args:
      features: [B, H, W, C] float32 / float16 / bfloat16, one level.
      boxes: float [B, R, 4] [y1, x1, y2, x2] in this level's pixel coordinates (input-image boxes
        already divided by the level's stride); continuous coordinates, no clipping needed.
      output_size: S, bins per side.
      sampling_ratio: samples per bin and axis (>= 1); the bin value is their mean. 0 = adaptive,
        ceil(roi_size / output_size) per box and axis (at most MAX_ADAPTIVE_SAMPLING_RATIO), computed
        with the gather formulation whatever the backend.
      backend: "crop_and_resize" (not XLA compilable) or "gather" (XLA/TPU friendly).
      gradient: crop_and_resize backend only, one of GRADIENTS (same values, see device_defaults.py).
      aligned: True = half-pixel aligned (detectron2 ROIAlignV2); False = torchvision's aligned=False
        (no half-pixel shift, RoIs enlarged to at least one pixel per side).

    Returns:
      [B, R, S, S, C] in the dtype of `features`.
    """
    level_index = tf.zeros(tf.shape(boxes)[:2], tf.int32)  # [B, R]
    return _dispatch([features], boxes, level_index, output_size, sampling_ratio, backend, gradient, aligned)


def multilevel_roi_align(
    features: Dict[str, tf.Tensor],
    boxes: tf.Tensor,
    output_size: int,
    sampling_ratio: int = 2,
    backend: str = "crop_and_resize",
    min_level: int = 2,
    max_level: int = 5,
    canonical_size: float = CANONICAL_SIZE,
    canonical_level: int = CANONICAL_LEVEL,
    gradient: str = "sparse_matmul",
    aligned: bool = True,
    torchvision_level_mapper: bool = False,
) -> tf.Tensor:
    """RoIAlign of every box on its FPN level (FPN paper eq. 1).

    Args:
      features: dict {"P2": [B, H / 4, W / 4, C], ..., f"P{max_level}"}; extra keys (e.g. "P6") are
        ignored. All levels share dtype and C; level l has stride 2**l.
      boxes: float [B, R, 4] [y1, x1, y2, x2] in input-image pixels (padding rows allowed; they are
        sampled on min_level and their output is to be ignored by the caller).
      output_size, sampling_ratio, backend, gradient, aligned: as in `roi_align`.
      min_level, max_level, canonical_size, canonical_level: as in `assign_levels`.
      torchvision_level_mapper: `assign_levels`' torchvision_epsilon.

    Returns:
      [B, R, S, S, C] in the dtype of the features.
    """
    features_list: Sequence[tf.Tensor] = [
        features[_level_key(level)] for level in range(min_level, max_level + 1)
    ]
    boxes = tf.cast(boxes, tf.float32)
    levels = assign_levels(boxes, min_level, max_level, canonical_size, canonical_level,
                           torchvision_epsilon=torchvision_level_mapper)  # [B, R]
    strides = tf.pow(2.0, tf.cast(levels, tf.float32))  # [B, R]
    level_boxes = boxes / strides[..., None]  # [B, R, 4] in each box's level pixels
    return _dispatch(
        list(features_list), level_boxes, levels - min_level, output_size, sampling_ratio, backend, gradient,
        aligned)
