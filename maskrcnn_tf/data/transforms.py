"""Box- and mask-aware transforms of ONE decoded example (pure TF, no config objects).

`transform_example` turns a decoded record into the per-image part of the batch contract
(docs/design.md section 5); `pipeline.build_dataset` maps it over the dataset and batches.
The smaller functions are public so tests can check each geometric step on its own.

A decoded example (what `pipeline` hands over) is a dict:
  image      uint8 [h, w, 3] RGB, original size
  boxes      float32 [n, 4] [y1, x1, y2, x2] absolute pixels of the ORIGINAL image (continuous coords)
  classes    int64 [n] dataset category ids
  is_crowd   bool [n]
  masks      uint8 [n, hm, wm] binary full-image masks; (hm, wm) = (h, w) normally, (1, 1) when the
             record has no masks (then every value is 0 and has_masks is False)
  has_masks  bool []

Decisions (beyond docs/design.md):
- Order: crowd / unknown-class instances out -> flip -> normalise -> resize (+ scale-jitter crop)
  -> pad -> vanished instances out -> keep the N largest -> crop gt masks. Instances are never
  gathered before the end: every step narrows a `keep` mask over the record's n instances. The
  full-size masks are never flipped, resized or gathered: the crop of each kept instance reads the
  original mask directly (a flip becomes a mirrored crop box), which is what makes 1024x1024
  training with ~100 instances cheap.
- Normalisation happens at the original size, before the resize: bilinear weights sum to 1, so
  resize((x - mean) / std) equals (resize(x) - mean) / std, on 2-4x fewer pixels.
- Resize ("fit" mode, the default): scale = min(H / h, W / w) * r with r ~ U(scale_range) (r = 1 without
  jitter), so the long side fits the output. "short_side" mode (torchvision's GeneralizedRCNNTransform):
  scale = min(short / min(h, w), max_long / max(h, w), H / h, W / w) * r, computed in float64 as
  Python does, and the resized size is floor(h * scale) x floor(w * scale) (torch's interpolate with
  recompute_scale_factor); the last two terms only act when the canvas cannot hold the image (see
  config.ModelConfig.resize_mode). tf.image.resize's bilinear (half-pixel centres, no antialias) is
  torch's bilinear with align_corners=False. In "fit" mode the resized size is rounded to whole
  pixels. Either way the per-axis scale recorded in
  image_info is resized / original (it differs from `scale` by the rounding), so boxes land exactly on
  the resized pixels. With r > 1 the scaled image is larger than the output: a random whole-pixel
  offset picks the window (Model Garden / detectron2 style crop); boxes are shifted, clipped to the
  window, and instances whose clipped box has a side <= MIN_BOX_SIDE pixels are dropped ("vanished").
- image_info float32 [4, 2]: original (h, w); valid (h, w) of the output that holds image pixels
  (the rest is padding); scale (y, x) = resized / original; offset (y, x) of the crop window in the
  resized image. Output pixel p maps back to the original as (p + offset) / scale.
- More than N instances: the N with the largest clipped-box area in the output are kept (ties: the
  lower record index wins, top_k is stable), and kept instances stay in record order. The count of dropped
  ones is returned in `stats["num_truncated"]` (pipeline.py turns the stats into process-wide counters
  and a warning naming the image).
- Class ids: category_ids[i] -> i + 1; a non-crowd instance whose id is not in category_ids is dropped
  and counted ("num_unmapped"). Crowd instances are dropped from the targets and counted ("num_crowd").
- Gt mask crops: each kept instance's full-size binary mask is sampled at the Mc x Mc cell centres of
  its output gt box mapped back into the mask's own pixels (half-pixel aligned, i.e. RoIAlign with one
  bilinear sample per cell; samples within half a pixel of the image border clamp to the border pixel,
  as RoIAlign does), done once per image with `tf.image.crop_and_resize` on the uint8 mask. After a
  flip the box is mirrored into the unflipped mask and given with x1 > x2, which crop_and_resize
  answers with the left-right mirrored crop.
  Cell (i, j) covers [y1 + i * bh / Mc, y1 + (i + 1) * bh / Mc) x (same in x) of the gt box, which is
  how ops/masks.mask_targets reads them. Values are bilinear in [0, 1], not thresholded (mask_targets
  thresholds after its own resampling, so thresholding twice is avoided).
- Padding: gt rows beyond the kept count are boxes -1, classes -1, masks 0; the image is normalised
  ((rgb - pixel_mean) / pixel_std) first and then padded bottom/right with 0.
- Randomness: stateless ops driven by a per-example seed int32/int64 [2], so a seeded pipeline is
  deterministic whatever the parallelism.
"""

from typing import Dict, Sequence, Tuple

import tensorflow as tf

# Clipped boxes with a side at or below this many pixels are "vanished" and dropped (detectron2 uses a
# similar 1e-5 threshold; 1e-3 stays well above float32 rounding at 1024 px, whose ulp is ~6e-5).
MIN_BOX_SIDE = 1e-3
# Number of independent random streams one example needs: flip, scale, crop offset.
_NUM_RANDOM_STREAMS = 3
# Edge-replicated border added around masks before cropping (see crop_masks).
_BORDER = 1
STAT_KEYS = ("num_crowd", "num_unmapped", "num_vanished", "num_truncated")


def _count(mask: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(mask, tf.int32))


def map_classes(classes: tf.Tensor, is_crowd: tf.Tensor, category_ids: Sequence[int]):
    """Maps dataset category ids to contiguous ids 1..K and decides which instances are targets.

    Args:
      classes: int32/int64 [n] dataset category ids.
      is_crowd: bool [n].
      category_ids: python sequence of K dataset ids; category_ids[i] becomes class i + 1.
    Returns:
      contiguous int32 [n] (0 where the id is unknown), keep bool [n] (mapped and not crowd),
      num_crowd int32 [], num_unmapped int32 [] (non-crowd instances with an unknown id).
    """
    ids = tf.constant(list(category_ids), tf.int64)  # [K]
    # A [n, K] comparison instead of a hash table: K is small and nothing needs initialising.
    matches = tf.equal(tf.cast(classes, tf.int64)[:, None], ids[None, :])  # [n, K]
    mapped = tf.reduce_any(matches, axis=1)
    contiguous = tf.where(mapped, tf.argmax(tf.cast(matches, tf.int32), axis=1, output_type=tf.int32) + 1, 0)
    is_crowd = tf.cast(is_crowd, tf.bool)
    keep = mapped & ~is_crowd
    return contiguous, keep, _count(is_crowd), _count(~mapped & ~is_crowd)


def horizontal_flip(image: tf.Tensor, boxes: tf.Tensor):
    """Mirrors image [h, w, C] and boxes float32 [n, 4] (absolute [y1, x1, y2, x2] of this image)
    left-right. Masks are not touched: `crop_masks(..., flipped=True)` reads them mirrored."""
    width = tf.cast(tf.shape(image)[1], boxes.dtype)
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    flipped = tf.stack([y1, width - x2, y2, width - x1], axis=-1)  # [n, 4]
    return tf.reverse(image, axis=[1]), flipped


def random_horizontal_flip(image, boxes, probability: float, seed: tf.Tensor):
    """`horizontal_flip` with the given probability; seed int [2] for a stateless draw.
    Returns (image, boxes, flipped bool [])."""
    flipped = tf.random.stateless_uniform([], seed) < probability
    image, boxes = tf.cond(flipped, lambda: horizontal_flip(image, boxes), lambda: (image, boxes))
    return image, boxes, flipped


RESIZE_MODES = ("fit", "short_side")


def resize_geometry(image_hw: tf.Tensor, output_size: Tuple[int, int], scale_range: Tuple[float, float],
                    seed: tf.Tensor, mode: str = "fit", short_side: int = 800,
                    max_long_side: int = 1333) -> tf.Tensor:
    """Chooses scale and crop window. image_hw int [2] original (h, w); output_size python (H, W);
    scale_range python (lo, hi), (1, 1) = no jitter; seed int [2]; mode "fit" | "short_side" with
    short_side / max_long_side (module docstring).

    Returns image_info float32 [4, 2]: original (h, w); valid (h, w); scale (y, x); offset (y, x).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_geometry: mode={mode!r}; allowed: {', '.join(RESIZE_MODES)}")
    scale_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    original = tf.cast(image_hw, tf.float32)  # [2]
    out = tf.constant(output_size, tf.float32)  # [2]
    low, high = float(scale_range[0]), float(scale_range[1])
    jitter = tf.random.stateless_uniform([], scale_seed, low, high) if low != high else tf.constant(low)
    if mode == "fit":
        fit = tf.reduce_min(out / original)
        resized = tf.maximum(tf.round(original * fit * jitter), 1.0)  # [2] whole pixels
    else:
        # float64 like torchvision's Python arithmetic, so floor() lands on the same pixel count.
        original64 = tf.cast(image_hw, tf.float64)
        out64 = tf.constant(output_size, tf.float64)
        scale = tf.minimum(short_side / tf.reduce_min(original64), max_long_side / tf.reduce_max(original64))
        scale = tf.minimum(scale, tf.reduce_min(out64 / original64)) * tf.cast(jitter, tf.float64)
        resized = tf.cast(tf.maximum(tf.floor(original64 * scale), 1.0), tf.float32)  # [2] whole pixels
    max_offset = tf.maximum(resized - out, 0.0)  # [2]
    # floor(u * (max + 1)) with u in [0, 1): a uniform whole-pixel offset in [0, max_offset].
    offset = tf.floor(tf.random.stateless_uniform([2], offset_seed) * (max_offset + 1.0))
    valid = tf.minimum(resized - offset, out)
    return tf.stack([original, valid, resized / original, offset])  # [4, 2]


def resize_and_crop_image(image: tf.Tensor, image_info: tf.Tensor) -> tf.Tensor:
    """image [h, w, 3] (any real dtype) -> float32 [valid_h, valid_w, 3]: bilinear resize to
    round(original * scale) then the crop window of image_info."""
    resized_hw = tf.cast(tf.round(image_info[0] * image_info[2]), tf.int32)  # [2]
    resized = tf.image.resize(tf.cast(image, tf.float32), resized_hw, method="bilinear")
    offset = tf.cast(image_info[3], tf.int32)
    valid = tf.cast(image_info[1], tf.int32)
    return tf.slice(resized, tf.concat([offset, [0]], 0), tf.concat([valid, [-1]], 0))  # [vh, vw, 3]


def transform_boxes(boxes: tf.Tensor, image_info: tf.Tensor) -> tf.Tensor:
    """boxes float32 [n, 4] absolute pixels of the original image -> [n, 4] pixels of the output,
    clipped to the valid window [0, valid_h] x [0, valid_w]."""
    scale = tf.tile(image_info[2], [2])  # [4] (y, x, y, x)
    offset = tf.tile(image_info[3], [2])  # [4]
    upper = tf.tile(image_info[1], [2])  # [4]
    return tf.clip_by_value(boxes * scale - offset, 0.0, upper)


def is_visible(boxes: tf.Tensor) -> tf.Tensor:
    """bool [...]: both sides of boxes [..., 4] exceed MIN_BOX_SIDE pixels."""
    return ((boxes[..., 2] - boxes[..., 0]) > MIN_BOX_SIDE) & ((boxes[..., 3] - boxes[..., 1]) > MIN_BOX_SIDE)


def select_largest(boxes: tf.Tensor, keep: tf.Tensor, max_instances: int):
    """Picks at most N kept instances, the largest by box area, in record order.

    boxes float32 [n, 4], keep bool [n], max_instances python N.
    Returns indices int32 [N] into n (valid ones first; padding slots hold 0), valid bool [N],
    num_truncated int32 [] (kept instances left out because there were more than N).
    """
    n = tf.shape(keep)[0]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Sentinels below any real area: dropped instances -1, the N filler slots -2 (so top_k always has
    # N candidates even when n < N).
    score = tf.concat([tf.where(keep, area, -1.0), tf.fill([max_instances], -2.0)], axis=0)  # [n + N]
    _, top = tf.math.top_k(score, k=max_instances)  # [N]
    valid = tf.gather(tf.concat([keep, tf.zeros([max_instances], tf.bool)], axis=0), top)  # [N]
    # Sort the chosen indices so kept instances keep their record order and invalid slots go last.
    order = tf.sort(tf.where(valid, top, n + max_instances))  # [N]
    valid = order < n
    indices = tf.where(valid, order, 0)
    num_truncated = tf.maximum(_count(keep) - max_instances, 0)
    return indices, valid, num_truncated


def _edge_pad(masks: tf.Tensor) -> tf.Tensor:
    """[n, h, w] -> [n, h + 2, w + 2] repeating the border rows/columns (concat: a plain copy, several
    times faster than tf.pad's SYMMETRIC mode on uint8)."""
    masks = tf.concat([masks[:, :1], masks, masks[:, -1:]], axis=1)  # [n, h + 2, w]
    return tf.concat([masks[:, :, :1], masks, masks[:, :, -1:]], axis=2)  # [n, h + 2, w + 2]


def crop_masks(masks: tf.Tensor, boxes: tf.Tensor, indices: tf.Tensor, image_info: tf.Tensor,
               mask_size: int, flipped=False) -> tf.Tensor:
    """Samples each instance's full-size mask inside its output gt box.

    Args:
      masks: uint8 [n, hm, wm] binary full-image masks of the UNFLIPPED original image (any resolution
        covering the whole image).
      boxes: float32 [k, 4] gt boxes in output pixels ([y1, x1, y2, x2]).
      indices: int32 [k] row of `masks` for each box.
      image_info: float32 [4, 2] of this example (maps output pixels back to the original image).
      mask_size: python Mc.
      flipped: bool [] (or python bool): the output image was mirrored left-right.
    Returns:
      float32 [k, Mc, Mc] in [0, 1]; cell (i, j) is the bilinear mask value at the centre of the
      box's cell (i, j) (see the module docstring).
    """
    original_hw = image_info[0]
    mask_hw = tf.cast(tf.shape(masks)[1:3], tf.float32)  # [2]
    # Output pixels -> original pixels -> the mask's own pixels.
    to_mask = tf.tile(mask_hw / original_hw, [2])  # [4]
    src = (boxes + tf.tile(image_info[3], [2])) / tf.tile(image_info[2], [2]) * to_mask  # [k, 4]
    y1, x1, y2, x2 = tf.unstack(src, axis=-1)
    half_cell_h = 0.5 * (y2 - y1) / mask_size
    half_cell_w = 0.5 * (x2 - x1) / mask_size
    # Continuous coordinates of the first and last cell centres.
    first_y, last_y = y1 + half_cell_h, y2 - half_cell_h
    first_x, last_x = x1 + half_cell_w, x2 - half_cell_w
    # A mirrored image: the same centres seen in the unflipped mask, first > last (mirrored crop).
    first_x, last_x = (tf.where(flipped, mask_hw[1] - first_x, first_x),
                       tf.where(flipped, mask_hw[1] - last_x, last_x))
    # Cell centres within half a pixel of the image border fall outside the pixel centres, where
    # crop_and_resize would return its extrapolation value; RoIAlign clamps them to the border pixel
    # instead. A 1-pixel edge-replicating border does the same: a mask touching the border stays 1.
    padded = _edge_pad(masks)  # [n, hm + 2, wm + 2]
    # crop_and_resize samples from corner c1 * (size - 1) to c2 * (size - 1) in pixel-index
    # coordinates (pixel i centred at i, i.e. continuous - 0.5), + _BORDER in the padded mask
    # (tensorpack's transform_fpcoor_for_tf idea).
    shift = _BORDER - 0.5
    denom_h = mask_hw[0] + 2.0 * _BORDER - 1.0
    denom_w = mask_hw[1] + 2.0 * _BORDER - 1.0
    norm = tf.stack([(first_y + shift) / denom_h, (first_x + shift) / denom_w,
                     (last_y + shift) / denom_h, (last_x + shift) / denom_w], axis=-1)  # [k, 4]
    crops = tf.image.crop_and_resize(padded[..., None], norm, indices, [mask_size, mask_size],
                                     method="bilinear", extrapolation_value=0.0)  # [k, Mc, Mc, 1]
    return crops[..., 0]  # [k, Mc, Mc]


def normalize_image(image: tf.Tensor, pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> tf.Tensor:
    """float RGB [..., 3] in 0..255 -> (image - mean) / std, float32."""
    mean = tf.constant(pixel_mean, tf.float32)
    std = tf.constant(pixel_std, tf.float32)
    return (tf.cast(image, tf.float32) - mean) / std


def transform_example(example: Dict[str, tf.Tensor], *, output_size: Tuple[int, int], mask_size: int,
                      max_instances: int, category_ids: Sequence[int], pixel_mean: Sequence[float],
                      pixel_std: Sequence[float], flip_probability: float = 0.0,
                      scale_range: Tuple[float, float] = (1.0, 1.0), seed=None, resize_mode: str = "fit",
                      resize_short_side: int = 800, resize_max_long_side: int = 1333):
    """Decoded example (module docstring) -> (features, stats).

    features: images float32 [H, W, 3] normalised and zero-padded; image_info float32 [4, 2];
    gt_boxes float32 [N, 4] output pixels, -1 padded; gt_classes int32 [N] 1..K, -1 padded;
    gt_masks float32 [N, Mc, Mc] in [0, 1], 0 padded; has_masks bool [].
    stats: int32 [] counts of instances left out, keys STAT_KEYS.
    Evaluation passes flip_probability=0 and scale_range=(1, 1) (no augmentation). seed int [2]
    (stateless randomness); None = (0, 0), fine when there is no augmentation. resize_*: as
    resize_geometry's mode / short_side / max_long_side.
    """
    height, width = output_size
    seed = tf.zeros([2], tf.int64) if seed is None else seed
    flip_seed, geometry_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, _NUM_RANDOM_STREAMS))

    image, boxes, masks = example["image"], example["boxes"], example["masks"]
    classes, keep, num_crowd, num_unmapped = map_classes(example["classes"], example["is_crowd"], category_ids)
    flipped = False
    if flip_probability > 0:
        image, boxes, flipped = random_horizontal_flip(image, boxes, flip_probability, flip_seed)

    image_info = resize_geometry(tf.shape(image)[:2], output_size, scale_range, geometry_seed, mode=resize_mode,
                                 short_side=resize_short_side, max_long_side=resize_max_long_side)
    image = resize_and_crop_image(normalize_image(image, pixel_mean, pixel_std), image_info)
    image = tf.image.pad_to_bounding_box(image, 0, 0, height, width)  # [H, W, 3]

    boxes = transform_boxes(boxes, image_info)
    visible = is_visible(boxes)
    num_vanished = _count(keep & ~visible)
    keep = keep & visible
    indices, valid, num_truncated = select_largest(boxes, keep, max_instances)

    # Valid slots come first; gather only those (n may be 0) and pad the rest.
    num_valid = _count(valid)
    chosen = indices[:num_valid]  # [k]
    num_padding = max_instances - num_valid
    gt_boxes = tf.pad(tf.gather(boxes, chosen), [[0, num_padding], [0, 0]], constant_values=-1.0)  # [N, 4]
    gt_classes = tf.pad(tf.gather(classes, chosen), [[0, num_padding]], constant_values=-1)  # [N]
    crops = crop_masks(masks, gt_boxes[:num_valid], chosen, image_info, mask_size, flipped)  # [k, Mc, Mc]
    gt_masks = tf.pad(crops, [[0, num_padding], [0, 0], [0, 0]])  # [N, Mc, Mc]
    has_masks = tf.cast(example["has_masks"], tf.bool)
    gt_masks = gt_masks * tf.cast(has_masks, tf.float32)

    features = {
        "images": tf.ensure_shape(image, [height, width, 3]),
        "image_info": tf.ensure_shape(image_info, [4, 2]),
        "gt_boxes": tf.ensure_shape(gt_boxes, [max_instances, 4]),
        "gt_classes": tf.ensure_shape(tf.cast(gt_classes, tf.int32), [max_instances]),
        "gt_masks": tf.ensure_shape(gt_masks, [max_instances, mask_size, mask_size]),
        "has_masks": tf.ensure_shape(has_masks, []),
    }
    stats = {"num_crowd": num_crowd, "num_unmapped": num_unmapped, "num_vanished": num_vanished,
             "num_truncated": num_truncated}
    return features, stats
