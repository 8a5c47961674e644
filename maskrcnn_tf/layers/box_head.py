"""Box head (Fast R-CNN with FPN's 2-FC head): RoI features [B, S, P, P, C] -> class logits, box deltas.

Optionally num_convs x (3x3 conv conv_dim + norm + ReLU) before the FCs (detectron2's FastRCNNConvFCHead,
torchvision v2's FastRCNNConvFCHead: 4 convs 256 with BatchNorm, then 1 FC 1024), on the RoI axis folded
into the batch ([B * S, P, P, C]).

Decisions (beyond docs/design.md):
- Flattening order is (y, x, channel) of the NHWC RoI features (or of the last conv's output);
  detectron2 and torchvision flatten NCHW, so their first FC's weight is permuted when ported
  (weights/layout.py dense_kernel_after_nchw_flatten).
- Names: convs `conv1`.., their norms `conv1_norm`.. (layers/norm.py; a conv with a norm has no bias),
  FCs `fc1`.., `classifier`, `box_regressor`.
- Initialisation as detectron2: convs c2_msra_fill (He normal, fan_out, as torchvision's kaiming_normal_),
  FCs c2_xavier_fill (kaiming_uniform a=1 = Keras' lecun_uniform), classifier
  normal(std 0.01), box regressor normal(std 0.001), all biases 0.
- Box deltas are class-specific: columns 4c..4c+3 are [dy, dx, dh, dw] for class c, including a (never
  used) block for the background class 0, so column blocks and class ids coincide.
- Mixed precision: the FCs run in the compute dtype; logits and deltas are cast to float32 so that box
  decoding and the losses are float32.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.layers import norm as norm_lib
from maskrcnn_tf.layers.initializers import msra_fill

BOX_CODE_SIZE = 4  # [dy, dx, dh, dw]
CLASSIFIER_INIT_STD = 0.01  # detectron2 FastRCNNOutputLayers
BOX_REGRESSOR_INIT_STD = 0.001
XAVIER_FILL = "lecun_uniform"  # detectron2 c2_xavier_fill: U(+-sqrt(3 / fan_in))
CONV_KERNEL_SIZE = 3


_HEADS = config_lib.HeadConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class BoxHead(keras.layers.Layer):
    """num_convs x (3x3 conv + norm + ReLU), num_fcs x (FC fc_dim + ReLU), then a K + 1 way classifier and
    a class-specific box regressor.

    Args (keyword-only):
      num_classes: K foreground classes.
      num_fcs: hidden fully connected layers.
      fc_dim: width of each hidden layer.
      num_convs: 3x3 convs before the FCs (0: none).
      conv_dim: channels of each conv.
      norm: config.NORMS, after each conv ("none": convs with bias).

    Call: RoI features float [B, S, P, P, C] (P = 7 by default; S, P, C static, B may be dynamic) ->
    (class_logits float32 [B, S, K + 1] with column 0 = background,
     box_deltas float32 [B, S, (K + 1) * 4], column block c = [dy, dx, dh, dw] of class c).
    """

    def __init__(self, *, num_classes: int, num_fcs: int = _HEADS.num_fcs, fc_dim: int = _HEADS.fc_dim,
                 num_convs: int = _HEADS.box_num_convs, conv_dim: int = _HEADS.box_conv_dim,
                 norm: str = _HEADS.box_norm, **kwargs):
        super().__init__(**kwargs)
        norm_lib.check(norm, "BoxHead")
        self.num_classes = num_classes
        self.num_fcs = num_fcs
        self.fc_dim = fc_dim
        self.num_convs = num_convs
        self.conv_dim = conv_dim
        self.norm = norm
        # Empty lists without convs / norms: the variables (and checkpoints) of the 2-FC head are today's.
        self.convs = [
            keras.layers.Conv2D(conv_dim, CONV_KERNEL_SIZE, padding="same", use_bias=norm_lib.uses_bias(norm),
                                kernel_initializer=msra_fill(), name=f"conv{i + 1}", dtype=self.dtype_policy)
            for i in range(num_convs)
        ]
        self.conv_norms = [norm_lib.make(norm, conv_dim, f"conv{i + 1}_norm", self.dtype_policy)
                           for i in range(num_convs)] if norm != norm_lib.NONE else []
        self.fcs = [
            keras.layers.Dense(fc_dim, activation="relu", kernel_initializer=XAVIER_FILL, name=f"fc{i + 1}",
                               dtype=self.dtype_policy)
            for i in range(num_fcs)
        ]
        num_logits = num_classes + 1  # background + K
        self.classifier = keras.layers.Dense(
            num_logits, kernel_initializer=keras.initializers.RandomNormal(stddev=CLASSIFIER_INIT_STD),
            name="classifier", dtype=self.dtype_policy)
        self.box_regressor = keras.layers.Dense(
            num_logits * BOX_CODE_SIZE,
            kernel_initializer=keras.initializers.RandomNormal(stddev=BOX_REGRESSOR_INIT_STD),
            name="box_regressor", dtype=self.dtype_policy)

    def build(self, input_shape):
        _, num_rois, height, width, channels = input_shape
        for i, conv in enumerate(self.convs):
            conv.build((None, height, width, channels))
            channels = self.conv_dim
            if self.conv_norms:
                self.conv_norms[i].build((None, height, width, channels))
        dim = height * width * channels
        for fc in self.fcs:
            fc.build((None, num_rois, dim))
            dim = self.fc_dim
        self.classifier.build((None, num_rois, dim))
        self.box_regressor.build((None, num_rois, dim))
        self.built = True

    def call(self, roi_features, training=None):
        _, num_rois, height, width, channels = roi_features.shape
        x = roi_features
        if self.convs:
            x = tf.reshape(x, [-1, height, width, channels])  # [B * S, P, P, C]
            for i, conv in enumerate(self.convs):
                x = conv(x)  # [B * S, P, P, conv_dim]
                if self.conv_norms:
                    x = self.conv_norms[i](x, training=training)
                x = keras.ops.relu(x)
            channels = self.conv_dim
        x = tf.reshape(x, [-1, num_rois, height * width * channels])  # [B, S, P * P * C]
        for fc in self.fcs:
            x = fc(x)  # [B, S, fc_dim]
        class_logits = keras.ops.cast(self.classifier(x), "float32")  # [B, S, K + 1]
        box_deltas = keras.ops.cast(self.box_regressor(x), "float32")  # [B, S, (K + 1) * 4]
        return class_logits, box_deltas

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, num_fcs=self.num_fcs, fc_dim=self.fc_dim,
                      num_convs=self.num_convs, conv_dim=self.conv_dim, norm=self.norm)
        return config
