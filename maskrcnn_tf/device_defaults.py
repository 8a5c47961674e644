"""Device-aware defaults: the one place that decides which CPU-only training techniques are on.

Five techniques of this package were measured to lower the peak memory or the work of the training
step on a CPU host (benchmarks/README.md) and cost or break something elsewhere:

    train.recompute_backbone     tf.recompute_grad of res3..res5: one more forward pass of them; under
                                 XLA the recomputation may be merged away again
    train.banded_conv_gradients  row-banded kernel gradients of the 3x3 FPN/RPN convs, serialised by
                                 control dependencies: a GPU runs one big cuDNN kernel faster
    train.roi_align_gradient     the crop_and_resize RoIAlign gradient as one sparse_dense_matmul: on GPU
                                 that kernel adds with atomics (not deterministic) and raises under
                                 tf.config.experimental.enable_op_determinism()
    train.heap_trim              the glibc malloc_trim thread (host_memory.py): tensors of a GPU/TPU
                                 step do not live in the host heap
    train.trim_padding           losses on the batch's used instance and foreground-RoI counts (model.py):
                                 a new shape almost every step, so cuDNN autotunes again on a GPU; XLA
                                 and TPUs need static shapes

Each is "auto" by default and `resolve(cfg)` turns "auto" into True/False (or a gradient name) for
the devices the model will run on: on only for a host whose devices are CPUs and no XLA (jit_compile),
off on GPU and TPU. An explicit True/False in the config is kept. `train.steps_per_loop` "auto" is 1 on a CPU
host (the callback sees every step; a CPU does not idle between calls) and, on GPU and TPU, the largest
divisor of log_every_steps, checkpoint_every_steps and total_steps up to MAX_AUTO_STEPS_PER_LOOP: the
host then syncs once per loop, not once per step, and loss.log and checkpoints keep their steps. The
sixth CPU technique, one inter-op thread, must be set before TensorFlow starts, so
distribute.configure_host_threads decides it (same rule; a remote TPU client counts as a TPU although
it sees no local accelerator).

RoIAlign gradients (crop_and_resize backend) and determinism:

    gradient       CPU                         GPU                                  XLA / TPU
    sparse_matmul  deterministic (serial sum)  atomics; raises under determinism    no kernel
    segment_sum    deterministic               deterministic under determinism      no kernel
    native         races (tensorflow#42033)    atomics; raises under determinism    no kernel

The "gather" backend's gradient (the gradient of tf.gather, a segment sum) is deterministic on CPU and,
under enable_op_determinism, on GPU; XLA/TPU reductions are deterministic. "auto" resolves to
sparse_matmul on CPU, native on GPU, segment_sum on GPU when op determinism is enabled.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from maskrcnn_tf import config as config_lib

DEVICE_KINDS = ("cpu", "gpu", "tpu")
# steps_per_loop "auto" on GPU/TPU: at most this many steps per call of the train function.
MAX_AUTO_STEPS_PER_LOOP = 100
# RoIAlign gradients that raise under enable_op_determinism on a GPU (TensorFlow's determinism list).
_NONDETERMINISTIC_GPU_GRADIENTS = ("sparse_matmul", "native")


def device_kind(strategy: tf.distribute.Strategy | None = None) -> str:
    """"tpu" under a TPUStrategy, "gpu" when TensorFlow sees a GPU, else "cpu"."""
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)):
        return "tpu"
    if tf.config.list_logical_devices("TPU"):
        return "tpu"
    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def op_determinism_enabled() -> bool:
    """True after tf.config.experimental.enable_op_determinism()."""
    from tensorflow.python.framework import config as tf_config  # no public getter exists

    return bool(getattr(tf_config, "is_op_determinism_enabled", lambda: False)())


def resolve(cfg: config_lib.Config, kind: str | None = None, deterministic: bool | None = None) -> config_lib.Config:
    """cfg with every "auto" switch of config_lib.DEVICE_SWITCHES and train.roi_align_gradient decided.

    Args:
      cfg: a Config whose train switches may be "auto".
      kind: "cpu" | "gpu" | "tpu"; default device_kind() of the current strategy.
      deterministic: default op_determinism_enabled().
    Raises:
      ValueError: a RoIAlign gradient that TensorFlow refuses under op determinism on a GPU.
    """
    kind = kind or device_kind()
    if kind not in DEVICE_KINDS:
        raise ValueError(f"device kind must be one of {DEVICE_KINDS}, got {kind!r}")
    deterministic = op_determinism_enabled() if deterministic is None else deterministic
    train = cfg.train
    cpu_techniques = kind == "cpu" and not train.jit_compile
    changes = {name: cpu_techniques for name in config_lib.DEVICE_SWITCHES if getattr(train, name) == "auto"}
    gradient = train.roi_align_gradient
    if gradient == "auto":
        if kind == "cpu":
            gradient = "sparse_matmul"
        else:
            gradient = "segment_sum" if deterministic else "native"
    elif (kind == "gpu" and deterministic and gradient in _NONDETERMINISTIC_GPU_GRADIENTS
          and cfg.model.roi.roi_align_backend == "crop_and_resize"):
        raise ValueError(f"config: train.roi_align_gradient={gradient!r} is not deterministic on a GPU and "
                         "raises under enable_op_determinism(); use segment_sum or auto")
    changes["roi_align_gradient"] = gradient
    if train.steps_per_loop == "auto":
        changes["steps_per_loop"] = 1 if kind == "cpu" else auto_steps_per_loop(
            train.log_every_steps, train.checkpoint_every_steps, train.total_steps)
    return dataclasses.replace(cfg, train=dataclasses.replace(train, **changes))


def auto_steps_per_loop(*step_counts: int) -> int:
    """The largest k <= MAX_AUTO_STEPS_PER_LOOP that divides every one of step_counts."""
    common = math.gcd(*step_counts)
    return max(k for k in range(1, MAX_AUTO_STEPS_PER_LOOP + 1) if common % k == 0)
