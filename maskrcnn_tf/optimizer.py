"""Optimizer and learning-rate schedule: detectron2's recipe (solver/build.py, config/defaults.py).

SGD with momentum 0.9; the peak rate is the reference rate scaled linearly to the global batch
(config.learning_rate); linear warmup from warmup_factor x peak over warmup_steps; then either x0.1 at
each decay fraction of the run ("step", the 1x schedule) or a cosine decay to 0 ("cosine", as the
MindSpore original offers).

Weight decay, `train.weight_decay_type`:
- "coupled" (default, detectron2 and torchvision): torch.optim.SGD(momentum, dampening=0,
  nesterov=False, weight_decay) exactly. With lr the rate of this step:
      g = g + wd * w          (decayed variables only)
      b = momentum * b + g    (b starts at 0, so the first step's b is g, as torch's first step)
      w = w - lr * b
  The rate multiplies the whole buffer at each step (torch), not each gradient as it enters it
  (Keras' SGD): the two differ whenever the rate changes, i.e. during warmup and at each decay.
  Decayed: every trainable kernel and bias. Not decayed: normalization layers' scales and offsets
  (detectron2 SOLVER.WEIGHT_DECAY_NORM = 0.0; SOLVER.WEIGHT_DECAY_BIAS = None, "following
  WEIGHT_DECAY", so biases are decayed). With momentum 0.9 the effective decay per step is about
  wd * lr / (1 - 0.9), ten times the decoupled form's at the same wd.
- "decoupled": Keras' SGD with w -= lr * wd * w after the step, skipping normalization layers and
  biases (Model Garden's choice; this package's optimizer before the detectron2 recipe was matched).

Gradients arrive summed over replicas: MaskRCNN.train_step sums them once, before the loss-scale
decision, so both optimizers skip Keras' own cross-replica sum (SummedGradients). Clipping
(train.clip_grad_norm) is Keras' global_clipnorm of the optimizer: it runs on the summed and unscaled
gradients, as torch's clip_grad_norm_ after DDP's all-reduce and GradScaler.unscale_.
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


WEIGHT_DECAY_TYPES = config_lib.WEIGHT_DECAY_TYPES


class SummedGradients:
    """Optimizer mixin: apply_gradients takes gradients already summed over replicas (model.train_step)
    and does not all-reduce them again. Overrides the hook of Keras' TensorFlow optimizer that sums
    them (`_all_reduce_sum_gradients`); tests/e2e/test_model.py's one-replica-vs-two test fails if a
    Keras release stops calling it (the update would count N times)."""

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class SGDDecoupledDecay(SummedGradients, keras.optimizers.SGD):
    """keras.optimizers.SGD (decoupled weight decay) taking gradients summed over replicas."""


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class SGDCoupledDecay(SummedGradients, keras.optimizers.Optimizer):
    """torch.optim.SGD(lr, momentum, dampening=0, nesterov=False, weight_decay) as a Keras optimizer
    (update rule in the module docstring). `exclude_from_weight_decay(var_list=...)` (Keras' API)
    names the variables that get no L2 term; call it before the first step."""

    def __init__(self, learning_rate=0.01, momentum=0.9, weight_decay=0.0, name="sgd_coupled_decay",
                 **kwargs):
        # The base class's weight_decay is its decoupled form: keep it off, the L2 term is ours.
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"SGDCoupledDecay: momentum={momentum!r}; expected a number in [0, 1)")
        if not float(weight_decay) >= 0.0:
            raise ValueError(f"SGDCoupledDecay: weight_decay={weight_decay!r}; expected a number >= 0")
        self.momentum = float(momentum)
        self.l2_weight_decay = float(weight_decay)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentum_buffers = []
        if self.momentum > 0.0:
            self.momentum_buffers = self.add_optimizer_variables(variables, "momentum_buffer")

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        if self.l2_weight_decay > 0.0 and self._use_weight_decay(variable):
            gradient = gradient + tf.cast(self.l2_weight_decay, variable.dtype) * variable
        if self.momentum > 0.0:
            buffer = self.momentum_buffers[self._get_variable_index(variable)]
            self.assign(buffer, tf.cast(self.momentum, variable.dtype) * buffer + gradient)
            gradient = buffer
        self.assign_sub(variable, learning_rate * gradient)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.l2_weight_decay)
        return config


def build_optimizer(cfg: config_lib.Config, model: keras.Model) -> keras.optimizers.Optimizer:
    """The optimizer of cfg.train (weight_decay_type, module docstring) on cfg's schedule, clipping the
    global gradient norm at train.clip_grad_norm (0 = off)."""
    t = cfg.train
    if t.weight_decay_type not in WEIGHT_DECAY_TYPES:
        raise ValueError(f"config: train.weight_decay_type={t.weight_decay_type!r} is not allowed; "
                         f"expected {' | '.join(WEIGHT_DECAY_TYPES)}")
    clipping = {"global_clipnorm": t.clip_grad_norm} if t.clip_grad_norm > 0 else {}
    if t.weight_decay_type == "coupled":
        optimizer = SGDCoupledDecay(learning_rate=build_schedule(cfg), momentum=t.momentum,
                                    weight_decay=t.weight_decay, **clipping)
        if t.weight_decay:
            optimizer.exclude_from_weight_decay(var_list=normalization_variables(model))
        return optimizer
    optimizer = SGDDecoupledDecay(learning_rate=build_schedule(cfg), momentum=t.momentum,
                                  weight_decay=t.weight_decay or None, **clipping)
    if t.weight_decay:
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    return optimizer


def normalization_variables(model: keras.Model):
    """The trainable scales and offsets of normalization layers (detectron2's norm module types)."""
    norm_types = (keras.layers.BatchNormalization, keras.layers.GroupNormalization,
                  keras.layers.LayerNormalization, keras.layers.UnitNormalization)
    variables = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, norm_types):
            variables.extend(layer.trainable_weights)
    return variables


def no_decay_variables(model: keras.Model):
    """The "decoupled" form's exclusions: normalization layers' variables and every bias."""
    variables = normalization_variables(model)
    variables.extend(v for v in model.trainable_variables if v.path.endswith("bias"))
    return variables
