"""Mask head (He et al. 2017, FPN variant): RoI features [B, S, 14, 14, C] -> [B, S, 28, 28] mask logits.

num_convs x (3x3 conv [+ norm] + ReLU; torchvision v2: BatchNorm, convs without bias), a 2x2 stride-2
transposed conv + ReLU, a 1x1 conv to K class-specific
mask channels, then each RoI keeps the channel of its class (class c -> channel c - 1; no background
channel). The RoI axis is folded into the batch for the convolutions ([B * S, 14, 14, C]).

Decisions (beyond docs/design.md):
- Initialisation as detectron2's MaskRCNNConvUpsampleHead: convs and the deconv c2_msra_fill
  (He normal, fan_out; Keras' fan_out of a Conv2DTranspose kernel [kh, kw, out, in] is kh * kw * in,
  the same number PyTorch computes for its [in, out, kh, kw] weight), the predictor normal(std 0.001),
  all biases 0. Norms (layers/norm.py) are `conv{i}_norm`, after `conv{i}`.
- Class selection is a batched tf.gather over the channel axis (batch_dims=2): no one-hot multiply.
  Classes <= 0 (background or padding) select channel 0; the loss ignores those RoIs.
- Mixed precision: convs run in the compute dtype; the selected logits are float32 for the loss.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.layers import norm as norm_lib
from maskrcnn_tf.layers.initializers import msra_fill

UPSAMPLE_FACTOR = 2  # the deconv doubles 14x14 to 28x28
PREDICTOR_INIT_STD = 0.001  # detectron2 MaskRCNNConvUpsampleHead
CHANNEL_AXIS = 4  # of the [B, S, M, M, K] mask logits


_HEADS = config_lib.HeadConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class MaskHead(keras.layers.Layer):
    """Fully convolutional, class-specific mask predictor.

    Args (keyword-only):
      num_classes: K foreground classes (mask channels).
      num_convs: 3x3 conv layers before the upsampling.
      num_filters: channels of the convs and the deconv.
      norm: config.NORMS, after each of the num_convs convs ("none": convs with bias).

    Call: (features float [B, S, M, M, C] (M = 14 by default; M, C static, B and S may be dynamic),
    classes int32 [B, S] in 1..K (0 or -1 allowed: channel of class 1, meaningless), optional roi_valid
    bool [B, S]: the RoIs whose features enter BatchNorm's batch statistics in training (default all)) ->
    mask logits float32 [B, S, 2M, 2M] for each RoI's class.
    """

    def __init__(self, *, num_classes: int, num_convs: int = _HEADS.mask_num_convs,
                 num_filters: int = _HEADS.mask_num_filters, norm: str = _HEADS.mask_norm, **kwargs):
        super().__init__(**kwargs)
        norm_lib.check(norm, "MaskHead")
        self.num_classes = num_classes
        self.num_convs = num_convs
        self.num_filters = num_filters
        self.norm = norm
        with_norm = norm != norm_lib.NONE
        self.convs = [
            keras.layers.Conv2D(num_filters, 3, padding="same", activation=None if with_norm else "relu",
                                use_bias=not with_norm, kernel_initializer=msra_fill(), name=f"conv{i + 1}",
                                dtype=self.dtype_policy)
            for i in range(num_convs)
        ]
        # Empty without a norm: the variables (and checkpoints) of norm="none" are today's.
        self.conv_norms = [norm_lib.make(norm, num_filters, f"conv{i + 1}_norm", self.dtype_policy)
                           for i in range(num_convs)] if with_norm else []
        self.deconv = keras.layers.Conv2DTranspose(
            num_filters, UPSAMPLE_FACTOR, strides=UPSAMPLE_FACTOR, activation="relu", kernel_initializer=msra_fill(),
            name="deconv", dtype=self.dtype_policy)
        self.predictor = keras.layers.Conv2D(
            num_classes, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=PREDICTOR_INIT_STD),
            name="predictor", dtype=self.dtype_policy)

    def build(self, features_shape, classes_shape=None):
        channels = features_shape[-1]
        for i, conv in enumerate(self.convs):
            conv.build((None, None, None, channels))
            channels = self.num_filters
            if self.conv_norms:
                self.conv_norms[i].build((None, None, None, channels))
        self.deconv.build((None, None, None, channels))
        self.predictor.build((None, None, None, self.num_filters))
        self.built = True

    def call(self, features, classes, training=None, roi_valid=None):
        _, _, height, width, channels = features.shape  # M, M, C static; B, S may be dynamic
        batch, num_rois = tf.shape(features)[0], tf.shape(features)[1]
        x = tf.reshape(features, [-1, height, width, channels])  # [B * S, M, M, C]
        norm_kwargs = {}
        if roi_valid is not None and self.norm in norm_lib.BATCH_NORMS:
            # BatchNorm statistics over the RoIs that count only, not the padding rows of the [B, S] batch
            # (torchvision's mask head sees the foreground RoIs of all images and nothing else).
            rows = tf.reshape(tf.cast(roi_valid, tf.bool), [-1, 1, 1])  # [B * S, 1, 1]
            norm_kwargs["mask"] = tf.broadcast_to(rows, [tf.shape(x)[0], height, width])  # [B * S, M, M]
        for i, conv in enumerate(self.convs):
            x = conv(x)  # [B * S, M, M, num_filters]
            if self.conv_norms:
                x = keras.ops.relu(self.conv_norms[i](x, training=training, **norm_kwargs))
        x = self.deconv(x)  # [B * S, 2M, 2M, num_filters]
        x = self.predictor(x)  # [B * S, 2M, 2M, K]
        mask_size = UPSAMPLE_FACTOR * height
        x = tf.reshape(x, [batch, num_rois, mask_size, mask_size, self.num_classes])  # [B, S, 2M, 2M, K]
        channel = tf.clip_by_value(tf.cast(classes, tf.int32) - 1, 0, self.num_classes - 1)  # [B, S]
        x = tf.gather(x, channel, axis=CHANNEL_AXIS, batch_dims=2)  # [B, S, 2M, 2M]
        return keras.ops.cast(x, "float32")

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, num_convs=self.num_convs, num_filters=self.num_filters,
                      norm=self.norm)
        return config
