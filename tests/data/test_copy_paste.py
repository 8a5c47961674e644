"""Copy-paste (transforms.transform_pair, data.copy_paste_probability): known answers on small synthetic images.

Oracles are float64 NumPy from the definitions in transforms.py's docstring: a target's gt crop becomes its
mask sampled at the cell centres times (1 - alpha sampled at the same centres), alpha = the union of the
pasted masks on the canvas; pasted instances keep their source box, class and mask.
"""
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.data import pipeline, transforms
from tests.data.test_transforms import _example, _iou, _paste, _reference_mask

SIZE = 64
MASK_SIZE = 16
TARGET_COLOUR, SOURCE_COLOUR = (200, 40, 10), (10, 220, 60)


def _kwargs(**overrides):
    kwargs = dict(output_size=(SIZE, SIZE), mask_size=MASK_SIZE, max_instances=6, category_ids=(1, 2, 3),
                  pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), copy_paste_probability=1.0)
    kwargs.update(overrides)
    return kwargs


def _numpy(output):
    features, stats = output
    return {k: v.numpy() for k, v in features.items()}, {k: int(v) for k, v in stats.items()}


def _pair(first, second, seeds=(0, 1), **overrides):
    seeds = [tf.constant([s, 5], tf.int64) for s in seeds]
    return [_numpy(o) for o in transforms.transform_pair(first, second, seeds=seeds, **_kwargs(**overrides))]


def _alone(example, seed, **overrides):
    kwargs = _kwargs(**overrides)
    kwargs.pop("copy_paste_probability")
    return _numpy(transforms.transform_example(example, seed=tf.constant([seed, 5], tf.int64), **kwargs))


def _rectangles(rects, classes, colour, background=20, height=SIZE, width=SIZE):
    """An example whose instances are filled rectangles (y1, x1, y2, x2), each drawn in `colour`."""
    image = np.full((height, width, 3), background, np.uint8)
    masks = np.zeros((len(rects), height, width), np.uint8)
    for mask, (y1, x1, y2, x2) in zip(masks, rects):
        mask[y1:y2, x1:x2] = 1
        image[y1:y2, x1:x2] = colour
    return _example(image, np.asarray(rects, np.float64).reshape(-1, 4), classes, masks), masks


def _bilinear(raster, ys, xs):
    """float64 bilinear samples of raster [h, w] at continuous coordinates (pixel i covers [i, i + 1)),
    clamped at the border like RoIAlign."""
    h, w = raster.shape
    u = np.clip(np.asarray(ys, np.float64) - 0.5, 0, h - 1)
    v = np.clip(np.asarray(xs, np.float64) - 0.5, 0, w - 1)
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    u1, v1 = np.minimum(u0 + 1, h - 1), np.minimum(v0 + 1, w - 1)
    fu, fv = (u - u0)[:, None], (v - v0)[None, :]
    r = raster.astype(np.float64)
    return ((1 - fu) * (1 - fv) * r[np.ix_(u0, v0)] + (1 - fu) * fv * r[np.ix_(u0, v1)]
            + fu * (1 - fv) * r[np.ix_(u1, v0)] + fu * fv * r[np.ix_(u1, v1)])


def _cell_samples(raster, box, mask_size=MASK_SIZE):
    """raster [H, W] (output pixels) at the Mc x Mc cell centres of box."""
    y1, x1, y2, x2 = box
    ys = y1 + (np.arange(mask_size) + 0.5) * (y2 - y1) / mask_size
    xs = x1 + (np.arange(mask_size) + 0.5) * (x2 - x1) / mask_size
    return _bilinear(raster, ys, xs)


def _mirror_box(box, width=SIZE):
    y1, x1, y2, x2 = box
    return [y1, width - x2, y2, width - x1]


@pytest.mark.parametrize("flip", [False, True])
def test_a_pasted_band_empties_the_target_mask_beneath_it(flip):
    # Target A (class 1) and a source band B (class 2) across its middle: A keeps its extent, so its box
    # stays; its crop is A x (1 - B) at the cell centres, and the image shows B's pixels on B.
    target, target_masks = _rectangles([(16, 8, 48, 40)], [1], TARGET_COLOUR)
    source, source_masks = _rectangles([(4, 20, 60, 28)], [2], SOURCE_COLOUR)
    flip_kw = dict(flip_probability=1.0 if flip else 0.0)
    (features, stats), _ = _pair(target, source, **flip_kw)
    a, b = target_masks[0], source_masks[0]
    box_a, box_b = [16, 8, 48, 40], [4, 20, 60, 28]
    if flip:  # both examples are mirrored: the canvas shows the mirrored rasters
        a, b, box_a, box_b = a[:, ::-1], b[:, ::-1], _mirror_box(box_a), _mirror_box(box_b)
    np.testing.assert_array_equal(features["gt_classes"], [1, 2, -1, -1, -1, -1])
    np.testing.assert_allclose(features["gt_boxes"][:2], [box_a, box_b], atol=1e-5)
    expected = _cell_samples(a, box_a) * (1 - _cell_samples(b, box_a))
    np.testing.assert_allclose(features["gt_masks"][0], expected, atol=1e-5)
    # The cells under the band are 0 and cells a pixel clear of it are 1 (bilinear edges in between).
    xs = box_a[1] + (np.arange(MASK_SIZE) + 0.5) * (box_a[3] - box_a[1]) / MASK_SIZE
    under = (xs > box_b[1] + 0.5) & (xs < box_b[3] - 0.5)
    clear = (xs < box_b[1] - 1) | (xs > box_b[3] + 1)
    assert under.sum() >= 3 and clear.sum() >= 8
    assert np.all(features["gt_masks"][0][:, under] == 0) and np.all(features["gt_masks"][0][:, clear] == 1)
    # The pasted band's crop is its own mask at the cells of its box (nothing lies on top of it).
    np.testing.assert_allclose(features["gt_masks"][1], _cell_samples(b, box_b), atol=1e-5)
    # Image: the source's colour exactly on B, the target's on A outside B, the target's background elsewhere.
    image = features["images"]
    np.testing.assert_array_equal(image[b.astype(bool)], np.broadcast_to(SOURCE_COLOUR, (b.sum(), 3)))
    a_only = a.astype(bool) & ~b.astype(bool)
    np.testing.assert_array_equal(image[a_only], np.broadcast_to(TARGET_COLOUR, (a_only.sum(), 3)))
    assert np.all(image[~a.astype(bool) & ~b.astype(bool)] == 20)
    assert stats["num_occluded"] == 0


@pytest.mark.parametrize("flip", [False, True])
def test_a_paste_over_one_side_shrinks_the_target_box_to_what_is_left(flip):
    # B covers A's right half: A's box becomes its left half (whole cells: A is 32 px wide, 2 px a cell,
    # the paste empties 8 cells), and the crop taken again in that box is all ones.
    target, _ = _rectangles([(16, 8, 48, 40)], [1], TARGET_COLOUR)
    source, _ = _rectangles([(4, 24, 60, 60)], [2], SOURCE_COLOUR)
    (features, _), _ = _pair(target, source, flip_probability=1.0 if flip else 0.0)
    left_half = [16, 8, 48, 24]
    np.testing.assert_allclose(features["gt_boxes"][0], _mirror_box(left_half) if flip else left_half, atol=1e-5)
    np.testing.assert_array_equal(features["gt_masks"][0], 1.0)


def test_a_fully_covered_target_instance_is_removed_and_counted():
    # C (class 1) lies inside the pasted E (class 2); D (class 3) is clear of it and stays exactly as it was.
    target, _ = _rectangles([(20, 20, 30, 30), (50, 2, 60, 12)], [1, 3], TARGET_COLOUR)
    source, _ = _rectangles([(10, 10, 40, 40)], [2], SOURCE_COLOUR)
    (features, stats), _ = _pair(target, source)
    assert stats["num_occluded"] == 1
    np.testing.assert_array_equal(features["gt_classes"][:3], [3, 2, -1])
    np.testing.assert_allclose(features["gt_boxes"][:2], [[50, 2, 60, 12], [10, 10, 40, 40]], atol=1e-5)
    alone_target, _ = _alone(target, 0)
    alone_source, _ = _alone(source, 1)
    np.testing.assert_array_equal(features["gt_masks"][0], alone_target["gt_masks"][1])  # D untouched
    np.testing.assert_array_equal(features["gt_masks"][1], alone_source["gt_masks"][0])  # E's own crop
    assert not features["gt_masks"][2:].any()


def _shapes_source():
    """90x120: an ellipse (id 3), a triangle (id 2), a rectangle (id 1), each in its own colour."""
    import cv2

    height, width = 90, 120
    masks = np.zeros((3, height, width), np.uint8)
    cv2.ellipse(masks[0], (40, 35), (30, 22), 20, 0, 360, 1, -1)
    cv2.fillPoly(masks[1], [np.array([[70, 10], [115, 20], [85, 80]], np.int32)], 1)
    masks[2, 55:88, 5:60] = 1
    image = np.full((height, width, 3), 90, np.uint8)
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    for mask, colour in zip(masks, colours):
        image[mask.astype(bool)] = colour
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    return _example(image, np.array(boxes, np.float64), [3, 2, 1], masks), masks


@pytest.mark.parametrize("flip", [False, True])
def test_pasted_instances_keep_their_class_box_and_mask_through_the_sources_geometry(flip):
    # The source has its own jittered (and maybe mirrored) geometry; the target (no instances, 60x90) has
    # another. Pasted instances must be the source's, mapped by the source's image_info.
    source, source_masks = _shapes_source()
    target = _example(np.full((60, 90, 3), 30, np.uint8), np.zeros((0, 4)), [], np.zeros((0, 60, 90)))
    overrides = dict(output_size=(96, 96), mask_size=28, scale_range=(0.6, 1.3),
                     flip_probability=1.0 if flip else 0.0)
    record_boxes = source["boxes"].numpy().astype(np.float64)
    views = source_masks[:, :, ::-1] if flip else source_masks
    if flip:
        record_boxes[:, [1, 3]] = 120 - record_boxes[:, [3, 1]]
    subsets = set()
    for seed in range(6):
        (features, stats), (source_features, _) = _pair(target, source, seeds=(seed, 100 + seed), **overrides)
        alone_source, _ = _alone(source, 100 + seed, **overrides)
        alone_target, _ = _alone(target, seed, **overrides)
        for key in alone_source:  # the target had nothing to paste onto the source
            np.testing.assert_array_equal(source_features[key], alone_source[key])
        _, valid, scale, offset = source_features["image_info"]
        target_valid = features["image_info"][1]
        upper = np.tile(np.minimum(valid, target_valid), 2)
        expected = np.clip(record_boxes * np.tile(scale, 2) - np.tile(offset, 2), 0, upper)
        num = int((features["gt_classes"] > 0).sum())
        # Which instances were pasted: by class (record ids 3, 2, 1 -> contiguous 3, 2, 1).
        pasted = [3 - c for c in features["gt_classes"][:num]]
        assert num >= 1 and pasted == sorted(pasted), features["gt_classes"]
        subsets.add(tuple(pasted))
        np.testing.assert_allclose(features["gt_boxes"][:num], expected[pasted], atol=1e-3)
        union = np.zeros((96, 96), bool)
        for slot, i in enumerate(pasted):
            box = features["gt_boxes"][slot]
            reference = _reference_mask(views[i], source_features["image_info"], (96, 96))
            reference[int(target_valid[0]):] = False
            reference[:, int(target_valid[1]):] = False
            union |= reference
            if min(box[2] - box[0], box[3] - box[1]) > 24:
                assert _iou(_paste(features["gt_masks"][slot].astype(np.float64), box, (96, 96)), reference) >= 0.85
        # The image: the source's pixels inside the pasted objects (one pixel in from their edges), the
        # target's own output everywhere a pixel away from them.
        inner = union & np.roll(union, 1, 0) & np.roll(union, -1, 0) & np.roll(union, 1, 1) & np.roll(union, -1, 1)
        outer = ~(union | np.roll(union, 1, 0) | np.roll(union, -1, 0) | np.roll(union, 1, 1) | np.roll(union, -1, 1))
        assert inner.sum() > 50
        np.testing.assert_array_equal(features["images"][inner], source_features["images"][inner])
        np.testing.assert_array_equal(features["images"][outer], alone_target["images"][outer])
        rows, cols = int(target_valid[0]), int(target_valid[1])
        assert not features["images"][rows:].any() and not features["images"][:, cols:].any()
        assert stats["num_occluded"] == 0
    assert len(subsets) >= 2 and any(len(s) < 3 for s in subsets)  # a random subset, not always all


def test_pastes_stay_inside_the_targets_valid_window():
    # Target 64x32 (the canvas' right half is padding); the source's object straddles x = 32: it is cut at
    # the window, and an object wholly in the padding half is not pasted at all.
    target, _ = _rectangles([(4, 4, 20, 20)], [1], TARGET_COLOUR, width=32)
    source, _ = _rectangles([(30, 16, 60, 48), (2, 40, 20, 62)], [2, 3], SOURCE_COLOUR)
    for seed in range(4):
        (features, _), _ = _pair(target, source, seeds=(seed, 9))
        assert np.all(features["images"][:, 32:] == 0)
        classes = features["gt_classes"][features["gt_classes"] > 0].tolist()
        assert 3 not in classes
        if 2 in classes:
            np.testing.assert_allclose(features["gt_boxes"][classes.index(2)], [30, 16, 60, 32], atol=1e-5)
            np.testing.assert_array_equal(features["images"][30:60, 16:32],
                                          np.broadcast_to(SOURCE_COLOUR, (30, 16, 3)))


def test_probability_zero_and_unpasted_draws_give_transform_examples_output():
    target, _ = _rectangles([(16, 8, 48, 40)], [1], TARGET_COLOUR)
    source, _ = _rectangles([(4, 20, 60, 28), (40, 40, 60, 60)], [2, 3], SOURCE_COLOUR)
    jitter = dict(scale_range=(0.5, 1.5), flip_probability=0.5)
    pasted_seen = unpasted_seen = False
    for probability, seeds in [(0.0, (3, 4)), (0.5, (0, 1)), (0.5, (2, 3)), (0.5, (4, 5)), (0.5, (6, 7))]:
        outputs = _pair(target, source, seeds=seeds, copy_paste_probability=probability, **jitter)
        for (features, stats), example, seed in zip(outputs, (target, source), seeds):
            alone, alone_stats = _alone(example, seed, **jitter)
            same = all(np.array_equal(features[k], alone[k]) for k in alone)
            if probability == 0:
                assert same and stats == alone_stats
            pasted_seen |= not same
            unpasted_seen |= same and probability > 0
    assert pasted_seen and unpasted_seen


def test_a_seeded_paste_is_deterministic():
    target, _ = _rectangles([(16, 8, 48, 40), (2, 2, 10, 60)], [1, 2], TARGET_COLOUR)
    source, _ = _rectangles([(4, 20, 60, 28), (40, 40, 60, 60), (0, 0, 30, 10)], [2, 3, 1], SOURCE_COLOUR)
    jitter = dict(scale_range=(0.5, 1.5), flip_probability=0.5)
    first, second = _pair(target, source, **jitter), _pair(target, source, **jitter)
    other = _pair(target, source, seeds=(7, 8), **jitter)
    for (a, _), (b, _) in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["images"], c["images"]) for (a, _), (c, _) in zip(first, other))


def test_paste_selection_is_torchvisions_distinct_draws():
    candidates = tf.constant([True, False, True, True, True, False, True, True, True, True])  # m = 8
    chosen = np.array([transforms.paste_selection(candidates, tf.constant([s, 1])).numpy() for s in range(300)])
    assert not chosen[:, [1, 5]].any()
    # m draws with replacement from m: E[distinct] / m = 1 - (1 - 1/m)^m = 0.656 for m = 8.
    assert abs(chosen.sum(axis=1).mean() / 8 - (1 - (7 / 8) ** 8)) < 0.03
    assert chosen.sum(axis=1).min() >= 1
    one = tf.constant([False, True, False])
    assert all(transforms.paste_selection(one, tf.constant([s, 2])).numpy().tolist() == [False, True, False]
               for s in range(10))


def test_config_checks_the_probability():
    cfg = config_lib.get_preset("tiny")
    assert cfg.data.copy_paste_probability == 0.0  # off by default
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="data.copy_paste_probability"):
            config_lib.validate(config_lib.replace(cfg, **{"data.copy_paste_probability": bad}))


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def shapes_records(tmp_path_factory):
    from maskrcnn_tf.data.coco_converter import convert_coco
    from maskrcnn_tf.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("copy_paste_shapes")
    paths = make_shapes_dataset(str(root / "shapes"), num_train=6, num_val=0, image_size=80, seed=3,
                                image_format="png")
    convert_coco(paths["train_images"], paths["train_annotations"], str(root / "train"), num_shards=1,
                 progress=False)
    return str(root / "train-*")


def _pipeline_config(**overrides):
    cfg = config_lib.get_preset("tiny")
    return config_lib.replace(cfg, **{"model.image_size": (64, 64), "data.max_instances": 6, "data.gt_mask_size": 14,
                                      "data.train_batch_size": 2, "data.shuffle_buffer": 8, "data.seed": 4,
                                      "data.scale_jitter": (0.5, 1.5), **overrides})


def _batches(records, cfg, count=4):
    return [{k: v.numpy() for k, v in b.items()} for b in pipeline.build_dataset(records, cfg, True).take(count)]


@pytest.fixture(scope="module")
def plain_batches(shapes_records):
    return _batches(shapes_records, _pipeline_config())


def test_pipeline_with_copy_paste_keeps_static_shapes_on_shapes_records(shapes_records, plain_batches):
    cfg = _pipeline_config(**{"data.copy_paste_probability": 1.0})
    dataset = pipeline.build_dataset(shapes_records, cfg, training=True)
    n = cfg.data.max_instances
    spec = {"images": (2, 64, 64, 3), "image_info": (2, 4, 2), "gt_boxes": (2, n, 4), "gt_classes": (2, n),
            "gt_masks": (2, n, 14, 14), "has_masks": (2,)}
    assert {k: tuple(v.shape) for k, v in dataset.element_spec.items()} == spec
    pipeline.reset_instance_stats()
    pasted, plain = [{k: v.numpy() for k, v in b.items()} for b in dataset.take(4)], plain_batches
    for batch in pasted:
        assert {k: v.shape for k, v in batch.items()} == spec
        valid = batch["gt_classes"] > 0
        # Every instance left has some mask (occluded ones are dropped, not kept empty).
        assert np.all(batch["gt_masks"][valid].max(axis=(1, 2)) >= 0.5)
    # Objects were pasted: more instances than without copy-paste, on the same examples.
    assert sum((b["gt_classes"] > 0).sum() for b in pasted) > sum((b["gt_classes"] > 0).sum() for b in plain)
    assert set(pipeline.instance_stats()) == set(transforms.STAT_KEYS) | {"images_truncated"}


def test_pipeline_pairs_keep_the_per_example_order_and_seeds(shapes_records, plain_batches):
    # A probability that never draws a paste: the paired path must give exactly the per-example batches
    # (same example order, same per-example seeds; 0 runs the untouched per-example path).
    plain = plain_batches
    paired = _batches(shapes_records, _pipeline_config(**{"data.copy_paste_probability": 1e-9}))
    for a, b in zip(plain, paired):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
