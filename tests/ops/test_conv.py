"""ops/conv.py: conv + bias (+ ReLU) with banded kernel gradient and forward-conv input gradient.

Oracle: the convolution and its three gradients written from the definition in float64 NumPy
(zero-padded SAME correlation, as tf.nn.conv2d). The band budget is lowered so that small maps are
banded; the band count itself is checked for the R50 levels it is meant for.
"""

import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.ops import conv as conv_ops


def _reference(x, kernel, bias, upstream, relu):
    """float64 forward y and gradients (dx, dkernel, dbias) of sum(y * upstream)."""
    b, h, w, _ = x.shape
    kh, kw, _, c_out = kernel.shape
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    y = np.zeros((b, h, w, c_out)) + bias
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w], kernel[i, j])
    dy = upstream * (y > 0) if relu else upstream
    if relu:
        y = np.maximum(y, 0)
    dxp = np.zeros_like(xp)
    dkernel = np.zeros_like(kernel)
    for i in range(kh):
        for j in range(kw):
            dkernel[i, j] = np.einsum("bhwc,bhwo->co", xp[:, i:i + h, j:j + w], dy)
            dxp[:, i:i + h, j:j + w] += np.einsum("bhwo,co->bhwc", dy, kernel[i, j])
    return y, dxp[:, ph:ph + h, pw:pw + w], dkernel, dy.sum(axis=(0, 1, 2))


@pytest.mark.parametrize("kernel_size,num_bands,relu", [
    (3, 1, True),  # unbanded: TensorFlow's own gradients
    (3, 3, True),  # uneven bands (13 rows -> 4, 5, 4)
    (3, 13, False),  # one row per band: every band touches the zero border or the halo
    (5, 4, True),  # a 2-row halo
])
def test_gradients_equal_the_float64_definition(monkeypatch, kernel_size, num_bands, relu):
    rng = np.random.default_rng(kernel_size * 100 + num_bands)
    x = rng.normal(size=(2, 13, 11, 3))
    kernel = rng.normal(size=(kernel_size, kernel_size, 3, 4)) * 0.3
    bias = rng.normal(size=4) * 0.1
    upstream = rng.normal(size=(2, 13, 11, 4))
    im2col_bytes = 13 * 11 * kernel_size**2 * 3 * 4  # per image, float32
    # Budget so that ceil(im2col / budget) == num_bands.
    monkeypatch.setattr(conv_ops, "BAND_IM2COL_BYTES", -(-im2col_bytes // num_bands))
    assert conv_ops.num_kernel_gradient_bands(x.shape, kernel.shape, 4) == num_bands

    tensors = [tf.constant(v, tf.float32) for v in (x, kernel, bias)]

    @tf.function
    def run(x, kernel, bias):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, bias])
            y = conv_ops.conv2d_bias_act(x, kernel, bias, relu=relu)
            loss = tf.reduce_sum(y * tf.constant(upstream, tf.float32))
        return (y,) + tuple(tape.gradient(loss, [x, kernel, bias]))

    got = run(*tensors)
    expected = _reference(x, kernel, bias, upstream, relu)
    for name, a, b in zip(("y", "dx", "dkernel", "dbias"), got, expected):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)


def test_band_counts_for_the_r50_pyramid_at_1024():
    # Per-image im2col of a 3x3 conv with 256 input channels, float32: 576 MB on P2 (256 x 256), 144 MB on
    # P3, 36 MB on P4; the 36 MiB budget gives 16, 4 and 1 bands. float16 halves the bytes.
    kernel = (3, 3, 256, 256)
    assert conv_ops.num_kernel_gradient_bands((2, 256, 256, 256), kernel, 4) == 16
    assert conv_ops.num_kernel_gradient_bands((2, 128, 128, 256), kernel, 4) == 4
    assert conv_ops.num_kernel_gradient_bands((2, 64, 64, 256), kernel, 4) == 1
    assert conv_ops.num_kernel_gradient_bands((2, 256, 256, 256), kernel, 2) == 8


@pytest.mark.parametrize("height,custom", [(5, True), (None, False)])
def test_only_static_maps_take_the_custom_gradient(monkeypatch, height, custom):
    # tf.custom_gradient marks its outputs with an IdentityN op; a map whose height is unknown at trace
    # time cannot be split into bands and must run the plain ops.
    monkeypatch.setattr(conv_ops, "BAND_IM2COL_BYTES", 1)

    @tf.function(input_signature=[tf.TensorSpec([1, height, 8, 2], tf.float32)])
    def run(x):
        return conv_ops.conv2d_bias_act(x, tf.ones([3, 3, 2, 2]), tf.zeros([2]), relu=False)

    graph = run.get_concrete_function().graph
    assert any(op.type == "IdentityN" for op in graph.get_operations()) == custom
    np.testing.assert_allclose(run(tf.ones([1, 5, 8, 2])).numpy()[0, 2, 3], [18.0, 18.0])  # 3x3x2 ones
