"""The normalization after a conv in the FPN and the box and mask heads (config.NORMS), as one factory.

- "none": no layer; the conv keeps its bias (today's default).
- "batch_norm": keras BatchNormalization with torch's nn.BatchNorm2d settings: eps 1e-5 and momentum 0.1
  in torch terms, i.e. moving = 0.9 * moving + 0.1 * batch statistic (Keras' momentum is the weight of
  the old value). Batch statistics in training, moving statistics in inference (torchvision v2's FPN and
  heads). Keras updates the moving variance with the biased batch variance; torch with the unbiased one
  (a factor n / (n - 1), n = values per channel: 1 + 1/25088 for 512 RoIs of 7 x 7).
- "sync_batch_norm": the same with synchronized=True: under tf.distribute the batch statistics are taken
  over every replica's batch (torch's SyncBatchNorm); the same as "batch_norm" on one replica.
- Both BatchNorms take an optional `mask` (True for the rows that count: [N, H, W] for [N, H, W, C]
  inputs): batch statistics over those rows only, over all replicas with "sync_batch_norm" (keras'
  own masked statistics are never synchronized), so the padding rows of a RoI head's batch do not
  enter them, as torchvision's heads only ever see the sampled RoIs. A batch without a counted row
  leaves the moving statistics unchanged.
- "group_norm": GroupNormalization with 32 groups (gcd with the channels) and eps 1e-5, detectron2's "GN".

A conv followed by a norm has no bias (torchvision's Conv2dNormActivation: bias = norm_layer is None),
so checkpoints of such convs hold a kernel only. Keras' normalization layers compute in float32 under
mixed precision.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib

NONE = "none"
# torch nn.BatchNorm2d / nn.GroupNorm defaults.
TORCH_NORM_EPSILON = 1e-5
TORCH_BN_MOMENTUM = 0.1
KERAS_BN_MOMENTUM = 1.0 - TORCH_BN_MOMENTUM
GROUP_NORM_GROUPS = 32  # detectron2 get_norm("GN")
BATCH_NORMS = ("batch_norm", "sync_batch_norm")  # BatchNormalization below; they take a `mask`


def check(norm: str, owner: str) -> str:
    if norm not in config_lib.NORMS:
        raise ValueError(f"{owner}: norm={norm!r}; expected one of {', '.join(config_lib.NORMS)}")
    return norm


def uses_bias(norm: str) -> bool:
    """Whether the conv before `norm` has a bias (no: a norm's beta would only duplicate it)."""
    return norm == NONE


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """keras BatchNormalization whose masked batch statistics (`mask`, module docstring) are synchronized
    over the replicas when `synchronized`; without a mask it is keras' layer."""

    def _moments(self, inputs, mask):
        if mask is None:
            return super()._moments(inputs, mask)
        weights = tf.cast(mask, inputs.dtype)[..., None]  # [N, H, W, 1]
        axes = self._reduction_axes
        total = tf.reduce_sum(weights * inputs, axis=axes)  # [C]
        count = tf.reduce_sum(weights) * tf.ones_like(total)  # [C], values per channel
        count, total = self._sum_over_replicas([count, total])
        mean = tf.math.divide_no_nan(total, count)
        # Two passes (squared deviations from the global mean), as precise as keras' unmasked moments.
        squares = tf.reduce_sum(weights * tf.square(inputs - mean), axis=axes)
        (squares,) = self._sum_over_replicas([squares])
        variance = tf.math.divide_no_nan(squares, count)
        # No counted row anywhere: the moving statistics as the batch's, so the update keeps them.
        counted = count > 0
        return (tf.where(counted, mean, tf.cast(self.moving_mean, inputs.dtype)),
                tf.where(counted, variance, tf.cast(self.moving_variance, inputs.dtype)))

    def _sum_over_replicas(self, values):
        context = tf.distribute.get_replica_context()
        if not self.synchronized or context is None or context.num_replicas_in_sync == 1:
            return values
        return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def make(norm: str, channels: int, name: str, dtype=None):
    """The normalization layer for `channels` features, or None for "none"."""
    if norm == NONE:
        return None
    if norm in BATCH_NORMS:
        return BatchNormalization(epsilon=TORCH_NORM_EPSILON, momentum=KERAS_BN_MOMENTUM,
                                  synchronized=norm == "sync_batch_norm", name=name, dtype=dtype)
    if norm == "group_norm":
        return keras.layers.GroupNormalization(groups=math.gcd(channels, GROUP_NORM_GROUPS),
                                               epsilon=TORCH_NORM_EPSILON, name=name, dtype=dtype)
    raise ValueError(f"norm={norm!r}; expected one of {', '.join(config_lib.NORMS)}")
