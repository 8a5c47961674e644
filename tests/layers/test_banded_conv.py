"""layers/banded_conv.py: a keras Conv2D whose training gradients come from ops/conv.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.layers.banded_conv import BandedConv2D
from maskrcnn_tf.ops import conv as conv_ops


@pytest.mark.parametrize("activation", ["relu", None])
def test_same_outputs_and_gradients_as_conv2d(monkeypatch, activation):
    monkeypatch.setattr(conv_ops, "BAND_IM2COL_BYTES", 1000)  # 12 x 10 x 9 x 4 x 4 B -> 18 bands (<= H=12)
    kwargs = dict(filters=5, kernel_size=3, padding="same", activation=activation, bias_initializer="glorot_uniform")
    banded, plain = BandedConv2D(**kwargs), keras.layers.Conv2D(**kwargs)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 12, 10, 4)), tf.float32)
    banded.build(x.shape)
    plain.build(x.shape)
    plain.set_weights(banded.get_weights())

    def run(layer):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.sin(y))
            return y, tape.gradient(loss, [x] + layer.trainable_weights)
        graph = step.get_concrete_function(x).graph
        return step(x), any(op.type == "IdentityN" for op in graph.get_operations())

    (y_banded, g_banded), custom = run(banded)
    (y_plain, g_plain), plain_custom = run(plain)
    assert custom and not plain_custom  # the banded path really ran
    np.testing.assert_allclose(y_banded.numpy(), y_plain.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(g_banded, g_plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    # Inference: the plain Conv2D call, no custom gradient in the graph (what export saves).
    graph = tf.function(lambda x: banded(x, training=False)).get_concrete_function(x).graph
    assert not any(op.type == "IdentityN" for op in graph.get_operations())
    np.testing.assert_allclose(banded(x).numpy(), y_plain.numpy(), rtol=1e-5, atol=1e-5)


def test_strided_conv_uses_the_plain_call(monkeypatch):
    monkeypatch.setattr(conv_ops, "BAND_IM2COL_BYTES", 1)
    layer = BandedConv2D(3, 3, strides=2, padding="same")
    x = tf.ones([1, 8, 8, 2])
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(x).graph
    assert not any(op.type == "IdentityN" for op in graph.get_operations())
    assert layer(x, training=True).shape == (1, 4, 4, 3)
