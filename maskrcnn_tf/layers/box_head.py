"""Box head (Fast R-CNN with FPN's 2-FC head): RoI features [B, S, P, P, C] -> class logits, box deltas.

Decisions (beyond docs/design.md):
- Flattening order is (y, x, channel) of the NHWC RoI features (detectron2 flattens NCHW; this matters
  only when porting its weights).
- Initialisation as detectron2: FCs c2_xavier_fill (kaiming_uniform a=1 = Keras' lecun_uniform), classifier
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

BOX_CODE_SIZE = 4  # [dy, dx, dh, dw]
CLASSIFIER_INIT_STD = 0.01  # detectron2 FastRCNNOutputLayers
BOX_REGRESSOR_INIT_STD = 0.001
XAVIER_FILL = "lecun_uniform"  # detectron2 c2_xavier_fill: U(+-sqrt(3 / fan_in))


_HEADS = config_lib.HeadConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class BoxHead(keras.layers.Layer):
    """num_fcs x (FC fc_dim + ReLU), then a K + 1 way classifier and a class-specific box regressor.

    Args (keyword-only):
      num_classes: K foreground classes.
      num_fcs: hidden fully connected layers.
      fc_dim: width of each hidden layer.

    Call: RoI features float [B, S, P, P, C] (P = 7 by default; S, P, C static, B may be dynamic) ->
    (class_logits float32 [B, S, K + 1] with column 0 = background,
     box_deltas float32 [B, S, (K + 1) * 4], column block c = [dy, dx, dh, dw] of class c).
    """

    def __init__(self, *, num_classes: int, num_fcs: int = _HEADS.num_fcs, fc_dim: int = _HEADS.fc_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.num_fcs = num_fcs
        self.fc_dim = fc_dim
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
        dim = height * width * channels
        for fc in self.fcs:
            fc.build((None, num_rois, dim))
            dim = self.fc_dim
        self.classifier.build((None, num_rois, dim))
        self.box_regressor.build((None, num_rois, dim))
        self.built = True

    def call(self, roi_features):
        _, num_rois, height, width, channels = roi_features.shape
        x = tf.reshape(roi_features, [-1, num_rois, height * width * channels])  # [B, S, P * P * C]
        for fc in self.fcs:
            x = fc(x)  # [B, S, fc_dim]
        class_logits = keras.ops.cast(self.classifier(x), "float32")  # [B, S, K + 1]
        box_deltas = keras.ops.cast(self.box_regressor(x), "float32")  # [B, S, (K + 1) * 4]
        return class_logits, box_deltas

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, num_fcs=self.num_fcs, fc_dim=self.fc_dim)
        return config
