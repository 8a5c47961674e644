"""batched_nms, mask_targets and paste_masks move / interpolate data without matmuls (issue 29, point 4).

On accelerators a float32 matmul is not exact: TF32 on Ampere+ GPUs (TensorFlow's default) rounds its
inputs to a 10-bit mantissa, a TPU's default float32 matmul is one bfloat16 pass (8 bits). A one-hot
einsum of boxes shifted by class offsets (~80k px) or a tent-weight matmul thresholded at 0.5 then
changes results. These ops use gathers and elementwise float32 arithmetic instead.

A CPU has no reduced-precision matmul, so a test double emulates one: tf.matmul / tf.einsum / ... cast
their float inputs to bfloat16 and back before multiplying. The double is first shown to change the
old formulations (written inline), then the ops are shown bit-identical with and without it, and
their traced graphs (while-loop bodies included) are shown to contain no MatMul / Einsum op.
"""
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.ops import masks as mask_ops
from maskrcnn_tf.ops import nms as nms_ops
from tests.ops.test_nms import _np_greedy_nms

IMAGE = 1024  # image side; class / level offsets are IMAGE + 1, as detection_generator / proposal_generator
NUM_CLASSES = 80
NUM_LEVELS = 5


# ------------------------------------------------------------------------------------------------
# the reduced-precision matmul double
# ------------------------------------------------------------------------------------------------


def _round_to_bfloat16(value):
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray)) and tf.as_dtype(value.dtype).is_floating:
        value = tf.convert_to_tensor(value)
        return tf.cast(tf.cast(value, tf.bfloat16), value.dtype)
    return value


def _reduced_precision(function):
    def rounded(*args, **kwargs):
        args = [_round_to_bfloat16(a) for a in args]
        kwargs = {k: _round_to_bfloat16(v) for k, v in kwargs.items()}
        return function(*args, **kwargs)

    return rounded


# Every public way in to a matmul that the old code (tf.matmul, tf.einsum) or a rewrite might take.
_MATMUL_ENTRY_POINTS = [
    (tf, "matmul"), (tf.linalg, "matmul"), (tf, "einsum"), (tf.linalg, "einsum"), (tf, "tensordot"),
    (tf.linalg, "tensordot"), (tf.linalg, "matvec"), (tf.raw_ops, "MatMul"), (tf.raw_ops, "BatchMatMul"),
    (tf.raw_ops, "BatchMatMulV2"), (tf.raw_ops, "BatchMatMulV3"), (tf.raw_ops, "Einsum"),
]


@pytest.fixture
def bfloat16_matmuls(monkeypatch):
    """Makes every matmul entry point round its float inputs to bfloat16 (a TPU's default pass)."""
    for module, name in _MATMUL_ENTRY_POINTS:
        monkeypatch.setattr(module, name, _reduced_precision(getattr(module, name)))


@pytest.fixture
def tf32_enabled():
    """Yields a function that runs `fn` with TensorFloat-32 matmuls enabled, then disabled."""
    previous = tf.config.experimental.tensor_float_32_execution_enabled()

    def run_both(fn):
        try:
            tf.config.experimental.enable_tensor_float_32_execution(True)
            with_tf32 = fn()
            tf.config.experimental.enable_tensor_float_32_execution(False)
            without_tf32 = fn()
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(previous)
        return with_tf32, without_tf32

    yield run_both
    tf.config.experimental.enable_tensor_float_32_execution(previous)


# ------------------------------------------------------------------------------------------------
# inputs (seeded) and float64 dense references
# ------------------------------------------------------------------------------------------------


def _clustered_boxes(rng, num_boxes, num_groups, extent=IMAGE):
    """[num_boxes, 4] boxes jittered around `num_groups` random objects (so NMS suppresses), clipped
    to the image, and [num_boxes] the object of each box."""
    centre = rng.uniform(0, extent, (num_groups, 2))
    size = rng.uniform(16, 200, (num_groups, 2))
    group = rng.integers(0, num_groups, num_boxes)
    centre = centre[group] + rng.normal(0, 6, (num_boxes, 2))
    size = size[group] * rng.uniform(0.8, 1.25, (num_boxes, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], -1)
    return np.clip(boxes, 0, extent).astype(np.float32), group


def _class_shifted_boxes(seed, num_boxes=1500):
    """Detection candidates of 80 classes shifted as DetectionGenerator shifts them: + class * offset."""
    rng = np.random.default_rng(seed)
    num_groups = num_boxes // 6
    boxes, group = _clustered_boxes(rng, num_boxes, num_groups)
    # Mostly the object's class, sometimes another one (several classes score on one object).
    classes = np.where(rng.uniform(size=num_boxes) < 0.8, rng.integers(1, NUM_CLASSES + 1, num_groups)[group],
                       rng.integers(1, NUM_CLASSES + 1, num_boxes))
    shifted = boxes + (classes * np.float32(IMAGE + 1.0))[:, None]
    scores = rng.uniform(0.05, 1.0, num_boxes).astype(np.float32)
    return shifted.astype(np.float32)[None], scores[None]


def _level_shifted_proposals(seed, per_level=500):
    """RPN candidates of 5 levels shifted as ProposalGenerator shifts them: + level * offset."""
    rng = np.random.default_rng(seed)
    boxes = [_clustered_boxes(rng, per_level, per_level // 5)[0] + np.float32(IMAGE + 1.0) * level
             for level in range(NUM_LEVELS)]
    scores = rng.normal(0, 3, NUM_LEVELS * per_level).astype(np.float32)  # logits
    return np.concatenate(boxes).astype(np.float32)[None], scores[None]


def _cell_coords(coords, start, extent, num_cells):
    """ops/masks._to_cells in float32 NumPy (the same operations, so the same float32 values)."""
    scale = np.float32(num_cells) / np.maximum(extent, np.float32(1e-6))
    return (coords - start[..., None]) * scale[..., None] - np.float32(0.5)


def _dense_tent(cells, num_cells):
    """float64 [..., P, num_cells] tent weights max(0, 1 - |u - j|)."""
    return np.maximum(0.0, 1.0 - np.abs(cells.astype(np.float64)[..., None] - np.arange(num_cells)))


def _np_paste(masks, boxes, height, width):
    """float64 dense reference of paste_masks: [B, D, H, W]."""
    mask_size = masks.shape[-1]
    y1, x1, y2, x2 = np.moveaxis(boxes, -1, 0)
    rows = _dense_tent(_cell_coords(np.arange(height, dtype=np.float32) + 0.5, y1, y2 - y1, mask_size), mask_size)
    cols = _dense_tent(_cell_coords(np.arange(width, dtype=np.float32) + 0.5, x1, x2 - x1, mask_size), mask_size)
    return rows @ masks.astype(np.float64) @ np.swapaxes(cols, -1, -2)


def _np_target_weights(roi_start, roi_extent, gt_start, gt_extent, mask_size, output_size, ratio=2):
    """float64 [B, S, T, Mc] dense target weights (mean of `ratio` clamped, inside-masked samples)."""
    num = output_size * ratio
    fractions = (np.arange(num, dtype=np.float32) + np.float32(0.5)) / np.float32(num)
    cells = _cell_coords(roi_start[..., None] + fractions * roi_extent[..., None], gt_start, gt_extent, mask_size)
    last = np.float32(mask_size - 1)
    inside = (cells >= -0.5) & (cells <= last + 0.5) & (gt_extent[..., None] > 0)
    weights = _dense_tent(np.clip(cells, 0, last), mask_size) * inside[..., None]
    return weights.reshape(weights.shape[:-2] + (output_size, ratio, mask_size)).mean(axis=-2)


def _np_mask_targets_values(gt_masks, gt_boxes, rois, matched, output_size):
    """float64 [B, S, T, T] resampled values (before the 0.5 threshold)."""
    boxes = np.take_along_axis(gt_boxes, matched[..., None], axis=1)
    masks = np.take_along_axis(gt_masks, matched[..., None, None], axis=1).astype(np.float64)
    mask_size = gt_masks.shape[-1]
    rows = _np_target_weights(rois[..., 0], rois[..., 2] - rois[..., 0], boxes[..., 0],
                              boxes[..., 2] - boxes[..., 0], mask_size, output_size)
    cols = _np_target_weights(rois[..., 1], rois[..., 3] - rois[..., 1], boxes[..., 1],
                              boxes[..., 3] - boxes[..., 1], mask_size, output_size)
    return rows @ masks @ np.swapaxes(cols, -1, -2)


def _paste_inputs(seed, batch=2, count=24, mask_size=28, height=150, width=170):
    rng = np.random.default_rng(seed)
    masks = rng.uniform(size=(batch, count, mask_size, mask_size)).astype(np.float32)
    corner = rng.uniform(-20, [height, width], (batch, count, 2))
    size = rng.uniform(5, 120, (batch, count, 2))
    boxes = np.concatenate([corner, corner + size], -1).astype(np.float32)
    boxes[0, -1] = -1.0  # padding row
    boxes[-1, -2, 2] = boxes[-1, -2, 0]  # zero height
    return masks, boxes, (height, width)


def _target_inputs(seed, batch=2, num_gt=6, crop=56, num_rois=40, output_size=28):
    rng = np.random.default_rng(seed)
    gt_masks = rng.uniform(size=(batch, num_gt, crop, crop)).astype(np.float32)  # soft: many values near 0.5
    corner = rng.uniform(0, 400, (batch, num_gt, 2))
    gt_boxes = np.concatenate([corner, corner + rng.uniform(8, 250, (batch, num_gt, 2))], -1).astype(np.float32)
    gt_boxes[1, -1] = -1.0  # padding gt
    matched = rng.integers(0, num_gt, (batch, num_rois)).astype(np.int32)
    base = np.take_along_axis(gt_boxes, matched[..., None], axis=1)
    size = base[..., 2:] - base[..., :2]
    centre = (base[..., :2] + base[..., 2:]) / 2 + rng.uniform(-0.4, 0.4, size.shape) * size
    half = size * rng.uniform(0.15, 2.0, size.shape) / 2  # RoIs from much smaller to larger than the gt
    rois = np.concatenate([centre - half, centre + half], -1).astype(np.float32)
    return gt_masks, gt_boxes, rois, matched, output_size


def _run_nms(boxes, scores, max_output_size):
    indices, num_valid = nms_ops.batched_nms(tf.constant(boxes), tf.constant(scores), max_output_size, 0.5)
    return indices.numpy(), num_valid.numpy()


def _run_targets(gt_masks, gt_boxes, rois, matched, output_size):
    return mask_ops.mask_targets(tf.constant(gt_masks), tf.constant(gt_boxes), tf.constant(rois),
                                 tf.constant(matched), output_size=output_size).numpy()


def _run_paste(masks, boxes, image_size):
    return mask_ops.paste_masks(tf.constant(masks), tf.constant(boxes), image_size).numpy()


# ------------------------------------------------------------------------------------------------
# the double is sensitive: the old matmul formulations change under it
# ------------------------------------------------------------------------------------------------


def test_double_changes_the_one_hot_einsum_of_class_shifted_boxes(bfloat16_matmuls):
    # The old NMS buffer update: kept boxes placed into their slots by a one-hot einsum.
    boxes, _ = _class_shifted_boxes(seed=0, num_boxes=512)  # [1, T, 4], coordinates up to ~82k
    placement = tf.one_hot(tf.range(512)[None], 512)  # [1, T, K], box t -> slot t
    placed = tf.einsum("btk,btc->bkc", placement, tf.constant(boxes)).numpy()
    error = np.abs(placed - boxes)
    assert error.max() >= 64.0, error.max()  # bfloat16 spacing at 32k-65k px is 256 px
    assert np.mean(error > 1.0) > 0.5


def test_double_changes_a_thresholded_tent_weight_matmul(bfloat16_matmuls):
    # The old paste / mask-target resampling: dense tent weights times the mask, then >= 0.5.
    masks, boxes, (height, width) = _paste_inputs(seed=1, batch=1)
    y1, x1, y2, x2 = np.moveaxis(boxes, -1, 0)
    rows = _dense_tent(_cell_coords(np.arange(height, dtype=np.float32) + 0.5, y1, y2 - y1, 28), 28)
    cols = _dense_tent(_cell_coords(np.arange(width, dtype=np.float32) + 0.5, x1, x2 - x1, 28), 28)
    rows, cols = tf.constant(rows, tf.float32), tf.constant(cols, tf.float32)
    rounded = tf.matmul(tf.matmul(rows, tf.constant(masks)), cols, transpose_b=True).numpy()
    exact = _np_paste(masks, boxes, height, width)
    assert np.abs(rounded - exact).max() > 1e-3
    assert np.sum((rounded >= 0.5) != (exact >= 0.5)) > 10  # pixels flip across the threshold


# ------------------------------------------------------------------------------------------------
# the ops are bit-identical with and without the double, and correct
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_size", [64, nms_ops.TILE_SIZE])  # 64: many tiles feed the kept-box buffer
def test_nms_of_80_class_shifted_boxes_is_exact(monkeypatch, request, tile_size):
    monkeypatch.setattr(nms_ops, "TILE_SIZE", tile_size)
    boxes, scores = _class_shifted_boxes(seed=2)
    exact = _run_nms(boxes, scores, 800)
    request.getfixturevalue("bfloat16_matmuls")
    rounded = _run_nms(boxes, scores, 800)
    np.testing.assert_array_equal(rounded[0], exact[0])
    np.testing.assert_array_equal(rounded[1], exact[1])
    reference = _np_greedy_nms(boxes[0], scores[0], 800, 0.5, float("-inf"))
    assert 100 < len(reference) < 800 < boxes.shape[1]  # suppression happens; the buffer crosses tiles
    assert exact[1][0] == len(reference) and exact[0][0, : len(reference)].tolist() == reference


def test_nms_of_level_shifted_proposals_is_exact(request):
    boxes, scores = _level_shifted_proposals(seed=3)
    exact = _run_nms(boxes, scores, 1000)
    request.getfixturevalue("bfloat16_matmuls")
    rounded = _run_nms(boxes, scores, 1000)
    np.testing.assert_array_equal(rounded[0], exact[0])
    np.testing.assert_array_equal(rounded[1], exact[1])
    reference = _np_greedy_nms(boxes[0], scores[0], 1000, 0.5, float("-inf"))
    assert nms_ops.TILE_SIZE < len(reference) < 1000  # several tiles, real suppression
    assert exact[1][0] == len(reference) and exact[0][0, : len(reference)].tolist() == reference


def test_kept_box_with_an_infinite_coordinate_leaves_the_other_slots_alone(monkeypatch):
    # A one-hot einsum adds 0 * inf = NaN to every other slot of the buffer (then no buffered box
    # suppresses anything); a gather copies each box on its own.
    monkeypatch.setattr(nms_ops, "TILE_SIZE", 16)
    rng = np.random.default_rng(10)
    boxes, _ = _clustered_boxes(rng, 120, 12, extent=200)
    scores = rng.uniform(size=120).astype(np.float32)
    far = np.argmax(scores)
    boxes[far] = [500, 500, np.inf, 520]  # valid (y2 > y1), the first box kept, overlaps nothing
    indices, num_valid = _run_nms(boxes[None], scores[None], 120)
    reference = _np_greedy_nms(boxes, scores, 120, 0.5, float("-inf"))
    assert reference[0] == far and 12 < len(reference) < 60
    assert num_valid[0] == len(reference) and indices[0, : len(reference)].tolist() == reference


def test_mask_targets_are_exact(request):
    inputs = _target_inputs(seed=4)
    exact = _run_targets(*inputs)
    request.getfixturevalue("bfloat16_matmuls")
    rounded = _run_targets(*inputs)
    np.testing.assert_array_equal(rounded, exact)
    values = _np_mask_targets_values(*inputs)
    differ = exact != (values >= 0.5)
    # Only float32-vs-float64 ties at the threshold may differ.
    assert np.all(np.abs(values[differ] - 0.5) < 1e-5), values[differ]
    assert 0.2 < exact.mean() < 0.8 and np.abs(values - 0.5).min() < 1e-2  # nontrivial, values near 0.5


def test_paste_masks_is_exact(request):
    inputs = _paste_inputs(seed=5)
    exact = _run_paste(*inputs)
    request.getfixturevalue("bfloat16_matmuls")
    rounded = _run_paste(*inputs)
    np.testing.assert_array_equal(rounded, exact)
    reference = _np_paste(inputs[0], inputs[1], *inputs[2])
    np.testing.assert_allclose(exact, reference, rtol=0, atol=1e-6)
    assert exact.dtype == np.float32 and exact.shape == reference.shape
    assert np.all(exact[0, -1] == 0) and np.all(exact[1, -2] == 0)  # padding row, zero-height box
    assert np.mean(exact > 0) > 0.05


def _scatter_taps(indices, weights, num_cells):
    """[..., P, A] taps -> [..., P, num_cells] dense rows (repeated cells add up)."""
    dense = np.zeros(indices.shape[:-1] + (num_cells,), np.float32)
    for tap in range(indices.shape[-1]):
        current = np.take_along_axis(dense, indices[..., tap:tap + 1], -1)
        np.put_along_axis(dense, indices[..., tap:tap + 1], current + weights[..., tap:tap + 1], -1)
    return dense


def test_taps_are_the_nonzero_entries_of_the_dense_weight_rows():
    # The previous dense float32 weights, inline: every tap weight must equal them bit for bit, so the
    # clamping, zero-extension and inside rules are unchanged.
    def dense_tent(cells, num_cells):
        return tf.maximum(0.0, 1.0 - tf.abs(cells[..., None] - tf.cast(tf.range(num_cells), tf.float32)))

    rng = np.random.default_rng(11)
    # paste_masks: zero-extended (cells beyond [0, 28) absent), exact cell centres, far-away samples.
    cells = np.concatenate([rng.uniform(-3, 31, 20000), np.arange(-3, 31, 0.25), [1e10, -1e10, 27.0, -1.0]])
    cells = tf.constant(cells.astype(np.float32))
    indices, weights = mask_ops._tent_taps(cells, 28)
    np.testing.assert_array_equal(_scatter_taps(indices.numpy(), weights.numpy(), 28), dense_tent(cells, 28))

    # mask_targets: clamped to the crop's edge centres, 0 outside the gt box, mean of 2 samples.
    batch, rois, size, crop = 2, 300, 28, 56
    gt_start = rng.uniform(0, 100, (batch, rois)).astype(np.float32)
    gt_extent = rng.uniform(-1, 200, (batch, rois)).astype(np.float32)  # some degenerate
    roi_start = (gt_start + rng.uniform(-50, 50, (batch, rois))).astype(np.float32)
    roi_extent = rng.uniform(0, 400, (batch, rois)).astype(np.float32)  # from far smaller to larger
    indices, weights = mask_ops._target_axis_taps(roi_start, roi_extent, gt_start, gt_extent, crop, size)
    samples = (np.arange(2 * size, dtype=np.float32) + np.float32(0.5)) / np.float32(2 * size)
    coords = _cell_coords(roi_start[..., None] + samples * roi_extent[..., None], gt_start, gt_extent, crop)
    inside = (coords >= -0.5) & (coords <= crop - 0.5) & (gt_extent[..., None] > 0)
    dense = dense_tent(tf.clip_by_value(coords, 0.0, crop - 1.0), crop) * tf.cast(inside, tf.float32)[..., None]
    dense = tf.reduce_mean(tf.reshape(dense, [batch, rois, size, 2, crop]), axis=-2).numpy()
    np.testing.assert_array_equal(_scatter_taps(indices.numpy(), weights.numpy(), crop), dense)
    assert np.mean(np.count_nonzero(dense, axis=-1) > 2) > 0.1  # targets of RoIs larger than their gt


def test_tf32_setting_changes_nothing(tf32_enabled):
    # Documents the intent: on a CPU the setting is a no-op; on an Ampere+ GPU it would change a matmul.
    boxes, scores = _class_shifted_boxes(seed=6, num_boxes=800)
    with_tf32, without_tf32 = tf32_enabled(lambda: _run_nms(boxes, scores, 300))
    for a, b in zip(with_tf32, without_tf32):
        np.testing.assert_array_equal(a, b)
    reference = _np_greedy_nms(boxes[0], scores[0], 300, 0.5, float("-inf"))
    assert with_tf32[0][0, : with_tf32[1][0]].tolist() == reference

    targets = _target_inputs(seed=7)
    with_tf32, without_tf32 = tf32_enabled(lambda: _run_targets(*targets))
    np.testing.assert_array_equal(with_tf32, without_tf32)
    values = _np_mask_targets_values(*targets)
    assert np.all(np.abs(values[with_tf32 != (values >= 0.5)] - 0.5) < 1e-5)

    paste = _paste_inputs(seed=8)
    with_tf32, without_tf32 = tf32_enabled(lambda: _run_paste(*paste))
    np.testing.assert_array_equal(with_tf32, without_tf32)
    np.testing.assert_allclose(with_tf32, _np_paste(paste[0], paste[1], *paste[2]), rtol=0, atol=1e-6)


def test_mask_targets_compile_under_xla():
    inputs = _target_inputs(seed=9)
    fn = tf.function(lambda *a: mask_ops.mask_targets(*a, output_size=28), jit_compile=True)
    compiled = fn(*[tf.constant(x) for x in inputs[:4]]).numpy()
    values = _np_mask_targets_values(*inputs)
    assert np.all(np.abs(values[compiled != (values >= 0.5)] - 0.5) < 1e-5)
    assert 0.2 < compiled.mean() < 0.8


# ------------------------------------------------------------------------------------------------
# structure: no matmul op in the traced graphs, nested while-loop bodies included
# ------------------------------------------------------------------------------------------------


def _op_types(concrete_function):
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:  # while-loop bodies / conditions and other nested functions
        types |= {node.op for node in function.node_def}
    return types


def _matmul_ops(types):
    return sorted(t for t in types if "MatMul" in t or "Einsum" in t)


def test_op_walker_finds_a_matmul_inside_a_while_loop_body():
    def einsum_in_loop(x):
        return tf.while_loop(lambda i, y: i < 2, lambda i, y: (i + 1, tf.einsum("ij,jk->ik", y, y)), [0, x])[1]

    concrete = tf.function(einsum_in_loop).get_concrete_function(tf.TensorSpec([3, 3], tf.float32))
    graph_def = concrete.graph.as_graph_def()
    assert "Einsum" not in {node.op for node in graph_def.node}  # only in the body function ...
    assert _matmul_ops(_op_types(concrete))  # ... which the walker reads
    matmul = tf.function(lambda a: tf.matmul(a, a)).get_concrete_function(tf.TensorSpec([2, 3, 3], tf.float32))
    assert _matmul_ops(_op_types(matmul)) == ["BatchMatMulV2"]


@pytest.mark.parametrize("op", ["batched_nms", "mask_targets", "paste_masks"])
def test_no_matmul_in_the_graph(op):
    # Unknown batch / instance counts, as a Keras model traces them; the static output dims must survive.
    if op == "batched_nms":
        fn = tf.function(lambda b, s: nms_ops.batched_nms(b, s, 100, 0.5))
        specs = [tf.TensorSpec([None, 1500, 4], tf.float32), tf.TensorSpec([None, 1500], tf.float32)]
        static_shape = [None, 100]
    elif op == "mask_targets":
        fn = tf.function(lambda g, gb, r, m: mask_ops.mask_targets(g, gb, r, m, output_size=28))
        specs = [tf.TensorSpec([None, None, None, None], tf.float32), tf.TensorSpec([None, None, 4], tf.float32),
                 tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, None], tf.int32)]
        static_shape = [None, None, 28, 28]
    else:
        fn = tf.function(lambda m, b: mask_ops.paste_masks(m, b, (150, 170)))
        specs = [tf.TensorSpec([None, None, 28, 28], tf.float32), tf.TensorSpec([None, None, 4], tf.float32)]
        static_shape = [None, None, 150, 170]
    concrete = fn.get_concrete_function(*specs)
    output = concrete.structured_outputs[0] if op == "batched_nms" else concrete.structured_outputs
    assert output.shape.as_list() == static_shape
    types = _op_types(concrete)
    assert "GatherV2" in types  # the trace did reach the op's body
    if op == "batched_nms":
        assert "While" in types or "StatelessWhile" in types
    assert _matmul_ops(types) == []
