"""Backbone: images [B, H, W, 3] -> {"C2": stride 4, "C3": 8, "C4": 16, "C5": 32}.

Decisions (beyond docs/design.md):

- ResNet-50/101 are `keras.applications` networks (ResNet v1 with the stride in the first 1x1 conv of a
  block, the layout of the Keras ImageNet weights), built with `include_top=False, weights=None` and an
  `(None, None, 3)` input, so any batch and any image size divisible by 32 work. C2..C5 are the outputs of
  the last block of each stage (`conv{n}_blockK_out`).
- torchvision's ResNets put the stride in the 3x3 conv (`stride_in_3x3=True`): the folded path runs
  the same Keras variables with the 1x1 at stride 1 and the 3x3 at the block's stride, padded 1 pixel
  on every side as torch does (TF's "SAME" pads (0, 1) at stride 2 on even sizes, a shifted grid). The
  unfolded Keras network cannot move its strides, so fold_batchnorm=False refuses that combination.
  `norm_epsilon` overrides every BatchNormalization's epsilon (torchvision's COCO_V1 Mask R-CNN: 0).
  Which initial weights fill the network (ImageNet, a file) is not this layer's business: the layer is
  built with fresh initial values and weights/initial.py loads a file into it afterwards (module
  docstring there), as keras-hub's `from_preset(load_weights=...)` and torchvision's builders separate
  building from loading. So this module imports nothing from maskrcnn_tf.weights.
- Frozen BatchNorm, as detectron2's FrozenBatchNorm2d: every BatchNormalization layer is
  `trainable=False` (gamma, beta not trained) and the network is always called with `training=False`
  (moving statistics are used and never updated), whatever `training` the caller passes. Detection batches
  are too small for batch statistics.
- Trainable BatchNorm (`norm="batch_norm"` or `"sync_batch_norm"`, ResNets; torchvision v2 trained from
  scratch): BN layers of the stages above freeze_at train (gamma and beta trained; in training, batch
  statistics and moving statistics updated with torch's momentum 0.1 = Keras momentum 0.9;
  sync_batch_norm takes the batch statistics over all replicas, keras `synchronized=True`). Their
  moving statistics are variables like any other, so checkpoints hold them. Training runs the convs and
  BN layers unfolded (`_resnet` with `_conv_bn`) and without `recompute` (the recomputation would
  update the moving statistics a second time); inference runs the folded path, the same function. BN
  in frozen stages runs in inference mode (Keras' trainable=False BN; torchvision's frozen stages keep
  nn.BatchNorm2d in training mode, which only matters with trainable_backbone_layers < 5).
- `freeze_at` follows detectron2's FREEZE_AT: stage 1 = stem (`conv1_*`, `pool1_*`), stage n = res_n
  (`conv{n}_*`); stages 1..freeze_at get `trainable=False`, 0 freezes nothing. Keras propagates
  `layer.trainable = True` to every sublayer, so the `trainable` setter re-applies the freezing afterwards.
- Initial weights (weights/initial.py, after construction): keras.applications' ImageNet files and Keras
  `.weights.h5` files of the same network hold the caffe weights, trained on BGR images minus the BGR
  mean; the loader reverses the input-channel axis of the stem conv kernel (`conv1_conv`) so
  the backbone takes RGB. torchvision `.pth` and MSRA/Caffe2 `.pkl` ImageNet ResNets go through
  weights/imagenet_backbones.py, which checks their conventions against this layer's stride_in_3x3 and
  norm_epsilon.
- "tiny": stem (3x3 conv stride 2 + 3x3 max-pool stride 2) and 4 stages of TINY_BLOCKS_PER_STAGE basic
  residual blocks, widths tiny_width * (1, 2, 4, 8). It trains from scratch, where frozen BN is
  impossible and BN batch statistics of 2-4 images are noise, so it uses GroupNormalization (batch
  independent, identical in training and inference, like frozen BN) with gcd(channels, 8) groups, and
  zero-initialised last norm gamma per block so every block starts as the identity (Goyal et al. 2017).
  Its layer names mirror keras.applications (`conv{n}_block{k}_...`) so freezing and C-level selection
  are shared. It has no ImageNet weights; weights/initial.py loads a file saved with
  `Backbone(name="tiny", ...).network.save_weights(path)`, without any channel reversal.
- Folded frozen BN (ResNets, `fold_batchnorm=True`, the default): the call does not run the Keras
  network layer by layer. Each conv + frozen BN pair is one convolution with kernel W * s and bias
  (b - mean) * s + beta, s = gamma / sqrt(var + eps), computed from the Keras variables on every call
  (a few MB of arithmetic), followed by `tf.nn.bias_add` and ReLU, the pattern Grappler's remapper fuses
  into one _FusedConv2D. This removes BN's two elementwise passes over every feature map and the
  activations the backward pass would keep for them; the forward costs the same and forward + backward
  a little less (figures: benchmarks/README.md). Gradients reach W and b
  through the product, so training is the same function; the variables, their paths and checkpoints are
  the Keras network's. Outputs equal the layer-by-layer network to float32 rounding (tests: 1e-4).
  `fold_batchnorm=False` runs the Keras network (the plain path the tests compare against).
- Recomputed activations (`recompute=True`, the default; folded ResNets in training only): each trainable
  stage (above freeze_at) runs under `tf.recompute_grad`, so the backward pass keeps only the stage
  outputs (C3..C5, which the FPN needs anyway) and recomputes the blocks' inner activations, one stage
  at a time: a lower memory peak of the training step for one more forward pass of res3..res5
  (figures, alone and with the banded FPN/RPN gradients of layers/banded_conv.py: benchmarks/README.md).
  Gradients are the same function (tests: equal to
  float32 rounding).
- Mixed precision: the network is built under this layer's dtype policy (the global one unless `dtype`
  is given): variables stay float32, outputs come in the compute dtype (float16 under mixed_float16).
  Keras' BatchNormalization and GroupNormalization normalise in float32 internally.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Optional

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.layers.initializers import msra_fill

RESNETS = {
    "resnet50": keras.applications.ResNet50,
    "resnet101": keras.applications.ResNet101,
}
TINY = "tiny"
BACKBONE_NAMES = tuple(RESNETS) + (TINY,)
# C2..C5: the backbone outputs, stage n at stride 2**n.
LEVELS = (2, 3, 4, 5)
NUM_STAGES = 5  # stem + res2..res5
# Backbone.norm values (config.BACKBONE_NORMS); trainable BN updates its moving statistics with torch's
# momentum 0.1 (Keras' momentum is the old value's weight).
FROZEN, SYNC_BATCH_NORM = "frozen", "sync_batch_norm"
KERAS_BN_MOMENTUM = 0.9
# torch's padding=1 for a 3x3 conv, in tf.nn.conv2d's explicit NHWC form.
TORCH_3X3_PADDING = [[0, 0], [1, 1], [1, 1], [0, 0]]

TINY_WIDTH_MULTIPLIERS = (1, 2, 4, 8)  # res2..res5 widths, in units of tiny_width
TINY_BLOCKS_PER_STAGE = 2
TINY_NORM_GROUPS = 8
# PyTorch's GroupNorm epsilon (Keras' default of 1e-3 is tuned for BatchNorm).
TINY_NORM_EPSILON = 1e-5
# Stage of a layer from its keras.applications-style name: conv1_* / pool1_* -> 1, conv3_block2_* -> 3.
_STAGE_PATTERN = re.compile(r"^(?:conv|pool)(\d)_")
_BLOCK_OUTPUT_PATTERN = r"^conv{stage}_block(\d+)_out$"


def _stage_of(layer_name: str) -> Optional[int]:
    match = _STAGE_PATTERN.match(layer_name)
    return int(match.group(1)) if match else None


def _stage_output(network: keras.Model, stage: int) -> keras.layers.Layer:
    """The last residual block of `stage` (its output is C_stage)."""
    pattern = re.compile(_BLOCK_OUTPUT_PATTERN.format(stage=stage))
    blocks = [(int(m.group(1)), layer) for layer in network.layers if (m := pattern.match(layer.name))]
    return max(blocks, key=lambda pair: pair[0])[1]


def _folded_conv_bn(layers, prefix: str, x, relu: bool, strides=None, padding=None):
    """`{prefix}_conv` followed by frozen `{prefix}_bn` as one convolution (see the module docstring).

    strides / padding override the Keras conv's own (stride_in_3x3); padding may be explicit
    [[0, 0], [top, bottom], [left, right], [0, 0]] as tf.nn.conv2d takes it.
    """
    conv, norm = layers[f"{prefix}_conv"], layers[f"{prefix}_bn"]
    scale = norm.gamma * tf.math.rsqrt(norm.moving_variance + norm.epsilon)  # [C_out], float32
    kernel = tf.cast(conv.kernel * scale, x.dtype)  # [k, k, C_in, C_out]
    bias = tf.cast((conv.bias - norm.moving_mean) * scale + norm.beta, x.dtype)  # [C_out]
    strides = conv.strides if strides is None else strides
    padding = conv.padding.upper() if padding is None else padding
    y = tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides, padding), bias)
    return tf.nn.relu(y) if relu else y


def _conv_bn(layers, prefix: str, x, relu: bool, strides=None, padding=None, training=True, frozen_stages=()):
    """`{prefix}_conv` then its BN layer called with `training` (trainable BN; module docstring), unless the
    layer's stage is in frozen_stages (inference mode). Arguments as _folded_conv_bn."""
    conv, norm = layers[f"{prefix}_conv"], layers[f"{prefix}_bn"]
    strides = conv.strides if strides is None else strides
    padding = conv.padding.upper() if padding is None else padding
    y = tf.nn.bias_add(tf.nn.conv2d(x, tf.cast(conv.kernel, x.dtype), strides, padding), tf.cast(conv.bias, x.dtype))
    y = norm(y, training=training and _stage_of(norm.name) not in frozen_stages)
    return tf.nn.relu(y) if relu else y


def _resnet(layers, images, recompute_stages=(), stride_in_3x3=False, conv_bn=_folded_conv_bn):
    """The keras.applications ResNet (v1: stride in the first 1x1 conv of a block) with folded frozen BN
    (conv_bn=_folded_conv_bn) or, for trainable BN in training, each conv followed by its BN layer
    (conv_bn=_conv_bn with training bound).

    layers: {name: layer} of the Keras network; images [B, H, W, 3]; recompute_stages: stages (3 = res3)
    run under tf.recompute_grad (their inner activations are recomputed in the backward pass).
    stride_in_3x3: the block's stride moves from its first 1x1 conv to its 3x3 conv, padded 1 pixel on
    every side (torch's padding=1; TF's "SAME" would pad (0, 1) at stride 2 on even sizes).
    Returns {"C2".."C5"} like the network.
    """
    x = conv_bn(layers, "conv1", layers["conv1_pad"](images), relu=True)  # [B, H/2, W/2, 64]
    x = layers["pool1_pool"](layers["pool1_pad"](x))  # [B, H/4, W/4, 64]
    features = {}
    for stage in LEVELS:
        def run_stage(x, stage=stage):
            block = 1
            while (prefix := f"conv{stage}_block{block}") + "_out" in layers:  # 3, 4, 6 (or 23), 3 blocks
                shortcut = (conv_bn(layers, f"{prefix}_0", x, relu=False)
                            if f"{prefix}_0_conv" in layers else x)
                if stride_in_3x3:
                    block_strides = layers[f"{prefix}_1_conv"].strides
                    y = conv_bn(layers, f"{prefix}_1", x, relu=True, strides=1)
                    y = conv_bn(layers, f"{prefix}_2", y, relu=True, strides=block_strides,
                                padding=TORCH_3X3_PADDING)
                else:
                    y = conv_bn(layers, f"{prefix}_1", x, relu=True)
                    y = conv_bn(layers, f"{prefix}_2", y, relu=True)
                y = conv_bn(layers, f"{prefix}_3", y, relu=False)
                x = tf.nn.relu(shortcut + y)
                block += 1
            return x

        x = (tf.recompute_grad(run_stage) if stage in recompute_stages else run_stage)(x)
        features[f"C{stage}"] = x
    return features


def _group_norm(channels: int, name: str, gamma_initializer="ones") -> keras.layers.Layer:
    return keras.layers.GroupNormalization(
        groups=math.gcd(channels, TINY_NORM_GROUPS),
        epsilon=TINY_NORM_EPSILON,
        gamma_initializer=gamma_initializer,
        name=name,
    )


def _conv(filters: int, kernel_size: int, strides: int, name: str) -> keras.layers.Layer:
    # No bias: a norm layer follows every conv.
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                               kernel_initializer=msra_fill(), name=name)


def _tiny_basic_block(x, filters: int, strides: int, prefix: str):
    """Two 3x3 convs with a residual connection (ResNet-18 style block), GroupNorm after each conv."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, f"{prefix}_0_conv")(x)
        shortcut = _group_norm(filters, f"{prefix}_0_gn")(shortcut)
    y = _conv(filters, 3, strides, f"{prefix}_1_conv")(x)
    y = _group_norm(filters, f"{prefix}_1_gn")(y)
    y = keras.layers.ReLU(name=f"{prefix}_1_relu")(y)
    y = _conv(filters, 3, 1, f"{prefix}_2_conv")(y)
    y = _group_norm(filters, f"{prefix}_2_gn", gamma_initializer="zeros")(y)
    y = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{prefix}_out")(y)


def _tiny_network(width: int) -> keras.Model:
    images = keras.Input(shape=(None, None, 3))
    x = _conv(width, 3, 2, "conv1_conv")(images)  # [B, H/2, W/2, width]
    x = _group_norm(width, "conv1_gn")(x)
    x = keras.layers.ReLU(name="conv1_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_pool")(x)  # [B, H/4, W/4, width]
    for stage, multiplier in zip(LEVELS, TINY_WIDTH_MULTIPLIERS):
        for block in range(1, TINY_BLOCKS_PER_STAGE + 1):
            # res2 keeps the stem's stride 4; every later stage halves the resolution in its first block.
            strides = 2 if block == 1 and stage > LEVELS[0] else 1
            x = _tiny_basic_block(x, width * multiplier, strides, f"conv{stage}_block{block}")
    return keras.Model(images, x, name=TINY)


_BACKBONE = config_lib.BackboneConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class Backbone(keras.layers.Layer):
    """ResNet-50/101 (frozen BN) or a tiny GroupNorm ResNet, returning C2..C5.

    Args (keyword-only):
      name: "resnet50" | "resnet101" | "tiny"; also the Keras layer name.
      freeze_at: 0 = nothing frozen, 1 = stem, 2 = stem + res2, ... 5 = everything.
      tiny_width: channels of the tiny backbone's res2 (res3..res5: x2, x4, x8); ignored for ResNets.
      fold_batchnorm: ResNets only: run conv + frozen BN as one convolution (module docstring).
      recompute: folded ResNets, training only: recompute the trainable stages' activations in the
        backward pass instead of keeping them (module docstring).
      stride_in_3x3: ResNets: the stride of a block sits in its 3x3 conv with torch's symmetric
        padding (torchvision) instead of its first 1x1 conv (keras.applications, detectron2). Folded
        path only: fold_batchnorm=False raises (the Keras network has the stride in its 1x1 convs).
      norm_epsilon: ResNets: BN epsilon (None = keras.applications' 1.001e-5; torchvision's
        COCO_V1 Mask R-CNN 0.0, detectron2 and torchvision v2 1e-5).
      norm: ResNets: "frozen" | "batch_norm" | "sync_batch_norm" (config.BACKBONE_NORMS, module docstring).

    Call: images float [B, H, W, 3], RGB normalised as (rgb - pixel_mean) / pixel_std, H and W divisible
    by 32 -> dict {"C2": [B, H/4, W/4, C_2], "C3": [B, H/8, W/8, C_3], "C4": [B, H/16, W/16, C_4],
    "C5": [B, H/32, W/32, C_5]} in the compute dtype. C_n = 256, 512, 1024, 2048 for ResNets and
    tiny_width * 1, 2, 4, 8 for tiny. With frozen BN the network always runs in inference mode and
    `training` only decides whether `recompute` applies; with trainable BN `training` is BN's.
    """

    def __init__(self, *, name: str = _BACKBONE.name, freeze_at: int = _BACKBONE.freeze_at,
                 tiny_width: int = _BACKBONE.tiny_width, fold_batchnorm: bool = True, recompute: bool = True,
                 stride_in_3x3: bool = _BACKBONE.stride_in_3x3, norm_epsilon: Optional[float] = None,
                 norm: str = _BACKBONE.norm, **kwargs):
        if name not in BACKBONE_NAMES:
            raise ValueError(f"Backbone: name={name!r}; expected one of {', '.join(BACKBONE_NAMES)}")
        if not 0 <= freeze_at <= NUM_STAGES:
            raise ValueError(f"Backbone: freeze_at={freeze_at}; expected 0..{NUM_STAGES}")
        if name == TINY and (stride_in_3x3 or norm_epsilon is not None):
            raise ValueError("Backbone: stride_in_3x3 and norm_epsilon apply to ResNets, not to the tiny backbone")
        if norm not in config_lib.BACKBONE_NORMS:
            raise ValueError(f"Backbone: norm={norm!r}; expected one of {', '.join(config_lib.BACKBONE_NORMS)}")
        if name == TINY and norm != FROZEN:
            raise ValueError("Backbone: norm applies to ResNets; the tiny backbone's GroupNorm always trains")
        if norm_epsilon is not None and norm_epsilon < 0:
            raise ValueError(f"Backbone: norm_epsilon={norm_epsilon}; expected a number >= 0")
        super().__init__(name=name, **kwargs)
        self.backbone_name = name
        self.freeze_at = freeze_at
        self.tiny_width = tiny_width
        self.fold_batchnorm = fold_batchnorm
        self.recompute = recompute
        self.stride_in_3x3 = stride_in_3x3
        self.norm_epsilon = norm_epsilon
        self.norm = norm

        # keras.applications takes no dtype argument: its layers follow the global policy, so build them
        # under this layer's policy.
        global_policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.dtype_policy)
        try:
            network = self._build_network()
        finally:
            keras.config.set_dtype_policy(global_policy)
        outputs = {f"C{level}": _stage_output(network, level).output for level in LEVELS}
        self.network = keras.Model(network.input, outputs, name=f"{name}_features")
        self._freeze()
        # All variables exist now (the functional network is built for any input size), so weights can be
        # counted, copied, loaded (weights/initial.py) or restored before the first call.
        self.built = True

    def _build_network(self) -> keras.Model:
        if self.backbone_name == TINY:
            return _tiny_network(self.tiny_width)
        network = RESNETS[self.backbone_name](include_top=False, input_shape=(None, None, 3), weights=None)
        if self.norm_epsilon is not None:
            # Keras' BatchNormalization reads `epsilon` at call time; the folded path reads it too.
            for layer in network.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.epsilon = float(self.norm_epsilon)
        if self.norm != FROZEN:
            for layer in network.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = KERAS_BN_MOMENTUM
                    layer.synchronized = self.norm == SYNC_BATCH_NORM
        return network

    def _freeze(self) -> None:
        for layer in self.network.layers:
            stage = _stage_of(layer.name)
            # Frozen BN (ResNets only; the tiny backbone's GroupNorm trains unless its stage is frozen).
            if isinstance(layer, keras.layers.BatchNormalization) and self.norm == FROZEN:
                layer.trainable = False
            if stage is not None and stage <= self.freeze_at:
                layer.trainable = False

    @property
    def trainable(self):
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        # Keras sets `trainable` on every sublayer: re-freeze BN and the frozen stages afterwards.
        keras.layers.Layer.trainable.fset(self, value)
        if "network" in self.__dict__:
            self._freeze()

    def call(self, images, training=None):
        if training and self.norm != FROZEN:
            # Trainable BN in training: batch statistics, unfolded, nothing recomputed (module docstring).
            frozen_stages = tuple(range(1, self.freeze_at + 1))
            return _resnet({layer.name: layer for layer in self.network.layers}, images,
                           stride_in_3x3=self.stride_in_3x3,
                           conv_bn=functools.partial(_conv_bn, training=True, frozen_stages=frozen_stages))
        # Inference mode: frozen BN, or trainable BN outside training (ResNets); GroupNorm does not depend on it.
        if self.fold_batchnorm and self.backbone_name != TINY:
            recompute_stages = range(self.freeze_at + 1, NUM_STAGES + 1) if training and self.recompute else ()
            # Looked up at trace time (not stored: Keras would track a dict of layers as sublayers).
            return _resnet({layer.name: layer for layer in self.network.layers}, images,
                           tuple(recompute_stages), stride_in_3x3=self.stride_in_3x3)
        if self.stride_in_3x3:
            raise ValueError("Backbone: stride_in_3x3=True needs fold_batchnorm=True (the Keras network has "
                             "the stride in its 1x1 convs)")
        return self.network(images, training=False)

    def get_config(self):
        config = super().get_config()
        config.update(name=self.backbone_name, freeze_at=self.freeze_at,
                      tiny_width=self.tiny_width, fold_batchnorm=self.fold_batchnorm, recompute=self.recompute,
                      stride_in_3x3=self.stride_in_3x3, norm_epsilon=self.norm_epsilon, norm=self.norm)
        return config

    @classmethod
    def from_config(cls, config):
        # Configs written before the initial weights moved to weights/initial.py hold `weights`: the file
        # (or download) it named was an initial value, and a saved layer's variables replace it anyway.
        config = dict(config)
        config.pop("weights", None)
        return cls(**config)
