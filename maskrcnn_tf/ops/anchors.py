"""Multilevel anchor grid for the FPN levels P2..P6.

Decisions beyond docs/design.md:
- Anchors are computed once in NumPy (float64, cast to float32): they depend only on the static image
  size, so they enter the graph as constants and cost nothing per step.
- One anchor size per level (detectron2 / torchvision FPN default), `len(aspect_ratios)` anchors per
  location. Aspect ratio r = height / width at constant area s**2: h = s * sqrt(r), w = s / sqrt(r).
- The centre of cell (i, j) of a level with stride 2**l is ((i + offset) * stride, (j + offset) * stride).
  The default offset 0.5 is the centre of the feature pixel's receptive field (Model Garden
  convention); torchvision and detectron2 (its default) use 0. Anchors are not clipped to the image
  (detectron2 keeps border anchors).
- `round_base_anchors` reproduces torchvision's AnchorGenerator, which rounds the corners of the
  zero-centred base anchors (-w/2, -h/2, w/2, h/2) to whole pixels (half to even) before shifting them
  (e.g. size 32, ratio 0.5: half sizes 11.31 x 22.63 become 11 x 23). Its stride is image // grid,
  which is 2**l here because image sizes are multiples of 2**max_level.
- Grid size per level is ceil(H / stride) x ceil(W / stride), the size of a stride-2 "same" conv chain.
- Order: row-major over (y, x), then ratio, so `anchors.reshape(H_l, W_l, A, 4)[i, j, a]` is the anchor
  of ratio a at cell (i, j); this matches the RPN head's reshape [B, H_l, W_l, A] -> [B, H_l * W_l * A].
"""

import math

import numpy as np


def num_anchors_per_location(aspect_ratios):
    """Number of anchors per feature-map cell: one per aspect ratio (one size per level)."""
    return len(aspect_ratios)


def _level_anchors(image_size, stride, size, aspect_ratios, offset=0.5, round_base_anchors=False):
    """float32 [ceil(H/stride) * ceil(W/stride) * len(aspect_ratios), 4] `[y1, x1, y2, x2]`."""
    height, width = image_size
    grid_h, grid_w = math.ceil(height / stride), math.ceil(width / stride)
    ratios = np.asarray(aspect_ratios, dtype=np.float64)
    half_h = 0.5 * size * np.sqrt(ratios)  # [A]
    half_w = 0.5 * size / np.sqrt(ratios)  # [A]
    low_h, high_h, low_w, high_w = -half_h, half_h, -half_w, half_w
    if round_base_anchors:  # np.round rounds half to even, as torch.round
        low_h, high_h, low_w, high_w = (np.round(v) for v in (low_h, high_h, low_w, high_w))
    center_y = (np.arange(grid_h, dtype=np.float64) + offset) * stride  # [H_l]
    center_x = (np.arange(grid_w, dtype=np.float64) + offset) * stride  # [W_l]
    cy = center_y[:, None, None]  # [H_l, 1, 1]
    cx = center_x[None, :, None]  # [1, W_l, 1]
    shape = (grid_h, grid_w, len(ratios))
    anchors = np.stack(
        [
            np.broadcast_to(cy + low_h, shape),
            np.broadcast_to(cx + low_w, shape),
            np.broadcast_to(cy + high_h, shape),
            np.broadcast_to(cx + high_w, shape),
        ],
        axis=-1,
    )  # [H_l, W_l, A, 4]
    return anchors.reshape(-1, 4).astype(np.float32)  # [H_l * W_l * A, 4]


def multilevel_anchors(image_size, sizes, aspect_ratios, min_level=2, max_level=6, offset=0.5,
                       round_base_anchors=False):
    """Anchors of every level in absolute pixels of the padded model input.

    Args:
      image_size: (H, W) python ints, the padded model input.
      sizes: one anchor size (sqrt of area, pixels) per level min_level..max_level.
      aspect_ratios: height / width ratios, e.g. (0.5, 1.0, 2.0).
      min_level, max_level: FPN levels; level l has stride 2**l.
      offset: cell centre position as a fraction of the stride (0.5 centre, 0.0 corner).
      round_base_anchors: round the base anchors' corners to whole pixels (torchvision).
    Returns:
      dict {"P2": np.float32 [H_l * W_l * A, 4], ...} of `[y1, x1, y2, x2]` boxes, H_l = ceil(H / 2**l),
      A = len(aspect_ratios), ordered (y, x, ratio) row-major.
    """
    levels = range(min_level, max_level + 1)
    if len(sizes) != len(levels):
        raise ValueError(f"need one anchor size per level P{min_level}..P{max_level}, got sizes={sizes}")
    if not aspect_ratios or any(r <= 0 for r in aspect_ratios):
        raise ValueError(f"aspect_ratios must be positive height/width ratios, got {aspect_ratios}")
    return {
        f"P{level}": _level_anchors(image_size, 2**level, float(size), aspect_ratios, offset, round_base_anchors)
        for level, size in zip(levels, sizes)
    }
