"""RoIAlign conventions against torchvision.ops (the executable oracle): aligned=False (torchvision's
MultiScaleRoIAlign) and aligned=True, fixed and adaptive (sampling_ratio=0, detectron2's default pooler)
sampling, both backends, outputs and gradients (torch autograd), and the multilevel pooler end to end.

Boxes cover the cases the conventions differ on: sub-pixel and zero-size boxes (un-aligned RoIs are enlarged
to one pixel), boxes hanging over the border, and sides up to 4 * output_size pixels (adaptive sampling
uses up to MAX_ADAPTIVE_SAMPLING_RATIO = 4 samples per bin; within that the result is exact).
"""
import numpy as np
import pytest

from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf.ops.roi_align import BACKENDS, MAX_ADAPTIVE_SAMPLING_RATIO, multilevel_roi_align, roi_align  # noqa: E402

OUTPUT_SIZE = 7
TOLERANCE = 1e-4  # float32 on both sides; the features are O(1)


def _case(seed=0, batch=2, num_boxes=24, height=21, width=30, channels=5):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    starts = np.stack([rng.uniform(-3, height, (batch, num_boxes)), rng.uniform(-3, width, (batch, num_boxes))], -1)
    max_side = MAX_ADAPTIVE_SAMPLING_RATIO * OUTPUT_SIZE
    sides = rng.uniform(0, max_side, (batch, num_boxes, 2))
    sides[:, :3] = [[0.0, 0.0], [0.4, 0.7], [0.9, 3.0]]  # zero-size and sub-pixel boxes
    boxes = np.concatenate([starts, starts + sides], -1).astype(np.float32)  # [B, R, 4] [y1, x1, y2, x2]
    return features, boxes


def _torch_roi_align(features, boxes, sampling_ratio, aligned, upstream=None):
    """torchvision.ops.roi_align on NHWC features and [y1, x1, y2, x2] boxes -> (output NHWC, grad NHWC)."""
    x = torch.from_numpy(features).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    rois = [torch.from_numpy(b[:, [1, 0, 3, 2]]) for b in boxes]
    out = torchvision.ops.roi_align(x, rois, OUTPUT_SIZE, 1.0, sampling_ratio, aligned)  # [B * R, C, S, S]
    out = out.permute(0, 2, 3, 1).reshape(boxes.shape[:2] + out.shape[2:] + out.shape[1:2])
    grad = None
    if upstream is not None:
        (out * torch.from_numpy(upstream)).sum().backward()
        grad = x.grad.permute(0, 2, 3, 1).numpy()
    return out.detach().numpy(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_matches_torchvision_outputs_and_gradients(backend, aligned, sampling_ratio):
    features, boxes = _case()
    upstream = np.random.default_rng(1).normal(size=boxes.shape[:2] + (OUTPUT_SIZE, OUTPUT_SIZE, features.shape[-1]))
    upstream = upstream.astype(np.float32)
    expected, expected_grad = _torch_roi_align(features, boxes, sampling_ratio, aligned, upstream)
    x = tf.constant(features)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = roi_align(x, tf.constant(boxes), OUTPUT_SIZE, sampling_ratio, backend, aligned=aligned)
        loss = tf.reduce_sum(out * upstream)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), expected_grad, rtol=0, atol=TOLERANCE)


def test_the_conventions_differ_where_expected():
    """aligned and sampling_ratio change the answer on these boxes (the test above is not vacuous)."""
    features, boxes = _case()
    results = {(a, s): roi_align(tf.constant(features), tf.constant(boxes), OUTPUT_SIZE, s, aligned=a).numpy()
               for a in (False, True) for s in (2, 0)}
    assert np.abs(results[(False, 2)] - results[(True, 2)]).max() > 0.1
    assert np.abs(results[(True, 0)] - results[(True, 2)]).max() > 0.1


def test_adaptive_sampling_caps_the_samples_per_bin():
    """A side beyond MAX_ADAPTIVE_SAMPLING_RATIO * S pixels is averaged over the cap (a documented static-shape
    limit): equal to a fixed sampling ratio of the cap on that box, and not torchvision's adaptive answer."""
    features, _ = _case(height=80, width=80)
    boxes = np.array([[[2.0, 3.0, 70.0, 75.0]]] * 2, np.float32)  # 68 px: ceil(68 / 7) = 10 > 4 samples
    adaptive = roi_align(tf.constant(features), tf.constant(boxes), OUTPUT_SIZE, 0, "gather").numpy()
    capped = roi_align(tf.constant(features), tf.constant(boxes), OUTPUT_SIZE, MAX_ADAPTIVE_SAMPLING_RATIO,
                       "gather").numpy()
    np.testing.assert_allclose(adaptive, capped, rtol=0, atol=1e-5)
    reference, _ = _torch_roi_align(features, boxes, 0, True)
    assert np.abs(adaptive - reference).max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_multilevel_unaligned_matches_torchvision_multiscale_roi_align(backend):
    """Level assignment (k0 = 4, canonical 224) and per-level scales as torchvision's MultiScaleRoIAlign(
    sampling_ratio=2), which uses aligned=False."""
    rng = np.random.default_rng(2)
    size, channels = 256, 4
    levels = {f"P{l}": rng.normal(size=(2, size // 2**l, size // 2**l, channels)).astype(np.float32)
              for l in (2, 3, 4, 5)}
    centres = rng.uniform(0, size, (2, 40, 2))
    sides = np.exp(rng.uniform(np.log(4), np.log(400), (2, 40, 2)))
    boxes = np.clip(np.concatenate([centres - sides / 2, centres + sides / 2], -1), 0, size).astype(np.float32)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], OUTPUT_SIZE, 2)
    feature_dict = {str(i): torch.from_numpy(levels[f"P{l}"]).permute(0, 3, 1, 2) for i, l in enumerate((2, 3, 4, 5))}
    expected = pooler(feature_dict, [torch.from_numpy(b[:, [1, 0, 3, 2]]) for b in boxes], [(size, size)] * 2)
    expected = expected.permute(0, 2, 3, 1).reshape(2, 40, OUTPUT_SIZE, OUTPUT_SIZE, channels).numpy()
    ours = multilevel_roi_align({k: tf.constant(v) for k, v in levels.items()}, tf.constant(boxes), OUTPUT_SIZE, 2,
                                backend, aligned=False).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)


def test_torchvision_level_mapper_matches_at_level_boundaries():
    """Square boxes within a few 1e-6 of every level boundary: torchvision_epsilon reproduces torchvision's
    LevelMapper (epsilon after the log); the default (epsilon added to the ratio) differs on some of them."""
    from torchvision.ops.poolers import LevelMapper

    from maskrcnn_tf.ops.roi_align import assign_levels

    offsets = np.array([0.0, 3e-7, 1e-6, 1.4e-6, 1.8e-6, 3e-6, 1e-5])
    sides = np.concatenate([224.0 * 2.0**m * (1 + sign * offsets) for m in (-2, -1, 0, 1) for sign in (-1, 1)])
    boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], -1).astype(np.float32)  # [N, 4]
    expected = LevelMapper(2, 5)([torch.from_numpy(boxes[:, [1, 0, 3, 2]])]).numpy() + 2
    ours = assign_levels(tf.constant(boxes[None]), torchvision_epsilon=True).numpy()[0]
    np.testing.assert_array_equal(ours, expected)
    default = assign_levels(tf.constant(boxes[None])).numpy()[0]
    assert (default != expected).any()
