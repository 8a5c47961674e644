"""Feature Pyramid Network (Lin et al. 2017): {"C2".."C5"} -> {"P2".."P6"}, num_filters channels each.

P_l = conv3x3(lateral_l), lateral_l = conv1x1(C_l) + nearest_upsample_2x(lateral_{l+1}) for l < 5
(with `norm`, each conv is conv without bias + norm: torchvision v2's FPN, layers/norm.py);
levels above 5 are stride-2 subsamplings of the level below (detectron2's LastLevelMaxPool: a 1x1
max-pool with stride 2 of P5 is P5[:, ::2, ::2]), so P6 costs nothing and only feeds the RPN.

Decisions (beyond docs/design.md):
- Initialisation as detectron2's c2_xavier_fill (kaiming_uniform with a=1 = Keras' lecun_uniform),
  biases 0. Norm layers are `lateral_P{l}_norm` / `output_P{l}_norm` next to their convs.
- Input C_l must be exactly twice the size of C_{l+1} (image size divisible by 2**5; config requires
  divisibility by 64), so the upsampled top-down map needs no cropping.
- The 3x3 output convs are BandedConv2D: Conv2D whose kernel gradient is computed in row bands in
  training (no whole-image im2col buffer on P2; layers/banded_conv.py).
- Mixed precision: outputs stay in the compute dtype (they are features, not logits); RoIAlign and the
  heads consume them in that dtype.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.layers import norm as norm_lib
from maskrcnn_tf.layers.banded_conv import BandedConv2D

# The backbone's deepest level: FPN levels above it are subsampled, not computed from C levels.
BACKBONE_MAX_LEVEL = 5
UPSAMPLE_FACTOR = 2
EXTRA_LEVEL_STRIDE = 2
# detectron2 c2_xavier_fill: kaiming_uniform_(a=1) = U(+-sqrt(3 / fan_in)).
XAVIER_FILL = "lecun_uniform"


def _upsample_nearest_2x(x):
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated (nearest neighbour)."""
    x = tf.repeat(x, UPSAMPLE_FACTOR, axis=1)  # [B, 2H, W, C]
    return tf.repeat(x, UPSAMPLE_FACTOR, axis=2)  # [B, 2H, 2W, C]


_MODEL = config_lib.ModelConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class FPN(keras.layers.Layer):
    """Feature pyramid with top-down nearest upsampling and lateral 1x1 convs.

    Args (keyword-only):
      num_filters: channels of every P level.
      min_level: lowest output level (uses C_min_level .. C5).
      max_level: highest output level (>= 5; levels > 5 are stride-2 subsamplings of the level below).
      norm: config.NORMS; after every lateral and output conv ("none": convs with bias).

    Call: dict {"C2": [B, H/4, W/4, C_2], ..., "C5": [B, H/32, W/32, C_5]} (extra keys are ignored) ->
    dict {"P{l}": [B, ceil(H / 2**l), ceil(W / 2**l), num_filters]} for l = min_level..max_level, in
    the compute dtype.
    """

    def __init__(self, *, num_filters: int = _MODEL.fpn_num_filters, min_level: int = config_lib.MIN_LEVEL,
                 max_level: int = config_lib.MAX_LEVEL, norm: str = _MODEL.fpn_norm, **kwargs):
        super().__init__(**kwargs)
        norm_lib.check(norm, "FPN")
        if not min_level <= BACKBONE_MAX_LEVEL <= max_level:
            raise ValueError(f"FPN: need min_level <= {BACKBONE_MAX_LEVEL} <= max_level, got "
                             f"min_level={min_level}, max_level={max_level}")
        self.num_filters = num_filters
        self.min_level = min_level
        self.max_level = max_level
        self.norm = norm
        self.backbone_levels = tuple(range(min_level, BACKBONE_MAX_LEVEL + 1))
        conv_kwargs = dict(padding="same", kernel_initializer=XAVIER_FILL, bias_initializer="zeros",
                           use_bias=norm_lib.uses_bias(norm), dtype=self.dtype_policy)
        # Lists (ordered like backbone_levels), not dicts: Keras tracks and saves lists of layers plainly.
        self.lateral_convs = [
            keras.layers.Conv2D(num_filters, 1, name=f"lateral_P{level}", **conv_kwargs)
            for level in self.backbone_levels
        ]
        self.output_convs = [
            BandedConv2D(num_filters, 3, name=f"output_P{level}", **conv_kwargs)
            for level in self.backbone_levels
        ]
        # Empty lists without a norm: the variables (and checkpoints) of norm="none" are today's.
        self.lateral_norms = [norm_lib.make(norm, num_filters, f"lateral_P{level}_norm", self.dtype_policy)
                              for level in self.backbone_levels] if norm != norm_lib.NONE else []
        self.output_norms = [norm_lib.make(norm, num_filters, f"output_P{level}_norm", self.dtype_policy)
                             for level in self.backbone_levels] if norm != norm_lib.NONE else []

    def build(self, input_shape):
        for level, lateral_conv, output_conv in zip(self.backbone_levels, self.lateral_convs, self.output_convs):
            lateral_conv.build((None, None, None, input_shape[f"C{level}"][-1]))
            output_conv.build((None, None, None, self.num_filters))
        for norm_layer in self.lateral_norms + self.output_norms:
            norm_layer.build((None, None, None, self.num_filters))
        self.built = True

    def call(self, features, training=None):
        outputs = {}
        top_down = None
        for i in reversed(range(len(self.backbone_levels))):
            level = self.backbone_levels[i]
            lateral = self.lateral_convs[i](features[f"C{level}"])
            if self.lateral_norms:
                lateral = self.lateral_norms[i](lateral, training=training)
            if top_down is not None:
                lateral = lateral + _upsample_nearest_2x(top_down)
            top_down = lateral
            output = self.output_convs[i](lateral, training=training)
            if self.output_norms:
                output = self.output_norms[i](output, training=training)
            outputs[f"P{level}"] = output
        for level in range(BACKBONE_MAX_LEVEL + 1, self.max_level + 1):
            below = outputs[f"P{level - 1}"]  # [B, h, w, F]
            stride = EXTRA_LEVEL_STRIDE
            outputs[f"P{level}"] = below[:, ::stride, ::stride, :]  # [B, ceil(h / 2), ceil(w / 2), F]
        return {f"P{level}": outputs[f"P{level}"] for level in range(self.min_level, self.max_level + 1)}

    def get_config(self):
        config = super().get_config()
        config.update(num_filters=self.num_filters, min_level=self.min_level, max_level=self.max_level,
                      norm=self.norm)
        return config
