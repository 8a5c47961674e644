"""RPNHead, BoxHead, MaskHead: float64 NumPy oracles, class-channel selection, initialisation statistics,
mixed precision (float32 outputs) and dynamic batch (the layer contract: test_layer_contract.py)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.layers.box_head import BoxHead
from maskrcnn_tf.layers.mask_head import MaskHead
from maskrcnn_tf.layers.rpn_head import RPNHead
from tests.numpy_reference import conv2d_same

BATCH = 2
NUM_ROIS = 3  # S
CHANNELS = 5  # C of the RoI features / FPN levels
NUM_CLASSES = 4  # K


def _rng(seed=0):
    return np.random.default_rng(seed)


def _deconv2x2_stride2(x, kernel, bias):
    """float64 2x2 stride-2 transposed conv: out[2i + a, 2j + b, o] = sum_c x[i, j, c] * kernel[a, b, o, c] + bias[o]
    (Keras' Conv2DTranspose kernel is [kh, kw, out, in]; with kernel = stride the tiles do not overlap)."""
    n, h, w, _ = x.shape
    out = np.zeros((n, 2 * h, 2 * w, kernel.shape[2]))
    for a in range(2):
        for b in range(2):
            out[:, a::2, b::2, :] = x @ kernel[a, b].T
    return out + bias


def _relu(x):
    return np.maximum(x, 0.0)


def _weights(layer):
    """{"sublayer/kernel": float64 array} of a head's variables."""
    return {"/".join(w.path.split("/")[-2:]): np.asarray(w.numpy(), np.float64) for w in layer.weights}


def _randomize_biases(layer):
    # Zero-initialised biases would hide a missing bias term from the oracle comparisons.
    rng = _rng(1)
    for w in layer.weights:
        if w.name == "bias":
            w.assign(rng.normal(size=w.shape).astype(np.float32))


def _assert_std(values, expected_std, rel_tol=0.2):
    # rel_tol 0.2: the sample std of >= 256 draws is within ~10% of the true std with high probability.
    assert abs(np.std(values) - expected_std) < rel_tol * expected_std, (np.std(values), expected_std)


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield keras.mixed_precision.Policy(request.param).compute_dtype
    keras.config.set_dtype_policy(previous)


# ------------------------------------------------------------------------------------------ RPN


def _pyramid(batch=BATCH):
    rng = _rng()
    return {f"P{l}": rng.normal(size=(batch, 32 // 2**l, 32 // 2**l, CHANNELS)).astype(np.float32) for l in range(2, 6)}


def test_rpn_head_matches_numpy_oracle_on_every_level():
    num_anchors = 3
    layer = RPNHead(num_anchors_per_location=num_anchors, num_filters=6)
    features = _pyramid()
    layer(features)
    _randomize_biases(layer)
    scores, deltas = layer(features)
    w = _weights(layer)
    assert sorted(scores) == sorted(deltas) == sorted(features)
    for key, feature in features.items():
        hidden = _relu(conv2d_same(feature.astype(np.float64), w["conv/kernel"], w["conv/bias"]))
        # Same weights for every level (one set of variables).
        expected_scores = conv2d_same(hidden, w["objectness/kernel"], w["objectness/bias"])
        expected_deltas = conv2d_same(hidden, w["box_deltas/kernel"], w["box_deltas/bias"])
        assert scores[key].shape == feature.shape[:3] + (num_anchors,)
        assert deltas[key].shape == feature.shape[:3] + (num_anchors * 4,)
        np.testing.assert_allclose(scores[key].numpy(), expected_scores, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(deltas[key].numpy(), expected_deltas, rtol=1e-4, atol=1e-4)
    assert len(layer.weights) == 6  # 3 convs x (kernel, bias): shared, not per level


def test_rpn_head_init_as_detectron2():
    layer = RPNHead(num_anchors_per_location=3, num_filters=32)
    layer({"P2": np.zeros((1, 4, 4, 32), np.float32)})
    for name in ("conv", "objectness", "box_deltas"):
        sublayer = getattr(layer, name)
        _assert_std(sublayer.kernel.numpy(), 0.01)  # detectron2 StandardRPNHead: normal(std=0.01)
        np.testing.assert_array_equal(sublayer.bias.numpy(), 0.0)


def test_rpn_head_mixed_precision_dynamic_batch(mixed_policy):
    layer = RPNHead(num_anchors_per_location=2, num_filters=8)
    signature = {k: tf.TensorSpec((None,) + v.shape[1:], tf.float32) for k, v in _pyramid().items()}
    fn = tf.function(layer.__call__, input_signature=[signature])
    for batch in (1, 3):
        scores, deltas = fn(_pyramid(batch))
        assert scores["P2"].shape[0] == deltas["P5"].shape[0] == batch
        assert all(t.dtype == tf.float32 for t in tf.nest.flatten((scores, deltas)))
    assert layer.conv.compute_dtype == mixed_policy
    assert all(w.dtype == "float32" for w in layer.weights)


# ------------------------------------------------------------------------------------------ box head

POOL = 3  # RoI feature size (7 in the model; small here for the oracle)


def _roi_features(batch=BATCH, size=POOL):
    return _rng(2).normal(size=(batch, NUM_ROIS, size, size, CHANNELS)).astype(np.float32)


def test_box_head_matches_numpy_oracle():
    layer = BoxHead(num_classes=NUM_CLASSES, num_fcs=2, fc_dim=16)
    features = _roi_features()
    layer(features)
    _randomize_biases(layer)
    class_logits, box_deltas = layer(features)
    w = _weights(layer)
    # Flatten each RoI in (y, x, channel) order (documented), then 2 x FC + ReLU and the two outputs.
    x = features.astype(np.float64).reshape(BATCH, NUM_ROIS, -1)
    for fc in ("fc1", "fc2"):
        x = _relu(x @ w[f"{fc}/kernel"] + w[f"{fc}/bias"])
    assert class_logits.shape == (BATCH, NUM_ROIS, NUM_CLASSES + 1)
    assert box_deltas.shape == (BATCH, NUM_ROIS, (NUM_CLASSES + 1) * 4)
    np.testing.assert_allclose(class_logits.numpy(), x @ w["classifier/kernel"] + w["classifier/bias"],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(box_deltas.numpy(), x @ w["box_regressor/kernel"] + w["box_regressor/bias"],
                               rtol=1e-4, atol=1e-4)


def test_box_head_init_as_detectron2():
    fc_dim = 256
    layer = BoxHead(num_classes=NUM_CLASSES, num_fcs=1, fc_dim=fc_dim)
    layer(_roi_features())
    _assert_std(layer.classifier.kernel.numpy(), 0.01)  # detectron2 FastRCNNOutputLayers: cls_score std 0.01
    _assert_std(layer.box_regressor.kernel.numpy(), 0.001)  # bbox_pred std 0.001
    # c2_xavier_fill = U(+-sqrt(3 / fan_in)), std = 1 / sqrt(fan_in)
    _assert_std(layer.fcs[0].kernel.numpy(), 1 / np.sqrt(POOL * POOL * CHANNELS))
    for w in layer.weights:
        if w.name == "bias":
            np.testing.assert_array_equal(w.numpy(), 0.0)


def test_box_head_mixed_precision_dynamic_batch(mixed_policy):
    kwargs = dict(num_classes=NUM_CLASSES, num_fcs=1, fc_dim=8)
    layer = BoxHead(**kwargs)
    fn = tf.function(layer.__call__, input_signature=[tf.TensorSpec((None, NUM_ROIS, POOL, POOL, CHANNELS))])
    for batch in (1, 3):
        class_logits, box_deltas = fn(_roi_features(batch))
        assert class_logits.shape == (batch, NUM_ROIS, NUM_CLASSES + 1)
        assert class_logits.dtype == box_deltas.dtype == tf.float32
    assert layer.fcs[0].compute_dtype == mixed_policy
    assert all(w.dtype == "float32" for w in layer.weights)


# ------------------------------------------------------------------------------------------ mask head

MASK_IN = 4  # RoI feature size (14 in the model); the head doubles it


def _mask_features(batch=BATCH):
    return _rng(3).normal(size=(batch, NUM_ROIS, MASK_IN, MASK_IN, CHANNELS)).astype(np.float32)


# Class per RoI: all foreground classes appear, plus 0 (background/padding -> channel of class 1).
CLASSES = np.array([[1, 4, 2], [3, 0, 4]], np.int32)


def _expected_channel(classes):
    return np.clip(classes - 1, 0, NUM_CLASSES - 1)


def test_mask_head_matches_numpy_oracle():
    layer = MaskHead(num_classes=NUM_CLASSES, num_convs=2, num_filters=6)
    features = _mask_features()
    layer(features, CLASSES)
    _randomize_biases(layer)
    logits = layer(features, CLASSES).numpy()
    w = _weights(layer)
    x = features.astype(np.float64).reshape(BATCH * NUM_ROIS, MASK_IN, MASK_IN, CHANNELS)
    for conv in ("conv1", "conv2"):
        x = _relu(conv2d_same(x, w[f"{conv}/kernel"], w[f"{conv}/bias"]))
    x = _relu(_deconv2x2_stride2(x, w["deconv/kernel"], w["deconv/bias"]))
    x = conv2d_same(x, w["predictor/kernel"], w["predictor/bias"])  # [B * S, 2M, 2M, K]
    x = x.reshape(BATCH, NUM_ROIS, 2 * MASK_IN, 2 * MASK_IN, NUM_CLASSES)
    b, s = np.meshgrid(np.arange(BATCH), np.arange(NUM_ROIS), indexing="ij")
    expected = x[b, s, :, :, _expected_channel(CLASSES)]  # [B, S, 2M, 2M]
    assert logits.shape == (BATCH, NUM_ROIS, 2 * MASK_IN, 2 * MASK_IN)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_mask_head_selects_class_channel():
    # Run the head's own sublayers to get all K channels, index them in NumPy and compare with the
    # gathered output; the RoIs use different classes, so a wrong channel or a transposed gather shows.
    layer = MaskHead(num_classes=NUM_CLASSES, num_convs=1, num_filters=8)
    features = _mask_features()
    selected = layer(features, CLASSES).numpy()
    x = features.reshape(BATCH * NUM_ROIS, MASK_IN, MASK_IN, CHANNELS)
    for sublayer in layer.convs + [layer.deconv, layer.predictor]:
        x = sublayer(x)
    all_channels = x.numpy().reshape(BATCH, NUM_ROIS, 2 * MASK_IN, 2 * MASK_IN, NUM_CLASSES)
    channels = _expected_channel(CLASSES)
    for i in range(BATCH):
        for j in range(NUM_ROIS):
            np.testing.assert_array_equal(selected[i, j], all_channels[i, j, :, :, channels[i, j]])
    # The channels really differ, so the comparison above can fail.
    assert not np.allclose(all_channels[..., 0], all_channels[..., 1])


def test_mask_head_init_as_detectron2():
    num_filters = 16
    layer = MaskHead(num_classes=NUM_CLASSES, num_convs=1, num_filters=num_filters)
    layer(_mask_features(), CLASSES)
    # c2_msra_fill: normal std sqrt(2 / fan_out), fan_out = k * k * out (deconv: k * k * in, as PyTorch)
    _assert_std(layer.convs[0].kernel.numpy(), np.sqrt(2 / (9 * num_filters)))
    _assert_std(layer.deconv.kernel.numpy(), np.sqrt(2 / (4 * num_filters)))
    _assert_std(layer.predictor.kernel.numpy(), 0.001)
    for w in layer.weights:
        if w.name == "bias":
            np.testing.assert_array_equal(w.numpy(), 0.0)


def test_mask_head_mixed_precision_dynamic_batch(mixed_policy):
    kwargs = dict(num_classes=NUM_CLASSES, num_convs=1, num_filters=8)
    layer = MaskHead(**kwargs)
    fn = tf.function(layer.__call__, input_signature=[
        tf.TensorSpec((None, NUM_ROIS, MASK_IN, MASK_IN, CHANNELS)), tf.TensorSpec((None, NUM_ROIS), tf.int32)])
    for batch in (1, 3):
        logits = fn(_mask_features(batch), np.ones((batch, NUM_ROIS), np.int32))
        assert logits.shape == (batch, NUM_ROIS, 2 * MASK_IN, 2 * MASK_IN)
        assert logits.dtype == tf.float32
    assert layer.deconv.compute_dtype == mixed_policy
    assert all(w.dtype == "float32" for w in layer.weights)
