"""run_layer_test: the Keras layer contract every layer of maskrcnn_tf/layers goes through (in the manner of
keras-hub's TestCase.run_layer_test; tests/layers/test_layer_contract.py calls it once per layer).

Checked, in order:
1. Config round trip: get_config() holds every constructor argument given, with at least one that differs
   from the constructor's default (so the round trip proves something); from_config(config).get_config()
   == config; serialize/deserialize_keras_object finds the class through its registration.
2. Weights: the counts of trainable and non-trainable weights after the first call; a clone built from
   the config with the weights copied gives the same outputs.
3. float32: every floating output is float32 (or `float32_output_dtypes`) and finite.
4. Mixed precision: under the global mixed_float16 policy, the layer built with `mixed_kwargs` (default
   dtype="mixed_float16") and the float32 weights keeps float32 variables, returns the expected dtypes
   and stays within `mixed_atol` of the float32 outputs.
5. jit: when the layer says `supports_jit`, tf.function(jit_compile=True) gives the eager outputs
   (within `jit_atol`: XLA may fuse differently), or, for layers that draw random numbers
   (`jit_same_outputs=False`: XLA's stateless RNG draws other numbers from the same seed), outputs of
   the same shapes and dtypes.
"""
import inspect

import keras
import numpy as np
import tensorflow as tf

MIXED_POLICY = "mixed_float16"


def _float_outputs(outputs):
    return [x for x in tf.nest.flatten(outputs) if x.dtype.is_floating]


def _assert_outputs_close(actual, expected, atol, what):
    actual, expected = tf.nest.flatten(actual), tf.nest.flatten(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{what}: output {i} shape {a.shape} != {e.shape}"
        if a.dtype.kind == "f" or e.dtype.kind == "f":
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), atol=atol, rtol=0,
                                       err_msg=f"{what}: output {i}")
        else:
            np.testing.assert_array_equal(a, e, err_msg=f"{what}: output {i}")


def _constructor_defaults(layer_cls):
    return {name: p.default for name, p in inspect.signature(layer_cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def run_layer_test(layer_cls, *, init_kwargs, call_args, call_kwargs=None, expected_num_trainable_weights,
                   expected_num_non_trainable_weights=0, float32_output_dtypes="float32",
                   mixed_kwargs=None, mixed_output_dtypes="float16", mixed_atol=5e-2, jit_atol=1e-4,
                   jit_same_outputs=True):
    """Runs the checks of the module docstring; returns the float32 outputs.

    call_args: positional call inputs (tensors, dicts of tensors). call_kwargs: keyword call inputs.
    *_output_dtypes: one dtype name for every floating output, or a list in tf.nest.flatten order.
    mixed_kwargs: constructor kwargs added for the mixed-precision run (default dtype="mixed_float16";
      layers that build_model keeps in float32 pass {"dtype": "float32"} and mixed_atol=0).
    """
    call_kwargs = call_kwargs or {}

    # 1. Config round trip.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for key, value in init_kwargs.items():
        if key != "dtype":
            assert config[key] == value, f"get_config()[{key!r}] = {config[key]!r}, constructed with {value!r}"
    defaults = _constructor_defaults(layer_cls)
    assert any(key in defaults and value != defaults[key] for key, value in init_kwargs.items()), (
        "give at least one non-default constructor argument, or the round trip proves nothing")
    assert layer_cls.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is layer_cls and restored.get_config() == config, "not registered serializable?"

    # 2. Weights and 3. float32 outputs.
    outputs = layer(*call_args, **call_kwargs)
    assert len(layer.trainable_weights) == expected_num_trainable_weights, [w.path for w in layer.trainable_weights]
    assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights, [
        w.path for w in layer.non_trainable_weights]
    clone = layer_cls.from_config(config)
    clone(*call_args, **call_kwargs)
    clone.set_weights(layer.get_weights())
    _assert_outputs_close(clone(*call_args, **call_kwargs), outputs, 0.0, "from_config clone")
    floats = _float_outputs(outputs)
    expected = (float32_output_dtypes if isinstance(float32_output_dtypes, list)
                else [float32_output_dtypes] * len(floats))
    assert [x.dtype.name for x in floats] == expected
    assert all(np.all(np.isfinite(np.asarray(x))) for x in floats)

    # 4. Mixed precision, built as build_model builds it: under the global policy.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(MIXED_POLICY)
    try:
        mixed = layer_cls(**dict(init_kwargs,
                                 **(mixed_kwargs if mixed_kwargs is not None else {"dtype": MIXED_POLICY})))
        mixed_outputs = mixed(*call_args, **call_kwargs)
        mixed.set_weights(layer.get_weights())
        mixed_outputs = mixed(*call_args, **call_kwargs)
    finally:
        keras.config.set_dtype_policy(previous)
    assert all(w.dtype == "float32" for w in mixed.weights), "variables must stay float32 under mixed precision"
    floats = _float_outputs(mixed_outputs)
    expected = mixed_output_dtypes if isinstance(mixed_output_dtypes, list) else [mixed_output_dtypes] * len(floats)
    assert [x.dtype.name for x in floats] == expected
    _assert_outputs_close(mixed_outputs, outputs, mixed_atol, MIXED_POLICY)

    # 5. jit.
    if layer.supports_jit:
        compiled = tf.function(lambda *args: layer(*args, **call_kwargs), jit_compile=True)
        jit_outputs = compiled(*call_args)
        if jit_same_outputs:
            _assert_outputs_close(jit_outputs, outputs, jit_atol, "jit_compile")
        else:
            assert [(x.shape, x.dtype) for x in tf.nest.flatten(jit_outputs)] == [
                (x.shape, x.dtype) for x in tf.nest.flatten(outputs)]
    return outputs
