"""RoIAlign: hand-computed answer, float64 NumPy reference (both backends), levels, gradients, XLA, dtypes."""
import math

import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.ops.roi_align import BACKENDS, assign_levels, multilevel_roi_align, roi_align

TOLERANCE = 1e-4  # brief: both backends within 1e-4 of the float64 reference


# ------------------------------------------------------------------------------------------------
# float64 NumPy reference written from the definition (He et al. 2017; detectron2 ROIAlignV2)
# ------------------------------------------------------------------------------------------------


def _np_bilinear(feature, y, x):
    """detectron2 kernel rule: 0 beyond one pixel outside the map, else clamp and interpolate."""
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[2], np.float64)
    y = min(max(y, 0.0), height - 1.0)
    x = min(max(x, 0.0), width - 1.0)
    y_low, x_low = int(math.floor(y)), int(math.floor(x))
    y_high, x_high = min(y_low + 1, height - 1), min(x_low + 1, width - 1)
    ly, lx = y - y_low, x - x_low
    return (
        (1 - ly) * (1 - lx) * feature[y_low, x_low]
        + (1 - ly) * lx * feature[y_low, x_high]
        + ly * (1 - lx) * feature[y_high, x_low]
        + ly * lx * feature[y_high, x_high]
    )


def np_roi_align(feature, box, output_size, sampling_ratio):
    """feature [H, W, C], box [y1, x1, y2, x2] in feature pixels -> [S, S, C] float64, aligned=True."""
    feature = np.asarray(feature, np.float64)
    y1, x1, y2, x2 = [float(v) for v in box]
    start_y, start_x = y1 - 0.5, x1 - 0.5  # half-pixel shift of the aligned convention
    bin_h, bin_w = (y2 - y1) / output_size, (x2 - x1) / output_size
    out = np.zeros((output_size, output_size, feature.shape[2]), np.float64)
    for i in range(output_size):
        for j in range(output_size):
            acc = np.zeros(feature.shape[2], np.float64)
            for iy in range(sampling_ratio):
                y = start_y + i * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                for ix in range(sampling_ratio):
                    x = start_x + j * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                    acc += _np_bilinear(feature, y, x)
            out[i, j] = acc / sampling_ratio**2
    return out


def np_roi_align_gradient(feature_shape, box, upstream, sampling_ratio):
    """d(sum(np_roi_align(f, box) * upstream)) / df, float64 [H, W, C]: every sample's four bilinear
    taps receive upstream[bin] * tap weight / sampling_ratio**2 (the same rule as `_np_bilinear`)."""
    height, width = feature_shape[:2]
    output_size = upstream.shape[0]
    grad = np.zeros(feature_shape, np.float64)
    y1, x1, y2, x2 = [float(v) for v in box]
    bin_h, bin_w = (y2 - y1) / output_size, (x2 - x1) / output_size
    for i in range(output_size):
        for j in range(output_size):
            share = np.asarray(upstream[i, j], np.float64) / sampling_ratio**2
            for iy in range(sampling_ratio):
                y = y1 - 0.5 + i * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                for ix in range(sampling_ratio):
                    x = x1 - 0.5 + j * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                    if y < -1.0 or y > height or x < -1.0 or x > width:
                        continue
                    y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
                    y_low, x_low = int(math.floor(y)), int(math.floor(x))
                    y_high, x_high = min(y_low + 1, height - 1), min(x_low + 1, width - 1)
                    ly, lx = y - y_low, x - x_low
                    grad[y_low, x_low] += (1 - ly) * (1 - lx) * share
                    grad[y_low, x_high] += (1 - ly) * lx * share
                    grad[y_high, x_low] += ly * (1 - lx) * share
                    grad[y_high, x_high] += ly * lx * share
    return grad


def np_level(box):
    """FPN eq. 1 in float64: floor(4 + log2(sqrt(area) / 224)) clamped to [2, 5]."""
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    if area <= 0:
        return 2
    return int(min(max(math.floor(4 + math.log2(math.sqrt(area) / 224.0)), 2), 5))


def random_boxes(rng, num, height, width, min_size, max_size, margin):
    """Boxes [num, 4] whose centres range `margin` pixels beyond the map, so many cross the border."""
    cy = rng.uniform(-margin, height + margin, num)
    cx = rng.uniform(-margin, width + margin, num)
    h = rng.uniform(min_size, max_size, num)
    w = rng.uniform(min_size, max_size, num)
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_answer(backend):
    # docs/design.md section 6 / detectron2 test_roi_align.py: an upsampled [[6, 7], [11, 12]].
    image = tf.reshape(tf.range(25, dtype=tf.float32), [1, 5, 5, 1])
    boxes = tf.constant([[[1.0, 1.0, 3.0, 3.0]]])
    expected = [[4.5, 5, 5.5, 6], [7, 7.5, 8, 8.5], [9.5, 10, 10.5, 11], [12, 12.5, 13, 13.5]]
    out = roi_align(image, boxes, output_size=4, sampling_ratio=2, backend=backend)
    assert out.shape == (1, 1, 4, 4, 1)
    np.testing.assert_allclose(out[0, 0, :, :, 0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_border_rule(backend):
    # A constant map: a sample in [-1, 0) is clamped (reads 1), a sample below -1 reads 0. Box
    # y in [-3, 1], one bin, sampling 4: samples at y = -3.5 + (k + 0.5) -> -3, -2, -1, 0 (k = 0..3);
    # only -1 and 0 count, x samples all inside -> mean 2 / 4 = 0.5 (hand-computed).
    ones = tf.ones([1, 4, 4, 1])
    boxes = tf.constant([[[-3.0, 1.0, 1.0, 3.0]]])
    out = roi_align(ones, boxes, output_size=1, sampling_ratio=4, backend=backend)
    np.testing.assert_allclose(out.numpy().ravel(), [0.5], atol=1e-5)


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), (3, 1), (2, 3)])
def test_single_level_matches_numpy_reference(output_size, sampling_ratio):
    rng = np.random.default_rng(1)
    batch, height, width, channels, num_boxes = 2, 11, 14, 3, 10
    features = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    boxes = random_boxes(rng, batch * num_boxes, height, width, 0.3, 9.0, margin=3.0)
    # Hand-picked edge cases: touching the border, crossing it, far outside, zero size.
    boxes[:4] = [[0, 0, 4, 5], [-2.5, -1.5, 3, 3], [height - 2, width - 3, height + 2, width + 1.5],
                 [height + 3, 2, height + 6, 6]]
    boxes[4] = [3, 4, 3, 7]
    boxes = boxes.reshape(batch, num_boxes, 4)
    expected = np.stack([
        np.stack([np_roi_align(features[b], boxes[b, r], output_size, sampling_ratio)
                  for r in range(num_boxes)])
        for b in range(batch)
    ])  # [B, R, S, S, C]
    outputs = {}
    for backend in BACKENDS:
        out = roi_align(tf.constant(features), tf.constant(boxes), output_size, sampling_ratio, backend)
        assert out.shape == expected.shape and out.dtype == tf.float32
        np.testing.assert_allclose(out.numpy(), expected, atol=TOLERANCE, err_msg=backend)
        outputs[backend] = out.numpy()
    np.testing.assert_allclose(outputs["gather"], outputs["crop_and_resize"], atol=TOLERANCE)
    # The far-outside box reads nothing: guards against clamping without the -1 / H cut-off.
    assert np.all(outputs["gather"][0, 3] == 0)


def _pyramid(rng, batch, image_hw, channels, dtype=np.float32):
    # P2..P5 plus a P6 that multilevel_roi_align must ignore.
    return {
        f"P{level}": rng.normal(
            size=(batch, math.ceil(image_hw[0] / 2**level), math.ceil(image_hw[1] / 2**level), channels)
        ).astype(dtype)
        for level in range(2, 7)
    }


def _multilevel_inputs():
    rng = np.random.default_rng(2)
    batch, image_hw, channels, num_boxes = 2, (192, 256), 2, 16
    features = _pyramid(rng, batch, image_hw, channels)
    # Sides 8..600 px span P2..P5 (and clamping at both ends); centres reach past the image border.
    boxes = random_boxes(rng, batch * num_boxes, *image_hw, 8.0, 600.0, margin=20.0)
    boxes[0] = [-1, -1, -1, -1]  # padding row: goes to P2 and stays finite
    return features, boxes.reshape(batch, num_boxes, 4)


def test_multilevel_matches_numpy_reference():
    features, boxes = _multilevel_inputs()
    output_size, sampling_ratio = 5, 2
    levels = np.array([[np_level(b) for b in image_boxes] for image_boxes in boxes])
    assert set(levels.ravel()) == {2, 3, 4, 5}, "test must exercise every level"
    expected = np.stack([
        np.stack([
            np_roi_align(features[f"P{levels[b, r]}"][b], boxes[b, r] / 2.0 ** levels[b, r],
                         output_size, sampling_ratio)
            for r in range(boxes.shape[1])
        ])
        for b in range(boxes.shape[0])
    ])
    tf_features = {k: tf.constant(v) for k, v in features.items()}
    np.testing.assert_array_equal(assign_levels(tf.constant(boxes)).numpy(), levels)
    outputs = {}
    for backend in BACKENDS:
        out = multilevel_roi_align(tf_features, tf.constant(boxes), output_size, sampling_ratio, backend)
        assert out.shape == expected.shape
        np.testing.assert_allclose(out.numpy(), expected, atol=TOLERANCE, err_msg=backend)
        outputs[backend] = out.numpy()
    np.testing.assert_allclose(outputs["gather"], outputs["crop_and_resize"], atol=TOLERANCE)


def _output_and_feature_grads(features, boxes, cotangent, backend):
    with tf.GradientTape() as tape:
        tape.watch(features)
        out = multilevel_roi_align(features, boxes, 7, 2, backend)
        loss = tf.reduce_sum(out * cotangent)
    return out, tape.gradient(loss, features)


def test_gather_backend_compiles_with_xla_and_gradients_agree():
    features, boxes = _multilevel_inputs()
    tf_features = {k: tf.constant(v) for k, v in features.items()}
    # A random cotangent (made outside the compiled function) so every output element matters.
    cotangent = tf.constant(np.random.default_rng(4).normal(size=(2, 16, 7, 7, 2)).astype(np.float32))
    compiled = tf.function(
        lambda f, b, c: _output_and_feature_grads(f, b, c, "gather"), jit_compile=True
    )
    out_xla, grads_xla = compiled(tf_features, tf.constant(boxes), cotangent)
    out_car, grads_car = _output_and_feature_grads(
        tf_features, tf.constant(boxes), cotangent, "crop_and_resize"
    )
    np.testing.assert_allclose(out_xla.numpy(), out_car.numpy(), atol=TOLERANCE)
    for level in range(2, 6):
        key = f"P{level}"
        assert np.all(np.isfinite(grads_xla[key].numpy()))
        assert np.any(grads_xla[key].numpy() != 0), key  # every level receives boxes
        np.testing.assert_allclose(grads_xla[key].numpy(), grads_car[key].numpy(), atol=TOLERANCE)
    assert grads_xla["P6"] is None  # P6 is not a RoIAlign level


def test_assign_levels():
    # FPN eq. 1 by hand: 224 -> 4, 112 -> 3, 448 -> 5, 223 -> 3 (just below canonical), 1 -> 2
    # (clamped), 5000 -> 5 (clamped), 56 x 224 (sqrt area 112) -> 3, padding / zero area -> 2.
    boxes = tf.constant([[
        [10, 10, 234, 234], [0, 0, 112, 112], [0, 0, 448, 448], [0, 0, 223, 223], [5, 5, 6, 6],
        [0, 0, 5000, 5000], [0, 0, 56, 224], [-1, -1, -1, -1], [3, 3, 3, 9],
    ]], tf.float32)
    levels = assign_levels(boxes)
    assert levels.dtype == tf.int32
    np.testing.assert_array_equal(levels.numpy(), [[4, 3, 5, 3, 2, 5, 3, 2, 2]])
    # Custom range: P3..P6 clamps the tiny box to 3 and the huge one to 6.
    np.testing.assert_array_equal(
        assign_levels(boxes, min_level=3, max_level=6).numpy(), [[4, 3, 5, 3, 3, 6, 3, 3, 3]]
    )


def test_gradients_flow_into_features():
    rng = np.random.default_rng(3)
    features = tf.Variable(rng.normal(size=(1, 12, 12, 2)).astype(np.float32))
    # First box well inside the map; second crosses the top-left border.
    boxes = tf.constant([[[2.0, 3.0, 6.5, 8.0], [-1.2, -0.7, 2.0, 2.5]]])
    output_size = 4
    grads = {}
    for backend in BACKENDS:
        with tf.GradientTape() as tape:
            out = roi_align(features, boxes, output_size, 2, backend)
            loss = tf.reduce_sum(out[:, 0])  # inside box only
        grad = tape.gradient(loss, features).numpy()
        assert np.all(np.isfinite(grad)), backend
        grads[backend] = grad
        with tf.GradientTape() as tape:
            loss_all = tf.reduce_sum(roi_align(features, boxes, output_size, 2, backend))
        grads[backend, "all"] = tape.gradient(loss_all, features).numpy()
        assert np.all(np.isfinite(grads[backend, "all"])), backend
    # The border-crossing box samples the padding of the crop_and_resize backend, whose gradient folds
    # the border back onto the edge pixels; the gather backend clamps indices instead (independent code).
    assert np.any(grads["gather", "all"][0, 0] != grads["gather"][0, 0])  # the border box reaches row 0
    np.testing.assert_allclose(grads["crop_and_resize", "all"], grads["gather", "all"], atol=1e-5)
    grad = grads["gather"]
    # Every bin's bilinear weights sum to 1 for an interior box, so d(sum)/d(features) sums to
    # S * S per channel (linearity of RoIAlign).
    np.testing.assert_allclose(grad.sum(axis=(0, 1, 2)), [output_size**2] * 2, rtol=1e-5)
    # Non-zero where sampled (rows 2..6, cols 3..7 cover the sample points), zero elsewhere.
    assert np.all(grad[0, 2:6, 3:7] > 0)
    assert np.all(grad[0, 8:, :] == 0) and np.all(grad[0, :, 9:] == 0) and np.all(grad[0, :1] == 0)
    np.testing.assert_allclose(grads["crop_and_resize"], grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_features(dtype, backend):
    features, boxes = _multilevel_inputs()
    reference = multilevel_roi_align({k: tf.constant(v) for k, v in features.items()},
                                     tf.constant(boxes), 4, 2, backend).numpy()
    half = {k: tf.cast(v, dtype) for k, v in features.items()}
    out = multilevel_roi_align(half, tf.constant(boxes), 4, 2, backend)
    assert out.dtype == dtype
    # Features are N(0, 1): bfloat16 keeps ~3 significant digits, float16 ~4 (rounding of inputs,
    # weights and the 16-tap sum).
    atol = 5e-2 if dtype == tf.bfloat16 else 5e-3
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), reference, atol=atol)


def test_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        roi_align(tf.zeros([1, 4, 4, 1]), tf.zeros([1, 1, 4]), 2, 2, backend="bilinear")


@pytest.mark.parametrize("shape, output_size, sampling_ratio", [
    ((2, 9, 11, 3), 7, 2), ((1, 1, 4, 2), 2, 2), ((1, 3, 1, 1), 3, 1), ((2, 6, 6, 2), 1, 1)])
def test_crop_and_resize_gradient_matches_numpy_adjoint_and_is_deterministic(
        shape, output_size, sampling_ratio):
    # The crop_and_resize backend's gradient is our sparse adjoint (pad, crop and average pool folded
    # into one matrix). Oracle: the float64 adjoint written from the definition (np_roi_align_gradient).
    # Not TensorFlow's autodiff of crop_and_resize: its CPU CropAndResizeGradImage loses updates between
    # threads now and then (tensorflow/tensorflow#42033), which made an earlier version of this test
    # flaky. Cases: boxes crossing every border, maps one pixel high or wide, S = sampling_ratio = 1.
    from maskrcnn_tf.ops.roi_align import _crop_and_resize_level

    rng = np.random.default_rng(sum(shape) + output_size)
    batch, height, width, channels = shape
    num_boxes = 40
    x = tf.constant(rng.normal(size=shape), tf.float32)
    boxes = random_boxes(rng, num_boxes, height, width, 0.2, 2.0 * max(height, width), 2.0)
    box_indices = rng.integers(0, batch, num_boxes).astype(np.int32)
    upstream = rng.normal(size=(num_boxes, output_size, output_size, channels))

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = _crop_and_resize_level(x, tf.constant(boxes), tf.constant(box_indices), output_size,
                                         sampling_ratio)
            loss = tf.reduce_sum(out * tf.constant(upstream, tf.float32))
        return tape.gradient(loss, x)

    reference = np.zeros(shape, np.float64)
    for box, image, up in zip(boxes, box_indices, upstream):
        reference[image] += np_roi_align_gradient(shape[1:], box, up, sampling_ratio)
    grad = gradient(x).numpy()
    assert np.any(reference != 0)
    # float32 sample positions and sums of up to 40 * 16 taps: ~1e-6 of the gradient scale (~10).
    np.testing.assert_allclose(grad, reference, rtol=1e-4, atol=1e-4)
    for _ in range(5):  # a fixed serial accumulation order: bit-identical on every call
        np.testing.assert_array_equal(gradient(x).numpy(), grad)
