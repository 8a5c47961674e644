"""Optimizer and learning-rate schedule of DESIGN.md section 6 (detectron2's recipe).

SGD with momentum 0.9; the peak rate is the reference rate scaled linearly to the global batch
(config.learning_rate); linear warmup from warmup_factor x peak over warmup_steps; then either x0.1 at
each decay fraction of the run ("step", the 1x schedule) or a cosine decay to 0 ("cosine", as the
MindSpore original offers). Weight decay is Keras' decoupled form (w -= lr * wd * w) and skips
normalization layers and biases (detectron2's WEIGHT_DECAY_NORM = 0; biases as Model Garden).
"""

import math

import keras
import tensorflow as tf

from maskrcnn_tf import config as config_lib


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate at a step: linear warmup, then step or cosine decay. Pure function of the step, so
    a resumed run continues at the same rate."""

    def __init__(self, peak, total_steps, warmup_steps, warmup_factor, schedule="step",
                 decay_fractions=(2 / 3, 8 / 9), decay_rate=0.1):
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.schedule = schedule
        self.decay_fractions = tuple(decay_fractions)
        self.decay_rate = float(decay_rate)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.schedule == "cosine":
            progress = tf.clip_by_value(step / float(self.total_steps), 0.0, 1.0)
            rate = 0.5 * self.peak * (1.0 + tf.cos(math.pi * progress))
        else:
            boundaries = [float(int(f * self.total_steps)) for f in self.decay_fractions]
            passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in boundaries]) if boundaries else 0.0
            rate = self.peak * tf.pow(self.decay_rate, passed)
        if self.warmup_steps > 0:
            alpha = tf.minimum(step / float(self.warmup_steps), 1.0)
            rate = rate * (self.warmup_factor * (1.0 - alpha) + alpha)
        return rate

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    warmup_factor=self.warmup_factor, schedule=self.schedule,
                    decay_fractions=self.decay_fractions, decay_rate=self.decay_rate)


def build_schedule(cfg: config_lib.Config) -> WarmupSchedule:
    t = cfg.train
    return WarmupSchedule(config_lib.learning_rate(cfg), t.total_steps, t.warmup_steps, t.warmup_factor,
                          t.schedule, t.decay_fractions, t.decay_rate)


def build_optimizer(cfg: config_lib.Config, model: keras.Model) -> keras.optimizers.Optimizer:
    """SGD(momentum, decoupled weight decay without norm layers and biases) on cfg's schedule."""
    optimizer = keras.optimizers.SGD(learning_rate=build_schedule(cfg), momentum=cfg.train.momentum,
                                     weight_decay=cfg.train.weight_decay or None)
    if cfg.train.weight_decay:
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    return optimizer


def no_decay_variables(model: keras.Model):
    """Biases, and the scales and offsets of normalization layers."""
    norm_types = (keras.layers.BatchNormalization, keras.layers.GroupNormalization,
                  keras.layers.LayerNormalization)
    variables = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, norm_types):
            variables.extend(layer.trainable_weights)
    variables.extend(v for v in model.trainable_variables if v.path.endswith("bias"))
    return variables
