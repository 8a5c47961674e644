"""transforms.py: geometry of one example (flip, resize, jitter crop, pad), gt selection, mask crops.

Oracles are float64 NumPy written from the definitions in transforms.py's docstring: output pixel p
comes from original pixel (p + offset) / scale; crop cell (i, j) samples the centre of cell (i, j) of
the gt box.
"""
import cv2
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.data import transforms

MASK_SIZE = 28
# Instances whose pasted-back mask must match (the test brief: larger than 32x32 px).
MIN_CHECKED_SIDE = 32
MIN_PASTE_IOU = 0.9


def _example(image, boxes, classes, masks, is_crowd=None, has_masks=True):
    n = len(classes)
    return {
        "image": tf.constant(image, tf.uint8),
        "boxes": tf.constant(np.asarray(boxes, np.float32).reshape(n, 4)),
        "classes": tf.constant(classes, tf.int64),
        "is_crowd": tf.constant([False] * n if is_crowd is None else is_crowd, tf.bool),
        "masks": tf.constant(np.asarray(masks, np.uint8).reshape(n, *image.shape[:2])),
        "has_masks": tf.constant(has_masks),
    }


def _transform(example, **overrides):
    kwargs = dict(output_size=(128, 128), mask_size=MASK_SIZE, max_instances=8, category_ids=(1, 2, 3),
                  pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0))
    kwargs.update(overrides)
    features, stats = transforms.transform_example(example, **kwargs)
    return ({k: v.numpy() for k, v in features.items()}, {k: int(v) for k, v in stats.items()})


def _extent(mask):
    """[y1, x1, y2, x2] continuous-coordinate extent of a binary mask."""
    ys, xs = np.nonzero(mask)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float64)


def _shapes_example(height=90, width=120):
    """An ellipse, a triangle and a rectangle, boxes = their masks' extents."""
    masks = np.zeros((3, height, width), np.uint8)
    cv2.ellipse(masks[0], (40, 35), (30, 22), 20, 0, 360, 1, -1)
    cv2.fillPoly(masks[1], [np.array([[70, 10], [115, 20], [85, 80]], np.int32)], 1)
    masks[2, 55:88, 5:60] = 1
    boxes = np.stack([_extent(m) for m in masks])
    image = np.full((height, width, 3), 30, np.uint8)
    return image, boxes, masks


def _paste(crop, box, out_hw):
    """float64 oracle: bilinear-resample a [M, M] crop into its box at every output pixel centre."""
    m = crop.shape[0]

    def weights(length, lo, hi):
        centres = np.arange(length) + 0.5
        u = np.clip((centres - lo) / (hi - lo) * m - 0.5, 0, m - 1)  # cell coordinate of each pixel
        i0 = np.floor(u).astype(int)
        i1 = np.minimum(i0 + 1, m - 1)
        w = np.zeros((length, m))
        w[np.arange(length), i0] += 1 - (u - i0)
        w[np.arange(length), i1] += u - i0
        inside = (centres >= lo) & (centres < hi)
        return w * inside[:, None]

    values = weights(out_hw[0], box[0], box[2]) @ crop @ weights(out_hw[1], box[1], box[3]).T
    return values >= 0.5


def _reference_mask(mask, image_info, out_hw):
    """The original full-size mask seen through image_info: output pixel p <- original (p + off) / scale."""
    _, valid, scale, offset = image_info
    ys = np.floor((np.arange(out_hw[0]) + 0.5 + offset[0]) / scale[0]).astype(int)
    xs = np.floor((np.arange(out_hw[1]) + 0.5 + offset[1]) / scale[1]).astype(int)
    ok_y = (np.arange(out_hw[0]) < valid[0]) & (ys < mask.shape[0])
    ok_x = (np.arange(out_hw[1]) < valid[1]) & (xs < mask.shape[1])
    out = mask[np.minimum(ys, mask.shape[0] - 1)][:, np.minimum(xs, mask.shape[1] - 1)].astype(bool)
    return out & ok_y[:, None] & ok_x[None, :]


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def test_flip_moves_boxes_onto_the_flipped_masks():
    image, boxes, masks = _shapes_example()
    image[:, :10] = 255  # a marker on the left edge
    flipped_image, flipped_boxes = transforms.horizontal_flip(tf.constant(image), tf.constant(boxes, tf.float32))
    assert np.all(flipped_image.numpy()[:, -10:] == 255) and not np.any(flipped_image.numpy()[:, :-10] == 255)
    for box, mask in zip(flipped_boxes.numpy(), masks[:, :, ::-1]):
        # Box and mask extent were equal before the flip, so they must still agree (brief: within 1 px).
        np.testing.assert_allclose(box, _extent(mask), atol=1.0)


@pytest.mark.parametrize("flip", [False, True])
def test_mask_crops_paste_back_onto_the_resized_mask(flip):
    image, boxes, masks = _shapes_example()
    features, _ = _transform(_example(image, boxes, [1, 2, 3], masks), flip_probability=1.0 if flip else 0.0)
    source_masks = masks[:, :, ::-1] if flip else masks
    checked = 0
    for i in range(3):
        box = features["gt_boxes"][i]
        if min(box[2] - box[0], box[3] - box[1]) <= MIN_CHECKED_SIDE:
            continue
        pasted = _paste(features["gt_masks"][i].astype(np.float64), box, (128, 128))
        reference = _reference_mask(source_masks[i], features["image_info"], (128, 128))
        assert _iou(pasted, reference) >= MIN_PASTE_IOU, i
        # The box is the extent of the resized mask (within 1 px: resampling moves edges by < 1 px).
        np.testing.assert_allclose(box, _extent(reference), atol=1.0)
        checked += 1
    assert checked == 3  # all three shapes are larger than 32 px at scale 128 / 120


def test_resize_and_pad_put_a_drawn_rectangle_where_the_box_says():
    height, width = 90, 60  # portrait: the height fits 128, the width becomes round(60 * 128 / 90) = 85
    colour = np.array([200, 30, 100], np.float32)
    image = np.full((height, width, 3), 10, np.uint8)
    image[20:50, 10:40] = colour.astype(np.uint8)
    box = [20, 10, 50, 40]
    mean, std = (100.0, 50.0, 20.0), (2.0, 4.0, 5.0)
    features, _ = _transform(_example(image, [box], [1], np.zeros((1, height, width))), pixel_mean=mean,
                             pixel_std=std)
    scale_y, scale_x = 128 / 90, 85 / 60
    np.testing.assert_allclose(features["image_info"],
                               [[90, 60], [128, 85], [scale_y, scale_x], [0, 0]], rtol=1e-6)
    out_box = features["gt_boxes"][0]
    np.testing.assert_allclose(out_box, [20 * scale_y, 10 * scale_x, 50 * scale_y, 40 * scale_x], rtol=1e-6)
    rgb = features["images"] * np.array(std) + np.array(mean)  # undo the normalisation
    inner = rgb[int(np.ceil(out_box[0])) + 1:int(out_box[2]) - 1, int(np.ceil(out_box[1])) + 1:int(out_box[3]) - 1]
    np.testing.assert_allclose(inner, np.broadcast_to(colour, inner.shape), atol=1.0)
    drawn = np.all(np.abs(rgb - colour) < 40, axis=-1)
    # Every pixel of the colour lies inside the box grown by 1 px (bilinear edges).
    ys, xs = np.nonzero(drawn)
    assert ys.min() >= out_box[0] - 1 and ys.max() + 1 <= out_box[2] + 1
    assert xs.min() >= out_box[1] - 1 and xs.max() + 1 <= out_box[3] + 1
    # Padding (right of column 85) is exactly 0 in the normalised image.
    assert np.all(features["images"][:, 85:] == 0)
    background = (10 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(features["images"][0, 0], background, rtol=1e-6)


# Seeds picked (by printing image_info) so that the crop window loses one corner instance (0, 2, 6)
# or both (1).
@pytest.mark.parametrize("seed", [0, 1, 2, 6])
def test_scale_jitter_crop_keeps_boxes_on_the_pixels_and_drops_vanished(seed):
    size = 64
    image = np.full((size, size, 3), 10, np.uint8)
    boxes = np.array([[0, 0, 16, 16], [48, 48, 64, 64], [20, 24, 44, 40]], np.float64)  # corners + middle
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    masks = np.zeros((3, size, size), np.uint8)
    for (y1, x1, y2, x2), colour, mask in zip(boxes.astype(int), colours, masks):
        image[y1:y2, x1:x2] = colour
        mask[y1:y2, x1:x2] = 1
    features, stats = _transform(_example(image, boxes, [1, 2, 3], masks), output_size=(64, 64),
                                 scale_range=(1.5, 2.5), seed=tf.constant([seed, 7], tf.int64))
    _, valid, scale, offset = features["image_info"]
    assert 1.5 <= scale[0] <= 2.5 and scale[0] == scale[1]
    assert np.all(offset >= 0) and np.all(offset <= np.round(size * scale) - size)
    np.testing.assert_allclose(valid, [64, 64])  # the scaled image covers the whole output
    # Oracle: scale, shift, clip; visible when both sides exceed MIN_BOX_SIDE.
    expected = np.clip(boxes * np.tile(scale, 2) - np.tile(offset, 2), 0, 64)
    visible = np.all(expected[:, 2:] - expected[:, :2] > transforms.MIN_BOX_SIDE, axis=1)
    num_visible = int(visible.sum())
    assert stats["num_vanished"] == 3 - num_visible
    np.testing.assert_allclose(features["gt_boxes"][:num_visible], expected[visible], atol=1e-4)
    np.testing.assert_array_equal(features["gt_classes"][:num_visible], np.array([1, 2, 3])[visible])
    assert np.all(features["gt_boxes"][num_visible:] == -1)
    for out_box, colour in zip(expected[visible], np.array(colours)[visible]):
        y1, x1, y2, x2 = out_box
        if min(y2 - y1, x2 - x1) < 3:
            continue  # a sliver at the border: no interior pixel to look at
        interior = features["images"][int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
        np.testing.assert_allclose(interior, np.broadcast_to(colour, interior.shape), atol=1.0)


def test_more_than_n_instances_keep_the_n_largest_in_record_order():
    size = 64
    sides = [4, 20, 8, 30, 12, 2]  # squares along the diagonal-ish; the 3 largest are indices 3, 1, 4
    boxes = np.array([[i * 2, i * 2, i * 2 + s, i * 2 + s] for i, s in enumerate(sides)], np.float64)
    masks = np.zeros((6, size, size), np.uint8)
    features, stats = _transform(_example(np.zeros((size, size, 3), np.uint8), boxes, [1, 2, 3, 1, 2, 3], masks),
                                 output_size=(64, 64), max_instances=3)
    np.testing.assert_allclose(features["gt_boxes"], boxes[[1, 3, 4]])
    np.testing.assert_array_equal(features["gt_classes"], [2, 1, 2])
    assert stats["num_truncated"] == 3


def test_zero_instances_give_pure_padding():
    features, stats = _transform(_example(np.zeros((40, 50, 3), np.uint8), np.zeros((0, 4)), [],
                                          np.zeros((0, 40, 50))))
    assert features["gt_boxes"].shape == (8, 4) and np.all(features["gt_boxes"] == -1)
    assert np.all(features["gt_classes"] == -1)
    assert features["gt_masks"].shape == (8, MASK_SIZE, MASK_SIZE) and not features["gt_masks"].any()
    assert stats == {key: 0 for key in transforms.STAT_KEYS}


def test_crowd_and_unknown_classes_leave_the_targets():
    size = 64
    boxes = np.array([[0, 0, 10, 10], [10, 10, 30, 30], [5, 5, 15, 25], [30, 30, 60, 60]], np.float64)
    # Dataset ids 18 and 7 map through category_ids (7, 18) to contiguous 1 and 2; id 99 is unknown;
    # the last instance is crowd.
    features, stats = _transform(
        _example(np.zeros((size, size, 3), np.uint8), boxes, [18, 99, 7, 18], np.zeros((4, size, size)),
                 is_crowd=[False, False, False, True]),
        output_size=(64, 64), category_ids=(7, 18))
    np.testing.assert_array_equal(features["gt_classes"][:3], [2, 1, -1])
    np.testing.assert_allclose(features["gt_boxes"][:2], boxes[[0, 2]])
    assert stats["num_crowd"] == 1 and stats["num_unmapped"] == 1


def test_records_without_masks_give_zero_masks():
    image, boxes, masks = _shapes_example()
    example = _example(image, boxes, [1, 2, 3], masks, has_masks=False)
    example["masks"] = tf.zeros([3, 1, 1], tf.uint8)  # the pipeline's placeholder for box-only records
    features, _ = _transform(example)
    assert not features["has_masks"]
    assert not features["gt_masks"].any()
    assert np.all(features["gt_classes"][:3] == [1, 2, 3])


def test_crop_masks_samples_cell_centres_and_clamps_at_the_border():
    # Hand-computed: a 4x4 mask whose column 0 is 1, box = the whole image, Mc = 8. Cell j's centre is
    # x = (j + 0.5) / 2, i.e. pixel-index coordinate x - 0.5 = -0.25, 0.25, 0.75, 1.25, ...; bilinear
    # between column 0 (=1) and column 1 (=0) gives 1 (clamped at the border), 0.75, 0.25, then 0.
    # (Sampling box corners instead of cell centres would give 1, 4/7, 1/7, 0, ...)
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, :, 0] = 1
    image_info = tf.constant([[4, 4], [4, 4], [1, 1], [0, 0]], tf.float32)
    crops = transforms.crop_masks(tf.constant(mask), tf.constant([[0, 0, 4, 4]], tf.float32), tf.constant([0]),
                                  image_info, 8).numpy()
    np.testing.assert_allclose(crops[0], np.tile([1, 0.75, 0.25, 0, 0, 0, 0, 0], (8, 1)), atol=1e-6)
    # Flipped image: the same box now sees the mask mirrored (column 3 set).
    mirrored = transforms.crop_masks(tf.constant(mask), tf.constant([[0, 0, 4, 4]], tf.float32), tf.constant([0]),
                                     image_info, 8, flipped=tf.constant(True)).numpy()
    np.testing.assert_allclose(mirrored[0], crops[0][:, ::-1], atol=1e-6)


# ----------------------------------------------------------------------- large-scale jitter (LSJ)
# LSJ = "fit" resize to a square canvas, scale_range (0.1, 2.0), flip 0.5 (torchvision's ScaleJitter +
# FixedSizeCrop + RandomHorizontalFlip, detectron2's ResizeScale + FixedSizeCrop). A 64x64 canvas stands in
# for 1024x1024; the image is 100x80, so the fit scale is 0.64 and the resized height runs from 6 to 128.
LSJ = dict(output_size=(64, 64), mask_size=16, scale_range=(0.1, 2.0), flip_probability=0.5)
LSJ_SEEDS = range(16)
LSJ_FIT = 0.64


def _rectangle_factor(t, lo, hi, size):
    """1-D factor of a filled rectangle mask [lo, hi) sampled bilinearly at continuous coordinates t
    (pixel i covers [i, i + 1)), clamped at the image border like crop_masks."""
    rise = np.clip(t - lo + 0.5, 0, 1) if lo > 0 else np.ones_like(t)
    fall = np.clip(hi - t + 0.5, 0, 1) if hi < size else np.ones_like(t)
    return np.minimum(rise, fall)


def _lsj_geometry(image_info, original_hw=(100, 80)):
    """Checks image_info against LSJ's definition; returns (scale [2], offset [2], valid [2])."""
    original, valid, scale, offset = np.asarray(image_info, np.float64)
    np.testing.assert_array_equal(original, original_hw)
    resized = np.round(original * scale)
    np.testing.assert_allclose(original * scale, resized, atol=1e-3)  # whole pixels
    fitted = np.asarray(original_hw) * LSJ_FIT
    ratio = resized / fitted  # the drawn r, each axis up to its rounding (half a pixel of the fitted size)
    rounding = 0.5 / fitted + 1e-6
    assert np.all(ratio >= 0.1 - rounding) and np.all(ratio <= 2.0 + rounding), ratio
    assert abs(ratio[0] - ratio[1]) <= rounding.sum()  # one r for both axes
    assert np.all(offset == np.floor(offset)) and np.all(offset >= 0) and np.all(offset <= np.maximum(resized - 64, 0))
    np.testing.assert_allclose(valid, np.minimum(resized - offset, 64))
    return scale, offset, valid


def test_lsj_moves_a_rectangle_box_mask_and_pixels_together():
    height, width, rect = 100, 80, (30, 8, 70, 40)  # off-centre, so a mirrored image moves it
    colour = (240, 120, 0)
    image = np.full((height, width, 3), 10, np.uint8)
    mask = np.zeros((1, height, width), np.uint8)
    y1, x1, y2, x2 = rect
    image[y1:y2, x1:x2] = colour
    mask[0, y1:y2, x1:x2] = 1
    seen = set()
    for seed in LSJ_SEEDS:
        features, stats = _transform(_example(image, [rect], [1], mask), seed=tf.constant([seed, 3], tf.int64), **LSJ)
        scale, offset, valid = _lsj_geometry(features["image_info"])
        kept = features["gt_classes"][0] == 1
        candidates = {}
        for flipped in (False, True):
            cols = (width - x2, width - x1) if flipped else (x1, x2)
            box = np.clip(np.array([y1, cols[0], y2, cols[1]]) * np.tile(scale, 2) - np.tile(offset, 2), 0,
                          np.tile(valid, 2))
            candidates[flipped] = (box, cols)
        visible = {f: transforms.is_visible(box) for f, (box, _) in candidates.items()}
        if not kept:  # cropped away (the box of the flip it drew has no area)
            assert not all(visible.values()) and stats["num_vanished"] == 1
            seen.add("vanished")
            continue
        out_box = features["gt_boxes"][0]
        matches = [f for f, (box, _) in candidates.items() if np.allclose(out_box, box, atol=1e-4)]
        assert matches, (seed, out_box, candidates)
        flipped = matches[0]
        cols = candidates[flipped][1]
        # The crop: the rectangle sampled at each cell centre mapped back to the original, (p + offset) / scale.
        ys = (out_box[0] + (np.arange(16) + 0.5) * (out_box[2] - out_box[0]) / 16 + offset[0]) / scale[0]
        xs = (out_box[1] + (np.arange(16) + 0.5) * (out_box[3] - out_box[1]) / 16 + offset[1]) / scale[1]
        expected = np.outer(_rectangle_factor(ys, y1, y2, height), _rectangle_factor(xs, cols[0], cols[1], width))
        np.testing.assert_allclose(features["gt_masks"][0], expected, atol=1e-5)
        assert features["gt_masks"][0].min() >= 0.5  # every cell centre lies on the rectangle
        # The pixels: the colour fills the box's interior (a pixel in from each side).
        by1, bx1, by2, bx2 = out_box
        interior = features["images"][int(np.ceil(by1)) + 1:int(by2) - 1, int(np.ceil(bx1)) + 1:int(bx2) - 1]
        np.testing.assert_allclose(interior, np.broadcast_to(colour, interior.shape), atol=1e-3)
        seen.add("flipped" if flipped else "unflipped")
        seen.add("zoomed in" if scale[0] > LSJ_FIT else "zoomed out")
    assert seen >= {"flipped", "unflipped", "zoomed in", "zoomed out"}, seen


def test_lsj_drops_instances_outside_the_crop_window_and_counts_them():
    height, width = 100, 80
    squares = np.array([[0, 0, 16, 16], [0, 64, 16, 80], [84, 0, 100, 16], [84, 64, 100, 80], [42, 32, 58, 48]],
                       np.float64)  # four corners and the middle; classes mirror-symmetric too
    masks = np.zeros((5, height, width), np.uint8)
    for mask, (y1, x1, y2, x2) in zip(masks, squares.astype(int)):
        mask[y1:y2, x1:x2] = 1
    dropped_seen = 0
    for seed in LSJ_SEEDS:
        features, stats = _transform(_example(np.full((height, width, 3), 10, np.uint8), squares, [1, 1, 2, 2, 3],
                                              masks), seed=tf.constant([seed, 4], tf.int64), **LSJ)
        scale, offset, valid = _lsj_geometry(features["image_info"])
        # The corners are symmetric under the flip, so the oracle needs no flip: scale, shift, clip, drop.
        expected = np.clip(squares * np.tile(scale, 2) - np.tile(offset, 2), 0, np.tile(valid, 2))
        visible = np.all(expected[:, 2:] - expected[:, :2] > transforms.MIN_BOX_SIDE, axis=1)
        assert stats["num_vanished"] == 5 - visible.sum()
        num = int(visible.sum())
        assert np.all(features["gt_classes"][num:] == -1)
        np.testing.assert_array_equal(np.sort(features["gt_classes"][:num]),
                                      np.sort(np.array([1, 1, 2, 2, 3])[visible]))
        np.testing.assert_allclose(np.sort(features["gt_boxes"][:num], axis=0), np.sort(expected[visible], axis=0),
                                   atol=1e-4)
        dropped_seen += stats["num_vanished"] > 0
    assert dropped_seen >= 2


def test_lsj_zoomed_out_images_are_zero_padded_bottom_right():
    image = np.full((100, 80, 3), 10, np.uint8)
    zoomed_out = 0
    for seed in LSJ_SEEDS:
        features, _ = _transform(_example(image, np.zeros((0, 4)), [], np.zeros((0, 100, 80))),
                                 seed=tf.constant([seed, 5], tf.int64), **LSJ)
        scale, offset, valid = _lsj_geometry(features["image_info"])
        rows, cols = int(valid[0]), int(valid[1])
        assert np.all(features["images"][:rows, :cols] == 10)  # image pixels (mean 0, std 1)
        assert not features["images"][rows:].any() and not features["images"][:, cols:].any()
        if scale[0] < LSJ_FIT:
            zoomed_out += 1
            assert np.all(offset == 0) and rows < 64 and cols < 64
    assert zoomed_out >= 3


def test_lsj_output_shapes_are_static():
    n, mask_size = 8, 16
    spec = {"image": tf.TensorSpec([None, None, 3], tf.uint8), "boxes": tf.TensorSpec([None, 4], tf.float32),
            "classes": tf.TensorSpec([None], tf.int64), "is_crowd": tf.TensorSpec([None], tf.bool),
            "masks": tf.TensorSpec([None, None, None], tf.uint8), "has_masks": tf.TensorSpec([], tf.bool)}

    @tf.function(input_signature=[spec, tf.TensorSpec([2], tf.int64)])
    def lsj(example, seed):
        return transforms.transform_example(example, max_instances=n, category_ids=(1, 2, 3), pixel_mean=(0, 0, 0),
                                            pixel_std=(1, 1, 1), seed=seed, **LSJ)

    features, stats = lsj.get_concrete_function().structured_outputs
    expected = {"images": [64, 64, 3], "image_info": [4, 2], "gt_boxes": [n, 4], "gt_classes": [n],
                "gt_masks": [n, mask_size, mask_size], "has_masks": []}
    assert {k: v.shape.as_list() for k, v in features.items()} == expected
    assert all(v.shape.as_list() == [] for v in stats.values())
    image, boxes, masks = _shapes_example()
    for seed in range(3):
        out, _ = lsj(_example(image, boxes, [1, 2, 3], masks), tf.constant([seed, 1], tf.int64))
        assert {k: v.shape.as_list() for k, v in out.items()} == expected
