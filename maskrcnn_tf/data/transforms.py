"""Box- and mask-aware transforms of ONE decoded example (pure TF, no config objects).

`transform_example` turns a decoded record into the per-image part of the batch contract
(docs/design.md section 5); `pipeline.build_dataset` maps it over the dataset and batches.
The smaller functions are public so tests can check each geometric step on its own. `transform_pair`
does the same for two examples at once, each the other's copy-paste source (data.copy_paste_probability).

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
  deterministic whatever the parallelism. The seed splits into three streams: flip, geometry (scale, then
  crop offset), copy-paste (whether to paste, which objects); the last is unused without copy-paste.
- Large-scale jitter (LSJ) is configuration, not code: "fit" mode, output (1024, 1024), scale_range
  (0.1, 2.0), flip 0.5 (docs/design.md section 5 lists where it differs from torchvision's and
  detectron2's).
- Copy-paste (Ghiasi et al. 2021, "Simple Copy-Paste"; torchvision's SimpleCopyPaste), `transform_pair`:
  two decoded examples, each transformed with its own geometry as above, each the other's source. With
  the given probability (and only when both have masks), a target gets a random subset of the source's
  instances pasted on top: among the source's instances still kept after its geometry whose box, clipped
  to the TARGET's valid window, keeps an area, m draws with replacement from the m of them, the distinct
  ones pasted (torchvision's randint + unique, ~63%; `paste_selection`). One alpha map: the union of the
  chosen full-size source masks (one sum > 0 at the mask resolution, flipped like the source) resized
  and cropped through the source's image_info like its image, >= 0.5, and limited to the target's valid
  window (the padding stays 0: the model may crop it away). Output image = source pixels where alpha,
  else target pixels (both normalised, same canvas). No Gaussian blending of the alpha edge (torchvision
  blurs it, sigma 2): the image and the masks agree on one hard edge.
  Target instances lose the pasted area: alpha is sampled at the cells of each gt crop (crop_and_resize
  with the same cell-centre convention) and the crop multiplied by (1 - alpha); an instance with a cell
  >= 0.5 before and none after is dropped ("num_occluded"). Target boxes are recomputed as torchvision
  does (masks_to_boxes of what is left), at gt-crop resolution: each side moves inwards by the whole
  cells the paste emptied on that side (a side it did not reach stays exactly the record's box), and
  the crop and the alpha are sampled again in the moved box. Pasted instances keep their source boxes
  (clipped to the target window, not recomputed, as after a jitter crop), classes and crops (from the
  source's masks through the source's image_info). Target instances first, then pasted ones, and
  select_largest(N) over all of them; num_truncated counts pasted instances left out too. An example
  whose draw pastes nothing is exactly transform_example's output with the same seed. Cost: a pasted
  example does canvas-sized element-wise work (alpha, composite) on top of transform_example
  (benchmarks/README.md, "Copy-paste"); the masks are still never rendered per instance.
"""

from typing import Dict, Sequence, Tuple

import tensorflow as tf

from maskrcnn_tf.config import RESIZE_MODES

# Clipped boxes with a side at or below this many pixels are "vanished" and dropped (detectron2 uses a
# similar 1e-5 threshold; 1e-3 stays well above float32 rounding at 1024 px, whose ulp is ~6e-5).
MIN_BOX_SIDE = 1e-3
# Number of independent random streams one example needs: flip, geometry (scale and crop offset),
# copy-paste (whether, and which objects).
_NUM_RANDOM_STREAMS = 3
# Edge-replicated border added around masks before cropping (see crop_masks).
_BORDER = 1
STAT_KEYS = ("num_crowd", "num_unmapped", "num_vanished", "num_truncated", "num_occluded")


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


def _prepare(example: Dict[str, tf.Tensor], seed, *, output_size: Tuple[int, int], category_ids: Sequence[int],
             pixel_mean: Sequence[float], pixel_std: Sequence[float], flip_probability: float,
             scale_range: Tuple[float, float], resize_mode: str, resize_short_side: int,
             resize_max_long_side: int) -> Dict[str, tf.Tensor]:
    """The per-example geometry (flip, normalise, resize, crop, pad) and the instances still in the
    running; no instance is gathered and no mask touched. Returns a dict: image [H, W, 3], image_info,
    boxes [n, 4] output pixels, classes int32 [n], keep bool [n], flipped, masks (the record's),
    has_masks, paste_seed int [2] (the third random stream) and the counts num_crowd, num_unmapped,
    num_vanished."""
    height, width = output_size
    seed = tf.zeros([2], tf.int64) if seed is None else seed
    flip_seed, geometry_seed, paste_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, _NUM_RANDOM_STREAMS))

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
    return {"image": image, "image_info": image_info, "boxes": boxes, "classes": classes, "keep": keep,
            "flipped": flipped, "masks": masks, "has_masks": tf.cast(example["has_masks"], tf.bool),
            "paste_seed": paste_seed, "num_crowd": num_crowd, "num_unmapped": num_unmapped,
            "num_vanished": num_vanished}


def _features(image, image_info, boxes, classes, crops, has_masks, num_valid, output_size, mask_size,
              max_instances):
    """Pads the k = num_valid chosen instances (boxes [k, 4], classes [k], crops [k, Mc, Mc]) to N and
    fixes the static shapes."""
    height, width = output_size
    num_padding = max_instances - num_valid
    gt_boxes = tf.pad(boxes, [[0, num_padding], [0, 0]], constant_values=-1.0)  # [N, 4]
    gt_classes = tf.pad(classes, [[0, num_padding]], constant_values=-1)  # [N]
    gt_masks = tf.pad(crops, [[0, num_padding], [0, 0], [0, 0]])  # [N, Mc, Mc]
    gt_masks = gt_masks * tf.cast(has_masks, tf.float32)
    return {
        "images": tf.ensure_shape(image, [height, width, 3]),
        "image_info": tf.ensure_shape(image_info, [4, 2]),
        "gt_boxes": tf.ensure_shape(gt_boxes, [max_instances, 4]),
        "gt_classes": tf.ensure_shape(tf.cast(gt_classes, tf.int32), [max_instances]),
        "gt_masks": tf.ensure_shape(gt_masks, [max_instances, mask_size, mask_size]),
        "has_masks": tf.ensure_shape(has_masks, []),
    }


def _finish(stage: Dict[str, tf.Tensor], output_size, mask_size: int, max_instances: int):
    """A prepared example without pasting -> (features, stats) of transform_example."""
    boxes, keep = stage["boxes"], stage["keep"]
    indices, valid, num_truncated = select_largest(boxes, keep, max_instances)
    # Valid slots come first; gather only those (n may be 0) and pad the rest.
    num_valid = _count(valid)
    chosen = indices[:num_valid]  # [k]
    chosen_boxes = tf.gather(boxes, chosen)  # [k, 4]
    crops = crop_masks(stage["masks"], chosen_boxes, chosen, stage["image_info"], mask_size,
                       stage["flipped"])  # [k, Mc, Mc]
    features = _features(stage["image"], stage["image_info"], chosen_boxes, tf.gather(stage["classes"], chosen),
                         crops, stage["has_masks"], num_valid, output_size, mask_size, max_instances)
    stats = {"num_crowd": stage["num_crowd"], "num_unmapped": stage["num_unmapped"],
             "num_vanished": stage["num_vanished"], "num_truncated": num_truncated,
             "num_occluded": tf.constant(0, tf.int32)}
    return features, stats


def transform_example(example: Dict[str, tf.Tensor], *, output_size: Tuple[int, int], mask_size: int,
                      max_instances: int, category_ids: Sequence[int], pixel_mean: Sequence[float],
                      pixel_std: Sequence[float], flip_probability: float = 0.0,
                      scale_range: Tuple[float, float] = (1.0, 1.0), seed=None, resize_mode: str = "fit",
                      resize_short_side: int = 800, resize_max_long_side: int = 1333):
    """Decoded example (module docstring) -> (features, stats).

    features: images float32 [H, W, 3] normalised and zero-padded; image_info float32 [4, 2];
    gt_boxes float32 [N, 4] output pixels, -1 padded; gt_classes int32 [N] 1..K, -1 padded;
    gt_masks float32 [N, Mc, Mc] in [0, 1], 0 padded; has_masks bool [].
    stats: int32 [] counts of instances left out, keys STAT_KEYS (num_occluded is 0 here).
    Evaluation passes flip_probability=0 and scale_range=(1, 1) (no augmentation). seed int [2]
    (stateless randomness); None = (0, 0), fine when there is no augmentation. resize_*: as
    resize_geometry's mode / short_side / max_long_side.
    """
    stage = _prepare(example, seed, output_size=output_size, category_ids=category_ids, pixel_mean=pixel_mean,
                     pixel_std=pixel_std, flip_probability=flip_probability, scale_range=scale_range,
                     resize_mode=resize_mode, resize_short_side=resize_short_side,
                     resize_max_long_side=resize_max_long_side)
    return _finish(stage, output_size, mask_size, max_instances)


# ------------------------------------------------------------------------------------------ copy-paste


def paste_selection(candidates: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """torchvision's random subset of the m candidates: m draws with replacement from 0..m-1, the
    distinct ones chosen (about 1 - 1/e = 63% of them for large m, always the one when m = 1).

    candidates bool [n]; seed int [2]. Returns bool [n] (a subset of candidates)."""
    num = _count(candidates)
    ranks = tf.cumsum(tf.cast(candidates, tf.int32)) - 1  # [n] rank of each candidate among them
    draws = tf.random.stateless_uniform([num], seed, minval=0, maxval=tf.maximum(num, 1), dtype=tf.int32)  # [m]
    drawn = tf.reduce_any(tf.equal(ranks[:, None], draws[None, :]), axis=1)  # [n]
    return candidates & drawn


def render_paste_alpha(masks: tf.Tensor, selected: tf.Tensor, image_info: tf.Tensor, flipped,
                       output_size: Tuple[int, int], window: tf.Tensor) -> tf.Tensor:
    """The union of the selected full-size masks seen through image_info (like the image), thresholded.

    masks uint8 [n, hm, wm] (the UNFLIPPED record's); selected bool [n]; flipped bool [] or python bool;
    window float32 [2]: the (h, w) of the canvas that may receive pixels (the target's valid size).
    Returns float32 [H, W, 1], 1 where pasted, else 0: one bilinear resize of the union (not one per
    instance), >= 0.5, 0 outside the window."""
    # The union as a sum > 0: a matrix-vector product is several times faster on a CPU than reduce_max
    # over the instance axis of uint8 masks (Eigen does not vectorise that reduction).
    chosen = tf.cast(tf.boolean_mask(masks, selected), tf.float32)  # [k, hm, wm]
    flat = tf.reshape(chosen, [tf.shape(chosen)[0], -1])  # [k, hm * wm]
    counts = tf.linalg.matvec(flat, tf.ones([tf.shape(chosen)[0]]), transpose_a=True)  # [hm * wm]
    union = tf.cast(tf.reshape(counts, tf.shape(masks)[1:3]) > 0, tf.float32)  # [hm, wm]
    if flipped is not False:
        union = tf.cond(tf.convert_to_tensor(flipped), lambda: tf.reverse(union, axis=[1]), lambda: union)
    alpha = tf.cast(resize_and_crop_image(union[..., None], image_info) >= 0.5, tf.float32)  # [vh, vw, 1]
    alpha = alpha[:tf.cast(window[0], tf.int32), :tf.cast(window[1], tf.int32)]
    return tf.image.pad_to_bounding_box(alpha, 0, 0, *output_size)  # [H, W, 1]


def _cell_extent(crops: tf.Tensor):
    """crops [k, Mc, Mc] -> (first row, last row, first column, last column) int32 [k] of the cells
    >= 0.5 (what mask_targets counts as the object) and any bool [k]."""
    size = tf.shape(crops)[1]
    on = crops >= 0.5
    rows, cols = tf.reduce_any(on, axis=2), tf.reduce_any(on, axis=1)  # [k, Mc]
    index = tf.range(size)[None, :]
    first_row = tf.reduce_min(tf.where(rows, index, size), axis=1)
    last_row = tf.reduce_max(tf.where(rows, index, -1), axis=1)
    first_col = tf.reduce_min(tf.where(cols, index, size), axis=1)
    last_col = tf.reduce_max(tf.where(cols, index, -1), axis=1)
    return first_row, last_row, first_col, last_col, tf.reduce_any(rows, axis=1)


def _shrink_boxes(boxes: tf.Tensor, before: tf.Tensor, after: tf.Tensor, mask_size: int) -> tf.Tensor:
    """Moves each side of boxes [k, 4] inwards by the whole cells that the paste emptied on that side
    (cell extents of the crops before and after it); sides the paste did not reach stay exactly."""
    b_y1, b_y2, b_x1, b_x2, b_any = _cell_extent(before)
    a_y1, a_y2, a_x1, a_x2, a_any = _cell_extent(after)
    moves = tf.cast(tf.stack([a_y1 - b_y1, a_x1 - b_x1, b_y2 - a_y2, b_x2 - a_x2], axis=-1), tf.float32)  # [k, 4]
    moves = tf.where((b_any & a_any)[:, None], moves, 0.0)
    cell = tf.tile(boxes[:, 2:] - boxes[:, :2], [1, 2]) / mask_size  # [k, 4] (h, w, h, w) per cell
    return boxes + moves * cell * tf.constant([1.0, 1.0, -1.0, -1.0])


def _occluded_crops(stage, boxes, alpha_map, identity_info, mask_size):
    """Gt crops of every record instance of `stage` in `boxes` [n, 4], times (1 - alpha) sampled at the
    same cells. Returns (before, after) float32 [n, Mc, Mc]."""
    n = tf.shape(boxes)[0]
    rows = tf.range(n)
    before = crop_masks(stage["masks"], boxes, rows, stage["image_info"], mask_size, stage["flipped"])
    alpha = crop_masks(alpha_map, boxes, tf.zeros([n], tf.int32), identity_info, mask_size)
    return before, before * (1.0 - alpha)


def _finish_with_paste(target, source, probability: float, output_size, mask_size: int, max_instances: int):
    """A prepared target with a random subset of the prepared source's instances pasted on top (module
    docstring) -> (features, stats)."""
    height, width = output_size
    decide_seed, select_seed = tf.unstack(tf.random.experimental.stateless_split(target["paste_seed"], 2))
    paste = ((tf.random.stateless_uniform([], decide_seed) < probability) & target["has_masks"]
             & source["has_masks"])
    # The source's instances on the target's canvas: clipped to the target's valid window (its padding
    # may be cropped away by the model); those left without area cannot be pasted.
    upper = tf.tile(target["image_info"][1], [2])  # [4]
    source_boxes = tf.clip_by_value(source["boxes"], 0.0, upper)  # [m, 4]
    pasted = paste_selection(source["keep"] & is_visible(source_boxes), select_seed) & paste  # [m]

    def without():
        return _finish(target, output_size, mask_size, max_instances)

    def with_paste():
        alpha = render_paste_alpha(source["masks"], pasted, source["image_info"], source["flipped"], output_size,
                                   window=target["image_info"][1])  # [H, W, 1] 0 / 1
        # alpha is exactly 0 or 1, so this picks pixels exactly (a select costs more on a CPU).
        image = target["image"] * (1.0 - alpha) + source["image"] * alpha  # [H, W, 3]
        # Target instances lose the pasted area: their crops times (1 - alpha) at the same cells; boxes
        # shrink by the cells emptied at a side, and the crops are taken again in the shrunk boxes.
        alpha_map = alpha[None, :, :, 0]  # [1, H, W]
        identity = tf.constant([[height, width], [height, width], [1, 1], [0, 0]], tf.float32)
        before, after = _occluded_crops(target, target["boxes"], alpha_map, identity, mask_size)
        occluded = target["keep"] & tf.reduce_any(before >= 0.5, axis=[1, 2]) & ~tf.reduce_any(after >= 0.5,
                                                                                                axis=[1, 2])
        target_boxes = _shrink_boxes(target["boxes"], before, after, mask_size)  # [n, 4]
        _, target_crops = _occluded_crops(target, target_boxes, alpha_map, identity, mask_size)  # [n, Mc, Mc]

        num_target = tf.shape(target_boxes)[0]
        boxes = tf.concat([target_boxes, source_boxes], axis=0)  # [n + m, 4]
        keep = tf.concat([target["keep"] & ~occluded, pasted], axis=0)
        classes = tf.concat([target["classes"], source["classes"]], axis=0)
        indices, valid, num_truncated = select_largest(boxes, keep, max_instances)
        num_valid = _count(valid)
        chosen = indices[:num_valid]  # [k] target rows first, then source rows (+ n)
        from_target = chosen < num_target
        chosen_target = tf.boolean_mask(chosen, from_target)
        chosen_source = tf.boolean_mask(chosen, ~from_target) - num_target
        chosen_boxes = tf.gather(boxes, chosen)  # [k, 4]
        source_crops = crop_masks(source["masks"], tf.gather(source_boxes, chosen_source), chosen_source,
                                  source["image_info"], mask_size, source["flipped"])
        crops = tf.concat([tf.gather(target_crops, chosen_target), source_crops], axis=0)  # [k, Mc, Mc]
        features = _features(image, target["image_info"], chosen_boxes, tf.gather(classes, chosen), crops,
                             target["has_masks"], num_valid, output_size, mask_size, max_instances)
        stats = {"num_crowd": target["num_crowd"], "num_unmapped": target["num_unmapped"],
                 "num_vanished": target["num_vanished"], "num_truncated": num_truncated,
                 "num_occluded": _count(occluded)}
        return features, stats

    return tf.cond(tf.reduce_any(pasted), with_paste, without)


def transform_pair(first: Dict[str, tf.Tensor], second: Dict[str, tf.Tensor], *, output_size: Tuple[int, int],
                   mask_size: int, max_instances: int, category_ids: Sequence[int], pixel_mean: Sequence[float],
                   pixel_std: Sequence[float], flip_probability: float = 0.0,
                   scale_range: Tuple[float, float] = (1.0, 1.0), seeds=(None, None),
                   copy_paste_probability: float = 0.0, resize_mode: str = "fit", resize_short_side: int = 800,
                   resize_max_long_side: int = 1333):
    """Two decoded examples, each the other's copy-paste source -> [(features, stats), (features, stats)].

    Each example gets its own geometry exactly as transform_example with its seed (seeds: two int [2],
    or None); then, with copy_paste_probability (drawn from its seed's copy-paste stream), a random
    subset of the OTHER example's transformed instances is pasted on top of it (module docstring).
    Without a paste, an example's output equals transform_example's with the same seed.
    """
    geometry = dict(output_size=output_size, category_ids=category_ids, pixel_mean=pixel_mean,
                    pixel_std=pixel_std, flip_probability=flip_probability, scale_range=scale_range,
                    resize_mode=resize_mode, resize_short_side=resize_short_side,
                    resize_max_long_side=resize_max_long_side)
    stages = [_prepare(example, seed, **geometry) for example, seed in zip((first, second), seeds)]
    if copy_paste_probability <= 0:
        return [_finish(stage, output_size, mask_size, max_instances) for stage in stages]
    return [_finish_with_paste(stages[0], stages[1], copy_paste_probability, output_size, mask_size,
                               max_instances),
            _finish_with_paste(stages[1], stages[0], copy_paste_probability, output_size, mask_size,
                               max_instances)]
