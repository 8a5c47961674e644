"""Mask targets and mask pasting against full-image NumPy / OpenCV oracles and hand-derived cases."""
import cv2
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.ops.masks import mask_targets, paste_masks
from tests.numpy_reference import mask_iou

SAMPLING_RATIO = 2  # masks.TARGET_SAMPLING_RATIO, restated so the oracle is independent


# ------------------------------------------------------------------------------------------------
# float64 oracles working on full-size images
# ------------------------------------------------------------------------------------------------


def np_bilinear_zero(image, y, x):
    """Bilinear value at pixel-index coordinates (pixel i centred at i), zero outside the image."""
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    value = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < image.shape[0] and 0 <= xx < image.shape[1]:
                value += wy * wx * image[yy, xx]
    return value


def np_crop_target(full_mask, gt_box, roi, output_size):
    """RoIAlign (aligned, 2 x 2 samples) of a full-image mask over `roi`, then >= 0.5.

    The instance mask is defined on its gt box: a sample outside the box reads 0, a sample inside is
    the bilinear value with pixel coordinates clamped to the box's pixels (RoIAlign's border clamp).
    """
    y1, x1, y2, x2 = roi
    gy1, gx1, gy2, gx2 = gt_box
    n = output_size * SAMPLING_RATIO
    ys = y1 + (np.arange(n) + 0.5) / n * (y2 - y1)  # continuous coordinates
    xs = x1 + (np.arange(n) + 0.5) / n * (x2 - x1)

    def sample(y, x):
        if not (gy1 <= y <= gy2 and gx1 <= x <= gx2):
            return 0.0
        # continuous -> pixel-index coordinates (pixel i centred at i), clamped into the box.
        return np_bilinear_zero(full_mask, np.clip(y - 0.5, gy1, gy2 - 1), np.clip(x - 0.5, gx1, gx2 - 1))

    samples = np.array([[sample(y, x) for x in xs] for y in ys])
    cells = samples.reshape(output_size, SAMPLING_RATIO, output_size, SAMPLING_RATIO).mean(axis=(1, 3))
    return (cells >= 0.5).astype(np.float32)


def ellipse_mask(height, width, box, rng):
    """Full-image {0, 1} ellipse (randomly scaled, shifted) cut to integer `box`; often touches its edges."""
    y1, x1, y2, x2 = box
    cy = (y1 + y2) / 2 + rng.uniform(-1, 1)
    cx = (x1 + x2) / 2 + rng.uniform(-1, 1)
    ry = (y2 - y1) / 2 * rng.uniform(0.8, 1.15)
    rx = (x2 - x1) / 2 * rng.uniform(0.8, 1.15)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.float64)
    inside = np.zeros_like(mask)
    inside[y1:y2, x1:x2] = 1.0
    return mask * inside


IMAGE = 64
CROP = 16  # gt boxes are CROP x CROP pixels, so the gt crop is exactly the image's pixels


def _exact_crop_instances(rng):
    """B=2 images, N=3 gt each: boxes of CROP x CROP pixels, crops equal to the image pixels."""
    corners = np.array([[[4, 6], [30, 20], [40, 41]], [[10, 40], [44, 8], [25, 25]]])
    gt_boxes = np.concatenate([corners, corners + CROP], axis=-1).astype(np.float32)  # [2, 3, 4]
    full = np.zeros((2, 3, IMAGE, IMAGE))
    crops = np.zeros((2, 3, CROP, CROP), np.float32)
    for b in range(2):
        for n in range(3):
            y1, x1, y2, x2 = gt_boxes[b, n].astype(int)
            full[b, n] = ellipse_mask(IMAGE, IMAGE, (y1, x1, y2, x2), rng)
            crops[b, n] = full[b, n, y1:y2, x1:x2]
    return gt_boxes, crops, full


# ------------------------------------------------------------------------------------------------
# mask_targets
# ------------------------------------------------------------------------------------------------


def test_mask_targets_identity_and_shift():
    # Hand-derived: with T == Mc the 2 x 2 samples of a cell sit a quarter pixel from its centre, so
    # the cell's own pixel carries weight 9/16 > 0.5 and the target reproduces the {0, 1} crop exactly.
    # A RoI shifted by (dy, dx) whole pixels therefore gives the crop shifted by (-dy, -dx), zeros
    # where the RoI leaves the gt box.
    rng = np.random.default_rng(0)
    gt_boxes, crops, _ = _exact_crop_instances(rng)
    shifts = np.array([[0, 0], [3, -5], [-7, 2]], np.float32)  # per sampled RoI, all of gt 1
    rois = gt_boxes[:, 1:2] + np.concatenate([shifts, shifts], axis=-1)[None]  # [2, 3, 4]
    matched = np.ones((2, 3), np.int32)
    targets = mask_targets(tf.constant(crops), tf.constant(gt_boxes), tf.constant(rois),
                           tf.constant(matched), output_size=CROP).numpy()
    assert targets.shape == (2, 3, CROP, CROP) and targets.dtype == np.float32
    for b in range(2):
        padded = np.zeros((3 * CROP, 3 * CROP), np.float32)
        padded[CROP:2 * CROP, CROP:2 * CROP] = crops[b, 1]
        for s, (dy, dx) in enumerate(shifts.astype(int)):
            expected = padded[CROP + dy:2 * CROP + dy, CROP + dx:2 * CROP + dx]
            np.testing.assert_array_equal(targets[b, s], expected, err_msg=f"image {b} shift {dy, dx}")
    assert targets[0, 1].sum() > 0 and not np.array_equal(targets[0, 0], targets[0, 1])


def test_mask_targets_match_full_image_oracle():
    rng = np.random.default_rng(1)
    gt_boxes, crops, full = _exact_crop_instances(rng)
    num_rois, output_size = 8, 12
    matched = rng.integers(0, 3, size=(2, num_rois)).astype(np.int32)
    # RoIs jittered around their gt box (fractional offsets, scale 0.6..1.5): partly outside it.
    base = np.take_along_axis(gt_boxes, matched[..., None], axis=1)
    size = base[..., 2:] - base[..., :2]
    centre = (base[..., :2] + base[..., 2:]) / 2 + rng.uniform(-0.3, 0.3, size.shape) * size
    half = size * rng.uniform(0.6, 1.5, size.shape) / 2
    rois = np.concatenate([centre - half, centre + half], axis=-1).astype(np.float32)
    rois[0, 0] = gt_boxes[0, matched[0, 0]]  # RoI == gt box: the downsampled mask
    targets = mask_targets(tf.constant(crops), tf.constant(gt_boxes), tf.constant(rois),
                           tf.constant(matched), output_size=output_size).numpy()
    expected = np.stack([
        np.stack([np_crop_target(full[b, matched[b, s]], gt_boxes[b, matched[b, s]], rois[b, s], output_size)
                  for s in range(num_rois)])
        for b in range(2)
    ])
    assert set(np.unique(targets)) <= {0.0, 1.0}
    # float32 vs float64 can flip a cell sitting exactly on the 0.5 level; allow 1 in 200.
    mismatch = np.mean(targets != expected)
    assert mismatch <= 0.005, mismatch
    assert expected.sum() > 0.2 * expected.size  # the oracle is not trivially empty


def test_mask_targets_outside_gt_box_is_zero():
    # A full mask of ones in a gt box; a RoI twice as wide, gt in its left half: the right half of the
    # target is 0, the left half 1 (RoI [0, 0, 16, 32] vs gt [0, 0, 16, 16]).
    crops = np.ones((1, 1, CROP, CROP), np.float32)
    gt_boxes = np.array([[[0, 0, 16, 16]]], np.float32)
    rois = np.array([[[0, 0, 16, 32], [-4, -4, -1, -1]]], np.float32)  # second: no overlap at all
    targets = mask_targets(tf.constant(crops), tf.constant(gt_boxes), tf.constant(rois),
                           tf.zeros([1, 2], tf.int32), output_size=8).numpy()
    np.testing.assert_array_equal(targets[0, 0, :, :4], 1.0)
    np.testing.assert_array_equal(targets[0, 0, :, 4:], 0.0)
    np.testing.assert_array_equal(targets[0, 1], 0.0)


def test_mask_targets_padding_gt_gives_zeros_and_default_size():
    crops = np.zeros((1, 2, 8, 8), np.float32)
    crops[0, 0] = 1.0
    gt_boxes = np.array([[[2, 2, 10, 10], [-1, -1, -1, -1]]], np.float32)
    rois = np.array([[[2, 2, 10, 10], [2, 2, 10, 10]]], np.float32)
    targets = mask_targets(tf.constant(crops), tf.constant(gt_boxes), tf.constant(rois),
                           tf.constant([[0, 1]], tf.int32))
    assert targets.shape == (1, 2, 28, 28)
    np.testing.assert_array_equal(targets[0, 0].numpy(), 1.0)
    np.testing.assert_array_equal(targets[0, 1].numpy(), 0.0)  # matched to a padding row


# ------------------------------------------------------------------------------------------------
# paste_masks
# ------------------------------------------------------------------------------------------------


def test_paste_constant_mask_fills_its_box():
    mask_size, height, width = 28, 96, 120
    # Integer boxes of mask_size to 2 * mask_size pixels: a mask cell is 1..2 pixels and the blur
    # reaches at most 1 pixel either side of the edge; the last one crosses the image border.
    boxes = np.array([[[10, 20, 50, 60], [0, 0, 28, 56], [60, 70, 110, 126]]], np.float32)
    masks = np.ones((1, 3, mask_size, mask_size), np.float32)
    pasted = paste_masks(tf.constant(masks), tf.constant(boxes), (height, width)).numpy()
    assert pasted.shape == (1, 3, height, width) and pasted.dtype == np.float32
    for d, (y1, x1, y2, x2) in enumerate(boxes[0].astype(int)):
        box = np.zeros((height, width), bool)
        box[max(y1, 0):y2, max(x1, 0):x2] = True
        np.testing.assert_array_equal(pasted[0, d] >= 0.5, box, err_msg=f"box {d}")
        inner = np.zeros_like(box)
        inner[max(y1 + 1, 0):y2 - 1, max(x1 + 1, 0):x2 - 1] = True
        # Rows/cols touching the image border (y1 == 0) are interior to the box only if it extends.
        inner[0:1, :] &= y1 < 0
        inner[:, 0:1] &= x1 < 0
        np.testing.assert_allclose(pasted[0, d][inner], 1.0, atol=1e-5)
        outer = np.ones_like(box)
        outer[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = False
        np.testing.assert_array_equal(pasted[0, d][outer], 0.0)


def _smooth_random_masks(rng, count, size):
    """Blob-like probability masks: a blurred random field, a soft ellipse mostly inside the box."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    masks = []
    for _ in range(count):
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        ry, rx = rng.uniform(0.25, 0.45, 2) * size
        radius = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        masks.append(1.0 / (1.0 + np.exp(8.0 * (radius - 1.0))))
    return np.stack(masks).astype(np.float32)


def _random_integer_boxes(rng, count, height, width):
    y1 = rng.integers(0, height - 40, count)
    x1 = rng.integers(0, width - 40, count)
    h = rng.integers(20, 60, count)
    w = rng.integers(20, 60, count)
    return np.stack([y1, x1, np.minimum(y1 + h, height), np.minimum(x1 + w, width)], -1).astype(np.float32)


def test_paste_matches_cv2_oracle():
    rng = np.random.default_rng(2)
    count, mask_size, height, width = 12, 28, 100, 90
    masks = _smooth_random_masks(rng, count, mask_size)
    boxes = _random_integer_boxes(rng, count, height, width)
    pasted = paste_masks(tf.constant(masks[None]), tf.constant(boxes[None]), (height, width)).numpy()[0]
    for d in range(count):
        y1, x1, y2, x2 = boxes[d].astype(int)
        oracle = np.zeros((height, width), np.float32)
        # cv2 INTER_LINEAR uses the same half-pixel centres; it replicates (not zero-pads) the edge.
        oracle[y1:y2, x1:x2] = cv2.resize(masks[d], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
        score = mask_iou(pasted[d] >= 0.5, oracle >= 0.5)
        assert score >= 0.95, (d, score)
        # Zero padding reaches half a mask cell (< 1.5 px for boxes < 3 * 28 px) outside the box.
        outside = np.ones((height, width), bool)
        outside[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = False
        np.testing.assert_array_equal(pasted[d][outside], 0.0)


def test_paste_then_crop_round_trip():
    rng = np.random.default_rng(3)
    count, mask_size, image = 6, 28, 96
    masks = _smooth_random_masks(rng, count, mask_size)
    jitter = rng.uniform(-0.5, 0.5, (count, 4)).astype(np.float32)  # fractional boxes
    boxes = _random_integer_boxes(rng, count, image, image) + jitter
    pasted = paste_masks(tf.constant(masks[None]), tf.constant(boxes[None]), (image, image))  # [1, D, H, W]
    # The pasted image is a "gt crop" of the whole image box; cropping each detection's box back
    # must give the thresholded original mask.
    whole = tf.constant([[[0.0, 0.0, image, image]] * count])
    back = mask_targets(pasted, whole, tf.constant(boxes[None]), tf.range(count)[None],
                        output_size=mask_size).numpy()[0]
    for d in range(count):
        score = mask_iou(back[d], masks[d] >= 0.5)
        assert score >= 0.9, (d, score)


def test_paste_padding_rows_are_zero_and_xla_compiles():
    masks = tf.ones([2, 2, 14, 14])
    boxes = tf.constant([[[4.0, 4.0, 20.0, 30.0], [-1, -1, -1, -1]],
                         [[0.0, 0.0, 0.0, 10.0], [8.0, 2.0, 24.0, 12.0]]])
    eager = paste_masks(masks, boxes, (32, 40)).numpy()
    assert np.all(np.isfinite(eager))
    np.testing.assert_array_equal(eager[0, 1], 0.0)  # padding row
    np.testing.assert_array_equal(eager[1, 0], 0.0)  # zero-height box
    compiled = tf.function(lambda m, b: paste_masks(m, b, (32, 40)), jit_compile=True)(masks, boxes)
    np.testing.assert_allclose(compiled.numpy(), eager, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_half_precision_inputs_give_float32(dtype):
    masks = tf.cast(tf.fill([1, 1, 14, 14], 0.75), dtype)
    boxes = tf.constant([[[2.0, 2.0, 16.0, 16.0]]], dtype)
    assert paste_masks(masks, boxes, (20, 20)).dtype == tf.float32
    targets = mask_targets(masks, boxes, boxes, tf.zeros([1, 1], tf.int32), output_size=7)
    assert targets.dtype == tf.float32
    np.testing.assert_array_equal(targets.numpy(), 1.0)  # 0.75 everywhere inside -> 1
