"""Backbone conventions against torchvision's ResNet-50 (the executable oracle): the stride in the 3x3 conv with
torch's symmetric padding, the frozen-BN epsilon, and --pretrained=FILE.pth (a torchvision ImageNet
checkpoint read without torch and mapped by weights/torchvision_mapping.py).

The reference has random weights and random BN statistics; in every BN four channels have a tiny running
variance (1e-4, with gamma 1e-2 so they do not blow up) so that the epsilon matters: eps 0 vs keras'
1.001e-5 changes those channels by ~5%.
"""
import numpy as np
import pytest

from tests.torch_oracle import import_torchvision, resnet_features

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf.layers.backbone import Backbone  # noqa: E402
from maskrcnn_tf.weights import torchvision_mapping  # noqa: E402
from maskrcnn_tf.weights.initial import load_backbone_weights  # noqa: E402

SIZE = 64  # C5 is 2 x 2: every stride-2 conv sees an even input, where TF's "SAME" would pad (0, 1)
TINY_VARIANCE = 1e-4


def _torch_resnet50(eps):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for module in resnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.running_var[:4] = TINY_VARIANCE
                module.weight[:4] = TINY_VARIANCE**0.5
                module.eps = eps
    return resnet



def _state_dict(resnet):
    return {k: v.numpy() for k, v in resnet.state_dict().items()}


def _images():
    return np.random.default_rng(1).normal(0.0, 1.0, (2, SIZE, SIZE, 3)).astype(np.float32)


def _assert_close(ours, expected, atol_fraction=1e-4):
    for level, value in expected.items():
        assert np.isfinite(value).all(), level
        scale = np.abs(value).max()
        np.testing.assert_allclose(ours[level].numpy(), value, rtol=0, atol=atol_fraction * scale, err_msg=level)


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_stride_in_3x3_and_epsilon_reproduce_torchvision_resnet50(eps):
    resnet = _torch_resnet50(eps)
    backbone = Backbone(name="resnet50", freeze_at=0, stride_in_3x3=True, norm_epsilon=eps)
    torchvision_mapping.assign_torchvision_backbone(backbone, _state_dict(resnet))
    images = _images()
    expected = resnet_features(resnet, images)
    _assert_close(backbone(tf.constant(images)), expected)


def test_each_convention_is_needed():
    """The default placement (1x1) or the default epsilon alone give different features: both fields matter."""
    resnet = _torch_resnet50(0.0)
    images = _images()
    expected = resnet_features(resnet, images)["C5"]
    for kwargs in (dict(stride_in_3x3=False, norm_epsilon=0.0), dict(stride_in_3x3=True)):
        backbone = Backbone(name="resnet50", freeze_at=0, **kwargs)
        torchvision_mapping.assign_torchvision_backbone(backbone, _state_dict(resnet))
        error = np.abs(backbone(tf.constant(images))["C5"].numpy() - expected).max()
        assert error > 1e-2 * np.abs(expected).max(), kwargs


def test_unfolded_path_refuses_stride_in_3x3():
    backbone = Backbone(name="resnet50", stride_in_3x3=True, norm_epsilon=0.0, fold_batchnorm=False)
    with pytest.raises(ValueError, match="stride_in_3x3=True needs fold_batchnorm=True"):
        backbone(tf.zeros([1, SIZE, SIZE, 3]))


def test_norm_epsilon_sets_every_batchnorm_and_default_is_keras():
    default = Backbone(name="resnet50")
    custom = Backbone(name="resnet50", norm_epsilon=0.0)
    norms = lambda b: [l for l in b.network.layers if l.name.endswith("_bn")]  # noqa: E731
    assert {n.epsilon for n in norms(default)} == {1.001e-5}
    assert {n.epsilon for n in norms(custom)} == {0.0}
    assert custom.get_config()["norm_epsilon"] == 0.0


def test_pretrained_pth_file_loads_torchvision_imagenet_resnet(tmp_path):
    resnet = _torch_resnet50(1e-5)
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(resnet.state_dict(), path)  # a classification checkpoint: fc.* is ignored
    backbone = Backbone(name="resnet50", freeze_at=0, stride_in_3x3=True, norm_epsilon=1e-5)
    load_backbone_weights(backbone, str(path))
    images = _images()
    _assert_close(backbone(tf.constant(images)), resnet_features(resnet, images))


def test_pretrained_pth_needs_stride_in_3x3_and_the_right_depth(tmp_path):
    path = tmp_path / "r.pth"
    with pytest.raises(ValueError, match="set stride_in_3x3=True"):  # from the name: the file does not exist yet
        load_backbone_weights(Backbone(name="resnet50"), str(path))
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"r\.pth: layer3\.\d+\.\S+: the model has no variable conv4_block"):
        load_backbone_weights(Backbone(name="resnet50", stride_in_3x3=True), str(path))
