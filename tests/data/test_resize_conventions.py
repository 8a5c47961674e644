"""resize_mode "short_side" against torchvision's GeneralizedRCNNTransform (the executable oracle): the resized
size (short side 800, long side <= 1333, floor), the bilinear pixels after ImageNet normalisation, and the
canvas fallback; "fit" (the default) unchanged."""
import numpy as np
import pytest

from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf import presets  # noqa: E402
from maskrcnn_tf.data import transforms  # noqa: E402

CANVAS = presets.REFERENCE_CANVAS
NO_JITTER = (1.0, 1.0)
SEED = tf.zeros([2], tf.int64)


def _geometry(hw, canvas=CANVAS, mode="short_side"):
    return transforms.resize_geometry(tf.constant(hw), canvas, NO_JITTER, SEED, mode=mode).numpy()


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (640, 480), (375, 500), (333, 1000), (1000, 333),
                                (612, 612), (181, 251)])
def test_short_side_resize_matches_generalized_rcnn_transform(hw):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    rng = np.random.default_rng(hw[0])
    image = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = GeneralizedRCNNTransform(800, 1333, mean, std).eval()
    with torch.no_grad():
        batch, _ = reference([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])
    expected_hw = tuple(batch.image_sizes[0])
    expected = batch.tensors[0].permute(1, 2, 0).numpy()[: expected_hw[0], : expected_hw[1]]

    info = _geometry(hw)
    np.testing.assert_array_equal(info[1], expected_hw)  # valid (h, w)
    np.testing.assert_allclose(info[2], np.array(expected_hw) / np.array(hw), rtol=1e-6)  # scale (y, x)
    normalized = transforms.normalize_image(image, presets.TORCHVISION_PIXEL_MEAN, presets.TORCHVISION_PIXEL_STD)
    ours = transforms.resize_and_crop_image(normalized, tf.constant(info)).numpy()
    # Uniform noise has neighbouring pixels up to 4.4 normalised units apart, so the float32 rounding of a
    # sample position (~2e-5 px on a 1333 px axis, computed differently by each kernel) shows as up to ~1e-4
    # in a few columns; a wrong size, scale or half-pixel convention gives differences of order 1.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=3e-4)
    assert np.abs(ours - expected).mean() < 1e-6


def test_canvas_smaller_than_the_rule_lowers_the_scale_to_fit():
    info = _geometry((480, 640), canvas=(512, 512))  # the rule gives 800 x 1066
    np.testing.assert_array_equal(info[1], [384, 512])


def test_fit_mode_is_the_default_and_unchanged():
    default = transforms.resize_geometry(tf.constant((480, 640)), (1024, 1024), NO_JITTER, SEED).numpy()
    np.testing.assert_array_equal(default, _geometry((480, 640), (1024, 1024), mode="fit"))
    np.testing.assert_array_equal(default[1], [768, 1024])
    with pytest.raises(ValueError, match="mode='other'"):
        _geometry((480, 640), mode="other")
