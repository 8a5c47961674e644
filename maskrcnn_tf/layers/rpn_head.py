"""RPN head (Ren et al. 2015), shared over FPN levels: {"P2".."P6"} -> (objectness, deltas) per level.

num_convs 3x3 conv + ReLU layers (1: the FPN paper, detectron2, torchvision v1; 2: torchvision v2's
RPNHead(conv_depth=2); all with bias, no norm), then two sibling 1x1 convs: A objectness logits
(sigmoid, one per anchor; not the 2-way softmax of the paper, as detectron2) and A * 4 box deltas
[dy, dx, dh, dw] per location.

Decisions (beyond docs/design.md):
- Initialisation as detectron2's StandardRPNHead: normal(std 0.01) kernels, zero biases, all convs.
- Names: the first 3x3 conv is `conv` (as before there was a second), further ones `conv2`, `conv3`, ...
- Channel layout: objectness channel a and delta channels 4a..4a+3 belong to aspect ratio a, so
  reshape [B, H_l, W_l, A] -> [B, H_l * W_l * A] and [B, H_l, W_l, A * 4] -> [B, H_l * W_l * A, 4] give
  anchors in the (y, x, ratio) order of ops.anchors.multilevel_anchors.
- The shared 3x3 convs are BandedConv2D (its kernel gradient on P2 is computed in row bands in
  training; layers/banded_conv.py).
- Mixed precision: convs run in the compute dtype; both outputs are cast to float32 so that box decoding
  and the losses are float32.
"""

from __future__ import annotations

import keras

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.layers.banded_conv import BandedConv2D

BOX_CODE_SIZE = 4  # [dy, dx, dh, dw]
RPN_INIT_STD = 0.01  # detectron2 StandardRPNHead


_MODEL = config_lib.ModelConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class RPNHead(keras.layers.Layer):
    """Region proposal head applied with the same weights to every level.

    Args (keyword-only):
      num_anchors_per_location: A, anchors per feature-map location (number of aspect ratios).
      num_filters: channels of the shared 3x3 convs (= FPN channels in detectron2).
      num_convs: 3x3 conv + ReLU layers before the predictors.

    Call: dict {"P2": [B, H_2, W_2, C], ...} (all levels with the same C) -> (scores, deltas) with
    scores {"P2": float32 [B, H_2, W_2, A] objectness logits, ...} and deltas
    {"P2": float32 [B, H_2, W_2, A * 4] [dy, dx, dh, dw] per anchor, ...}, same keys as the input.
    """

    def __init__(self, *, num_anchors_per_location: int = len(_MODEL.anchors.aspect_ratios),
                 num_filters: int = _MODEL.rpn_num_filters, num_convs: int = _MODEL.rpn_num_convs, **kwargs):
        super().__init__(**kwargs)
        if num_convs < 1:
            raise ValueError(f"RPNHead: num_convs={num_convs}; expected >= 1")
        self.num_anchors_per_location = num_anchors_per_location
        self.num_filters = num_filters
        self.num_convs = num_convs
        conv_kwargs = dict(padding="same", kernel_initializer=keras.initializers.RandomNormal(stddev=RPN_INIT_STD),
                           bias_initializer="zeros", dtype=self.dtype_policy)
        self.conv = BandedConv2D(num_filters, 3, activation="relu", name="conv", **conv_kwargs)
        # Empty for one conv: the variables (and checkpoints) of num_convs=1 are today's.
        self.more_convs = [BandedConv2D(num_filters, 3, activation="relu", name=f"conv{i + 1}", **conv_kwargs)
                           for i in range(1, num_convs)]
        self.objectness = keras.layers.Conv2D(num_anchors_per_location, 1, name="objectness", **conv_kwargs)
        self.box_deltas = keras.layers.Conv2D(num_anchors_per_location * BOX_CODE_SIZE, 1, name="box_deltas",
                                              **conv_kwargs)

    def build(self, input_shape):
        channels = {shape[-1] for shape in input_shape.values()}
        if len(channels) != 1:
            raise ValueError(f"RPNHead: all levels need the same channels (shared weights), got {input_shape}")
        self.conv.build((None, None, None, channels.pop()))
        for conv in self.more_convs:
            conv.build((None, None, None, self.num_filters))
        self.objectness.build((None, None, None, self.num_filters))
        self.box_deltas.build((None, None, None, self.num_filters))
        self.built = True

    def call(self, features, training=None):
        scores, deltas = {}, {}
        # The two sibling 1x1 convs run as one conv over their concatenated kernels: one pass over the
        # hidden map forward and one input gradient backward instead of two (at P2 of a 1024 px image each
        # input gradient is a 128 MB tensor plus a 64 MB buffer).
        num_scores = self.num_anchors_per_location
        compute_dtype = self.conv.compute_dtype
        kernel = keras.ops.cast(keras.ops.concatenate([self.objectness.kernel, self.box_deltas.kernel], axis=-1),
                                compute_dtype)  # [1, 1, F, A * 5]
        bias = keras.ops.cast(keras.ops.concatenate([self.objectness.bias, self.box_deltas.bias], axis=-1),
                              compute_dtype)  # [A * 5]
        for key, feature in features.items():
            hidden = self.conv(feature, training=training)  # [B, H, W, F] in compute_dtype
            for conv in self.more_convs:
                hidden = conv(hidden, training=training)
            outputs = keras.ops.cast(keras.ops.conv(hidden, kernel) + bias, "float32")  # [B, H, W, A * 5]
            scores[key], deltas[key] = outputs[..., :num_scores], outputs[..., num_scores:]
        return scores, deltas

    def get_config(self):
        config = super().get_config()
        config.update(num_anchors_per_location=self.num_anchors_per_location, num_filters=self.num_filters,
                      num_convs=self.num_convs)
        return config
