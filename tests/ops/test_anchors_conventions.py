"""Anchor conventions against torchvision's AnchorGenerator (the executable oracle): cell-corner centres
(offset 0) and base anchors rounded to whole pixels; and the default (offset 0.5, unrounded) unchanged."""
import numpy as np
import pytest

from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()

from maskrcnn_tf.ops.anchors import multilevel_anchors  # noqa: E402

SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)


@pytest.mark.parametrize("image_size", [(256, 256), (384, 640), (1344, 1344)])
def test_offset_zero_and_rounding_reproduce_torchvision_anchor_generator(image_size):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    generator = AnchorGenerator(tuple((s,) for s in SIZES), (RATIOS,) * len(SIZES))
    height, width = image_size
    features = [torch.zeros(1, 1, -(-height // 2**l), -(-width // 2**l)) for l in range(2, 7)]
    expected = generator(ImageList(torch.zeros(1, 3, height, width), [image_size]), features)[0].numpy()
    ours = multilevel_anchors(image_size, SIZES, RATIOS, offset=0.0, round_base_anchors=True)
    ours = np.concatenate([ours[f"P{l}"] for l in range(2, 7)])[:, [1, 0, 3, 2]]  # -> [x1, y1, x2, y2]
    np.testing.assert_array_equal(ours, expected)


def test_rounding_and_offset_change_the_anchors_and_defaults_stay():
    default = multilevel_anchors((128, 128), SIZES, RATIOS)["P2"]
    explicit = multilevel_anchors((128, 128), SIZES, RATIOS, offset=0.5, round_base_anchors=False)["P2"]
    np.testing.assert_array_equal(default, explicit)
    # Size 32, ratio 0.5 (h / w) at cell (0, 0): half sizes 8 * sqrt(2) = 11.31 (h) and 22.63 (w).
    np.testing.assert_allclose(default[0], [2 - 11.3137, 2 - 22.6274, 2 + 11.3137, 2 + 22.6274], atol=1e-4)
    rounded = multilevel_anchors((128, 128), SIZES, RATIOS, offset=0.0, round_base_anchors=True)["P2"]
    np.testing.assert_array_equal(rounded[0], [-11, -23, 11, 23])
