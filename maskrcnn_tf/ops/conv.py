"""Convolution + bias (+ ReLU), stride 1, SAME, whose gradients need no whole-image im2col buffer.

Why: TensorFlow's CPU conv gradients (Conv2DBackpropFilter and Conv2DBackpropInput) each build an
im2col matrix of a whole image, [H * W, kh * kw * C] floats. For the 3x3 FPN and RPN convs on P2 of a
1024x1024 image (256 x 256 x 256) that is 576 MB in one allocation, and it was the top of the R50
training step's memory profile, first for the kernel gradient and, once that was banded, for the
input gradient (figures: benchmarks/README.md, "Figures behind choices in the code").

Input gradient: for stride 1 and SAME padding with odd kh, kw, d loss / d x is the forward
convolution of dy with the spatially flipped kernel, input and output channels swapped. TF's forward
conv packs its operands blockwise (no im2col): its extra peak is about the output, for a little more
CPU time.

Kernel gradient: a sum over output pixels, so it is computed band by band: output rows
[r0, r1) need input rows [r0 - kh // 2, r1 + kh // 2), whose zero padding at the image border becomes
EXPLICIT padding of the band. Bands are chained with control dependencies so that only one band's
im2col buffer exists at a time. Memory falls with the band count while time grows slowly until bands
get thin; hence a band budget of BAND_IM2COL_BYTES per image (P2: 16 bands, P3: 4, smaller maps:
none). The measured trade-off, also with oneDNN (whose kernel gradient still builds an im2col buffer
per band), is in benchmarks/README.md.

The forward pass is TensorFlow's own; the bias gradient is a sum. Gradients equal TensorFlow's to
float32 summation order (tests).
"""

from __future__ import annotations

import math

import tensorflow as tf

# Largest im2col buffer (per image) one band of a kernel gradient may need; see the module docstring.
BAND_IM2COL_BYTES = 36 * 2**20


def _row_bands(height: int, num_bands: int):
    """[(r0, r1)] splitting range(height) into num_bands nearly equal consecutive bands."""
    edges = [round(i * height / num_bands) for i in range(num_bands + 1)]
    return list(zip(edges[:-1], edges[1:]))


def num_kernel_gradient_bands(input_shape, kernel_shape, itemsize: int) -> int:
    """Bands the kernel gradient of a stride-1 SAME conv of `input_shape` [B, H, W, C_in] (static H, W)
    with `itemsize`-byte elements is split into: ceil(per-image im2col bytes / BAND_IM2COL_BYTES), at
    most H."""
    _, height, width, channels = input_shape
    kh, kw = kernel_shape[:2]
    im2col_bytes = height * width * kh * kw * channels * itemsize
    return max(1, min(height, math.ceil(im2col_bytes / BAND_IM2COL_BYTES)))


def _banded_kernel_gradient(x, dy, kernel_shape, num_bands: int):
    """d loss / d kernel of a stride-1 SAME conv: x [B, H, W, C_in], dy [B, H, W, C_out] -> kernel_shape."""
    kh, kw = kernel_shape[:2]
    pad_h, pad_w = kh // 2, kw // 2
    height = x.shape[1]
    total = None
    for r0, r1 in _row_bands(height, num_bands):
        top, bottom = max(r0 - pad_h, 0), min(r1 + pad_h, height)
        # Sequential bands: each waits for the running sum, so one band's im2col buffer lives at a time.
        with tf.control_dependencies([] if total is None else [total]):
            band = tf.raw_ops.Conv2DBackpropFilter(
                input=x[:, top:bottom], filter_sizes=kernel_shape, out_backprop=dy[:, r0:r1],
                strides=[1, 1, 1, 1], padding="EXPLICIT",
                explicit_paddings=[0, 0, pad_h - (r0 - top), pad_h - (bottom - r1), pad_w, pad_w, 0, 0])
        total = band if total is None else total + band
    return total


def conv2d_bias_act(x, kernel, bias, relu: bool):
    """act(conv2d(x, kernel, stride 1, SAME) + bias), act = ReLU or identity.

    x: [B, H, W, C_in] (NHWC); kernel [kh, kw, C_in, C_out] with odd kh, kw; bias [C_out]; all one dtype.
    Returns [B, H, W, C_out]. With static H and W and a per-image im2col above BAND_IM2COL_BYTES the
    gradients are the module docstring's; otherwise this is the plain op sequence.
    """
    def forward(x, kernel, bias):
        y = tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias)
        return tf.nn.relu(y) if relu else y

    shape = x.shape
    if shape.rank != 4 or shape[1] is None or shape[2] is None or shape[3] is None:
        return forward(x, kernel, bias)
    num_bands = num_kernel_gradient_bands(shape, kernel.shape, x.dtype.size)
    if num_bands == 1:
        return forward(x, kernel, bias)

    @tf.custom_gradient
    def banded(x, kernel, bias):
        y = forward(x, kernel, bias)

        def gradient(dy):
            if relu:
                dy = tf.raw_ops.ReluGrad(gradients=dy, features=y)  # y > 0 exactly where the input was
            flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])  # [kh, kw, C_out, C_in]
            dx = tf.nn.conv2d(dy, flipped, 1, "SAME")
            dkernel = _banded_kernel_gradient(x, dy, kernel.shape.as_list(), num_bands)
            return dx, dkernel, tf.reduce_sum(dy, axis=[0, 1, 2])

        return y, gradient

    return banded(x, kernel, bias)
