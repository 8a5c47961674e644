"""BandedConv2D: keras.layers.Conv2D whose gradients need no whole-image im2col buffer in training.

The FPN output convs and the RPN head conv are 3x3, stride 1, SAME convs on P2 (256 x 256 at 1024 px),
whose TensorFlow gradients each need a 576 MB im2col buffer per image; ops/conv.py computes the
kernel gradient in bands of rows and the input gradient as a forward conv (why and measurements
there). The layer is a Conv2D in every other respect: same variables, paths, checkpoints and config,
and the plain Conv2D call whenever `training` is falsy
(inference, export: no custom gradient in the graph) or the configuration is not stride 1, SAME,
undilated, ungrouped, channels_last, with a ReLU or no activation (a conv without bias, as before a
norm layer, runs with a zero bias whose gradient is dropped).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from maskrcnn_tf.ops import conv as conv_ops


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class BandedConv2D(keras.layers.Conv2D):
    """Conv2D (same arguments) with ops/conv.py's gradients when called with training=True and
    `banded_gradients` (True by default; build_model sets train.banded_conv_gradients, resolved by
    device_defaults.py: off on GPU/TPU, where one cuDNN/XLA convolution gradient is faster)."""

    banded_gradients = True

    def _bandable(self) -> bool:
        return (tuple(self.strides) == (1, 1) and self.padding == "same" and tuple(self.dilation_rate) == (1, 1)
                and self.groups == 1 and self.data_format == "channels_last"
                and self.activation in (keras.activations.relu, keras.activations.linear)
                and all(k % 2 == 1 for k in self.kernel_size))

    def call(self, inputs, training=None):
        if not training or not self.banded_gradients or not self._bandable():
            return super().call(inputs)
        dtype = inputs.dtype
        bias = tf.cast(self.bias, dtype) if self.use_bias else tf.zeros([self.filters], dtype)
        return conv_ops.conv2d_bias_act(inputs, tf.cast(self.kernel, dtype), bias,
                                        relu=self.activation is keras.activations.relu)
