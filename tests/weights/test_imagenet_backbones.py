"""ImageNet backbone files for --pretrained (model.backbone.weights; weights/imagenet_backbones.py).

A torchvision `resnet50(weights=None)` with seeded random weights and random BN statistics is saved with
torch.save under a torch.hub name carrying its SHA-256 prefix (the layout of resnet50-0676ba61.pth: conv1,
bn1, layer*, fc, num_batches_tracked), loaded through the config's model.backbone.weights into the Backbone
as model.py builds it, and our C2..C5 are compared with torchvision's eval-mode layer1..layer4 outputs.
"""
import hashlib
import os

import numpy as np
import pytest

from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf import config as config_lib  # noqa: E402
from maskrcnn_tf import model as model_lib  # noqa: E402
from maskrcnn_tf.layers.backbone import Backbone  # noqa: E402
from maskrcnn_tf.weights import imagenet_backbones  # noqa: E402

SIZE = 64
RELATIVE = 1e-4
TV_PRESET = "torchvision_maskrcnn_r50_fpn_v2"  # stride in the 3x3, eps 1e-5, ImageNet pixel statistics


def _torch_resnet50():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for module in resnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.running_var[:4] = 1e-4  # small variances: the epsilon matters
                module.weight[:4] = 1e-2
                module.num_batches_tracked.fill_(1000)
    return resnet.eval()


def _torch_features(resnet, images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = {}
    with torch.no_grad():
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        for level, layer in zip((2, 3, 4, 5), (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)):
            x = layer(x)
            out[f"C{level}"] = x.permute(0, 2, 3, 1).numpy()
    return out


def _images():
    return np.random.default_rng(1).normal(0.0, 1.0, (2, SIZE, SIZE, 3)).astype(np.float32)


def _hub_named(path, stem):
    """Renames `path` to torch.hub's "<stem>-<first 8 hex digits of its SHA-256>.pth"."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    named = os.path.join(os.path.dirname(path), f"{stem}-{digest[:8]}{os.path.splitext(path)[1]}")
    os.rename(path, named)
    return named


def _pretrained_backbone(preset, path, **overrides):
    """The backbone as train.py --pretrained=PATH builds it: model.backbone.weights, then model.py's Backbone."""
    cfg = config_lib.replace(config_lib.get_preset(preset), **{"model.backbone.weights": path, **overrides})
    b = cfg.model.backbone
    imagenet_backbones.check_model_config(path, cfg.model)
    return Backbone(name=b.name, weights=b.weights, freeze_at=b.freeze_at, **model_lib._backbone_conventions(b))


def _max_relative_error(ours, expected):
    return max(float(np.abs(ours[k].numpy() - v).max() / np.abs(v).max()) for k, v in expected.items())


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    resnet = _torch_resnet50()
    path = str(tmp_path_factory.mktemp("tv") / "resnet50.pth")
    torch.save(resnet.state_dict(), path)  # fc.* and num_batches_tracked included, as published
    return resnet, _hub_named(path, "resnet50")


def test_torchvision_imagenet_pth_gives_torchvision_features(torchvision_file):
    resnet, path = torchvision_file
    backbone = _pretrained_backbone(TV_PRESET, path)
    images = _images()
    expected = _torch_features(resnet, images)
    error = _max_relative_error(backbone(tf.constant(images)), expected)
    assert error < RELATIVE, error


def test_torchvision_conventions_mismatch_fails_in_one_line(torchvision_file):
    _, path = torchvision_file
    # The v1 preset runs COCO_V1's eps 0: an ImageNet file needs 1e-5.
    with pytest.raises(ValueError, match=r"set model\.backbone\.norm_epsilon=1e-05 \(--params_override\)$") as e:
        _pretrained_backbone("torchvision_maskrcnn_r50_fpn", path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"set model\.pixel_mean=\(123\.675, 116\.28, 103\.53\), "
                                         r"model\.pixel_std=\(58\.395, 57\.12, 57\.375\)") as e:
        _pretrained_backbone(TV_PRESET, path, **{"model.pixel_mean": (103.53, 116.28, 123.675),
                                                 "model.pixel_std": (1.0, 1.0, 1.0)})
    assert "\n" not in str(e.value)


def test_torchvision_hash_suffix_is_checked(torchvision_file, tmp_path):
    _, path = torchvision_file
    renamed = str(tmp_path / "resnet50-0676ba61.pth")
    with open(path, "rb") as src, open(renamed, "wb") as dst:
        dst.write(src.read())
    with pytest.raises(ValueError, match=r"resnet50-0676ba61\.pth: its SHA-256 is [0-9a-f]{64}, but the file name "
                                         r"says it starts with 0676ba61: a truncated or tampered download") as e:
        Backbone(name="resnet50", weights=renamed, stride_in_3x3=True, norm_epsilon=1e-5)
    assert "\n" not in str(e.value)
