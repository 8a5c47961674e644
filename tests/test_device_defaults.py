"""device_defaults: the CPU-only techniques follow the device, and both paths train the same model.

The GPU/TPU path (banded conv gradients off, recompute off, the segment-sum RoIAlign gradient that
GPUs use under op determinism) is run here on the CPU against the CPU path: equal losses and
gradients. TensorFlow's own CropAndResize gradient ("native", the GPU default without determinism) is
not compared: its CPU kernel loses updates between threads (ops/roi_align.py), so it is only checked
to be wired.
"""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets
from maskrcnn_tf import device_defaults
from maskrcnn_tf.layers.banded_conv import BandedConv2D
from maskrcnn_tf.model import LOSS_NAMES, build_model
from maskrcnn_tf.ops import roi_align as roi_align_ops
from tests.conftest import REPO_ROOT
from tests.e2e.synthetic import TWO_IMAGES, make_batch, tiny_test_config

CPU_PATH = {"train.recompute_backbone": True, "train.banded_conv_gradients": True, "train.heap_trim": True,
            "train.trim_padding": True, "train.roi_align_gradient": "sparse_matmul"}
ACCELERATOR_PATH = {"train.recompute_backbone": False, "train.banded_conv_gradients": False,
                    "train.heap_trim": False, "train.trim_padding": False, "train.roi_align_gradient": "segment_sum"}


def _switches(cfg):
    return {f"train.{name}": getattr(cfg.train, name) for name in
            (*config_lib.DEVICE_SWITCHES, "roi_align_gradient")}


@pytest.mark.parametrize("kind, deterministic, jit, expected", [
    ("cpu", False, False, CPU_PATH),
    ("cpu", True, False, CPU_PATH),  # sparse_dense_matmul's CPU kernel sums in a fixed order
    ("cpu", False, True, {**ACCELERATOR_PATH, "train.roi_align_gradient": "sparse_matmul"}),  # XLA: no extras
    ("gpu", False, False, {**ACCELERATOR_PATH, "train.roi_align_gradient": "native"}),
    ("gpu", True, False, ACCELERATOR_PATH),
    ("tpu", False, False, {**ACCELERATOR_PATH, "train.roi_align_gradient": "native"}),
])
def test_auto_resolves_per_device(kind, deterministic, jit, expected):
    cfg = config_lib.replace(presets.tiny(), **{"train.jit_compile": jit, "model.roi.roi_align_backend": "gather"})
    assert _switches(cfg) == {key: "auto" for key in CPU_PATH}
    assert _switches(device_defaults.resolve(cfg, kind, deterministic)) == expected


@pytest.mark.parametrize("kind, steps, expected", [
    ("cpu", (20, 1000, 90000), 1),  # a CPU does not idle between calls; the callback sees every step
    ("gpu", (20, 1000, 90000), 20),  # gcd 20
    ("tpu", (100, 1000, 90000), 100),
    ("tpu", (200, 1000, 90000), 100),  # gcd 200: its largest divisor up to 100
    ("gpu", (20, 1000, 90001), 1),  # an odd total: only 1 keeps the last step
    ("gpu", (24, 48, 96), 24),
])
def test_steps_per_loop_auto_keeps_log_checkpoint_and_last_steps(kind, steps, expected):
    log, checkpoint, total = steps
    cfg = config_lib.replace(presets.tiny(), **{"train.log_every_steps": log, "train.checkpoint_every_steps":
                                                   checkpoint, "train.total_steps": total})
    assert cfg.train.steps_per_loop == "auto"
    resolved = device_defaults.resolve(cfg, kind, False)
    assert resolved.train.steps_per_loop == expected
    config_lib.validate(resolved)  # every multiple holds
    explicit = config_lib.replace(cfg, **{"train.steps_per_loop": 7})
    assert device_defaults.resolve(explicit, "gpu", False).train.steps_per_loop == 7


def test_trim_padding_switch_reaches_the_model():
    cpu = build_model(tiny_test_config())
    assert cpu.static_shapes is False and cpu._trims_padding()
    off = build_model(tiny_test_config(**{"train.trim_padding": False}))
    assert off.static_shapes is True and not off._trims_padding()


def test_explicit_switches_are_kept_and_refused_combinations_fail():
    forced = config_lib.replace(presets.tiny(), **CPU_PATH)
    assert _switches(device_defaults.resolve(forced, "gpu", False)) == CPU_PATH
    with pytest.raises(ValueError, match="roi_align_gradient='sparse_matmul' is not deterministic on a GPU"):
        device_defaults.resolve(forced, "gpu", True)
    with pytest.raises(ValueError, match="train.heap_trim"):
        config_lib.validate(config_lib.replace(presets.tiny(), **{"train.heap_trim": "yes"}))
    with pytest.raises(ValueError, match="train.roi_align_gradient"):
        config_lib.validate(config_lib.replace(presets.tiny(), **{"train.roi_align_gradient": "atomic"}))
    assert device_defaults.device_kind() == ("gpu" if tf.config.list_logical_devices("GPU") else "cpu")


def test_tpu_client_keeps_tensorflows_inter_op_threads():
    # A remote-TPU client sees only its CPU, which alone would give it one inter-op thread.
    code = ("from maskrcnn_tf import distribute; import tensorflow as tf; distribute.configure_cpu_devices(1); "
            "print(distribute.configure_host_threads(-1, 'tpu'), distribute.configure_host_threads(-1, 'one_device'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "1"]


def test_build_model_wires_the_switches():
    for switches, banded, gradient in ((CPU_PATH, True, "sparse_matmul"), (ACCELERATOR_PATH, False, "segment_sum"),
                                       ({"train.roi_align_gradient": "native"}, True, "native")):
        model = build_model(tiny_test_config(**switches))
        convs = [layer for layer in model._flatten_layers() if isinstance(layer, BandedConv2D)]
        assert len(convs) == 5 and all(c.banded_gradients is banded for c in convs)  # 4 FPN outputs + RPN
        assert model.box_roi_align.gradient == model.mask_roi_align.gradient == gradient


def test_cpu_and_accelerator_paths_give_the_same_losses_and_gradients():
    # Exhaustive sampling (as tests/e2e/test_model.py): the result does not depend on the random draws.
    base = {"model.rpn.batch_size_per_image": 8192, "model.roi.num_samples": 64,
            "model.roi.foreground_fraction": 1.0, "model.roi.max_mask_rois": 64}
    cpu = build_model(tiny_test_config(**base, **CPU_PATH))
    accelerator = build_model(tiny_test_config(**base, **ACCELERATOR_PATH))
    accelerator.set_weights(cpu.get_weights())
    data, _ = make_batch(tiny_test_config(**base), TWO_IMAGES)

    def losses_and_gradients(model):
        @tf.function
        def step(batch):
            with tf.GradientTape() as tape:
                values = model.compute_losses(batch)
            return values, tape.gradient(values["total_loss"], model.trainable_variables)
        values, gradients = step(data)
        return {k: float(v) for k, v in values.items()}, [g.numpy() for g in gradients]

    cpu_losses, cpu_gradients = losses_and_gradients(cpu)
    accelerator_losses, accelerator_gradients = losses_and_gradients(accelerator)
    assert cpu_losses["rcnn_mask_loss"] > 0 and cpu_losses["rcnn_cls_loss"] > 0
    for name in LOSS_NAMES:
        assert accelerator_losses[name] == pytest.approx(cpu_losses[name], rel=1e-5, abs=1e-7), name
    assert len(cpu_gradients) == len(accelerator_gradients)
    for a, b in zip(accelerator_gradients, cpu_gradients):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(b).max()))


def test_segment_sum_roi_align_gradient_equals_the_sparse_one_and_repeats_bit_for_bit():
    rng = np.random.default_rng(0)
    features = {f"P{level}": tf.constant(rng.normal(size=(2, 64 >> (level - 2), 48 >> (level - 2), 3)),
                                         tf.float32) for level in range(2, 6)}
    corners = rng.uniform(-8, 250, size=(2, 24, 2, 2))  # boxes of every level, some over the border
    boxes = tf.constant(np.concatenate([corners.min(2), corners.max(2)], -1), tf.float32)
    upstream = tf.constant(rng.normal(size=(2, 24, 7, 7, 3)), tf.float32)

    def feature_gradients(gradient):
        with tf.GradientTape() as tape:
            tape.watch(features)
            out = roi_align_ops.multilevel_roi_align(features, boxes, 7, 2, gradient=gradient)
            loss = tf.reduce_sum(out * upstream)
        return out, [g.numpy() for g in tape.gradient(loss, [features[k] for k in sorted(features)])]

    sparse_out, sparse = feature_gradients("sparse_matmul")
    segment_out, segment = feature_gradients("segment_sum")
    np.testing.assert_array_equal(segment_out.numpy(), sparse_out.numpy())  # same forward
    assert sum(float(np.abs(g).sum()) for g in sparse) > 0
    for a, b in zip(segment, sparse):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(feature_gradients("segment_sum")[1], segment):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="gradient must be one of"):
        roi_align_ops.multilevel_roi_align(features, boxes, 7, 2, gradient="atomic")


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")
