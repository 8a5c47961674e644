"""FPN: shapes, a float64 NumPy oracle of the paper's top-down pathway, extra levels, layer contract,
mixed precision and dynamic batch."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.layers.fpn import FPN
from tests.numpy_reference import conv2d_same

IMAGE_SIZE = 64
BATCH = 2
C_CHANNELS = {"C2": 4, "C3": 6, "C4": 8, "C5": 10}  # deliberately different per level
NUM_FILTERS = 8


def _c_features(batch=BATCH):
    rng = np.random.default_rng(0)
    return {key: rng.normal(size=(batch, IMAGE_SIZE // 2 ** int(key[1]), IMAGE_SIZE // 2 ** int(key[1]), ch))
            .astype(np.float32) for key, ch in C_CHANNELS.items()}


def _fpn_oracle(layer, features):
    """Lin et al. 2017 section 3 with detectron2's P6 = 1x1 max-pool stride 2 of P5, in float64."""
    weights = {w.path.split("/")[-2] + "/" + w.name: np.asarray(w.numpy(), np.float64) for w in layer.weights}
    outputs, top_down = {}, None
    for level in (5, 4, 3, 2):
        lateral = conv2d_same(features[f"C{level}"].astype(np.float64), weights[f"lateral_P{level}/kernel"],
                               weights[f"lateral_P{level}/bias"])
        if top_down is not None:
            lateral = lateral + top_down.repeat(2, axis=1).repeat(2, axis=2)
        top_down = lateral
        outputs[f"P{level}"] = conv2d_same(lateral, weights[f"output_P{level}/kernel"],
                                            weights[f"output_P{level}/bias"])
    outputs["P6"] = outputs["P5"][:, ::2, ::2, :]
    return outputs


def _randomize_biases(layer):
    # Zero-initialised biases would hide a missing bias term from the oracle comparison.
    rng = np.random.default_rng(1)
    for w in layer.weights:
        if w.name == "bias":
            w.assign(rng.normal(size=w.shape).astype(np.float32))


def test_fpn_matches_numpy_oracle_and_shapes():
    features = _c_features()
    layer = FPN(num_filters=NUM_FILTERS)
    layer(features)
    _randomize_biases(layer)
    outputs = {k: v.numpy() for k, v in layer(features).items()}
    assert sorted(outputs) == ["P2", "P3", "P4", "P5", "P6"]
    for level in range(2, 7):
        # stride 2**level; P6 of a 64-px image: ceil(64 / 64) = 1
        side = -(-IMAGE_SIZE // 2**level)
        assert outputs[f"P{level}"].shape == (BATCH, side, side, NUM_FILTERS)
    expected = _fpn_oracle(layer, features)
    for key in expected:
        np.testing.assert_allclose(outputs[key], expected[key], rtol=1e-4, atol=1e-4)


def test_fpn_level_range_and_extra_levels():
    features = _c_features()
    layer = FPN(num_filters=NUM_FILTERS, min_level=3, max_level=7)
    outputs = layer(features)
    assert sorted(outputs) == ["P3", "P4", "P5", "P6", "P7"]
    # No lateral conv for the unused C2.
    assert not any("P2" in w.path for w in layer.weights)
    np.testing.assert_array_equal(outputs["P7"].numpy(), outputs["P6"].numpy()[:, ::2, ::2, :])
    with pytest.raises(ValueError, match="max_level"):
        FPN(min_level=2, max_level=4)


def test_fpn_layer_contract():
    features = _c_features()
    kwargs = dict(num_filters=NUM_FILTERS, min_level=3, max_level=6)
    layer = FPN(**kwargs)
    out = layer(features)
    config = layer.get_config()
    assert {k: config[k] for k in kwargs} == kwargs
    clone = FPN.from_config(config)
    clone(features)
    clone.set_weights(layer.get_weights())
    out_clone = clone(features)
    for key in out:
        np.testing.assert_array_equal(out[key].numpy(), out_clone[key].numpy())
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, FPN) and restored.get_config() == config


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


def test_fpn_mixed_precision(mixed_policy):
    compute_dtype = keras.mixed_precision.Policy(mixed_policy).compute_dtype
    layer = FPN(num_filters=NUM_FILTERS)
    outputs = layer(_c_features())
    # Features stay in the compute dtype (documented); variables stay float32.
    assert all(v.dtype == compute_dtype for v in outputs.values())
    assert all(w.dtype == "float32" for w in layer.weights)


def test_fpn_dynamic_batch():
    layer = FPN(num_filters=NUM_FILTERS)
    inputs = {k: keras.Input(shape=v.shape[1:]) for k, v in _c_features().items()}
    symbolic = layer(inputs)
    assert symbolic["P2"].shape == (None, IMAGE_SIZE // 4, IMAGE_SIZE // 4, NUM_FILTERS)
    signature = {k: tf.TensorSpec((None,) + v.shape[1:], tf.float32) for k, v in _c_features().items()}
    fn = tf.function(layer.call, input_signature=[signature])
    for batch in (1, 3):
        assert fn(_c_features(batch))["P6"].shape[0] == batch
