"""ImageNet backbone files for --pretrained (model.backbone.weights; weights/imagenet_backbones.py).

A torchvision `resnet50(weights=None)` with seeded random weights and random BN statistics is saved with
torch.save under a torch.hub name carrying its SHA-256 prefix (the layout of resnet50-0676ba61.pth: conv1,
bn1, layer*, fc, num_batches_tracked), loaded through the config's model.backbone.weights into the Backbone
as model.py builds it (weights/initial.py's step after building), and our C2..C5 are compared with
torchvision's eval-mode layer1..layer4 outputs.
detectron2's MSRA R-50.pkl: the same network with each stage's stride moved to the first 1x1 conv, its BN
folded into Caffe2 AffineChannel scale / bias blobs under the Caffe2 names, pickled as {"blobs": ...}; the
oracle reads the BGR image, we the RGB one.
"""
import hashlib
import os

import numpy as np
import pytest

from tests.torch_oracle import import_torchvision, resnet_features

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf import config as config_lib  # noqa: E402
from maskrcnn_tf import model as model_lib  # noqa: E402
from maskrcnn_tf.layers.backbone import Backbone  # noqa: E402
from maskrcnn_tf.weights import imagenet_backbones  # noqa: E402
from maskrcnn_tf.weights.initial import load_backbone_weights  # noqa: E402

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
    """The backbone as train.py --pretrained=PATH makes it: model.backbone.weights, model.py's Backbone, then
    the fresh run's load_initial_weights step (weights/initial.py)."""
    cfg = config_lib.replace(config_lib.get_preset(preset), **{"model.backbone.weights": path, **overrides})
    b = cfg.model.backbone
    imagenet_backbones.check_model_config(path, cfg.model)
    backbone = Backbone(name=b.name, freeze_at=b.freeze_at, **model_lib._backbone_conventions(b))
    load_backbone_weights(backbone, b.weights)
    return backbone


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
    expected = resnet_features(resnet, images)
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
        load_backbone_weights(Backbone(name="resnet50", stride_in_3x3=True, norm_epsilon=1e-5), renamed)
    assert "\n" not in str(e.value)


# MSRA / Caffe2 R-50.pkl (detectron2's ImageNetPretrained/MSRA/R-50.pkl): stride in the 1x1, BGR, AffineChannel.
D2_PRESET = "detectron2_r50_fpn_1x"  # stride in the 1x1 conv, eps 1e-5, BGR means (RGB order), std 1
C2_PARTS = (("conv1", "branch2a"), ("conv2", "branch2b"), ("conv3", "branch2c"))


def _torch_resnet50_stride_in_1x1():
    """The same random resnet50 with each first block's stride moved from its 3x3 to its first 1x1 conv
    (detectron2's RESNETS.STRIDE_IN_1X1=True, the MSRA weights' network)."""
    resnet = _torch_resnet50()
    for layer in (resnet.layer2, resnet.layer3, resnet.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return resnet


def _caffe2_blobs(resnet):
    """resnet's weights under the Caffe2 names convert_basic_c2_names reads, BN folded into AffineChannel
    scale / bias (s = gamma / sqrt(var + eps), b = beta - mean * s), fc1000 and *_momentum blobs included."""
    def affine(bn):
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return s.numpy().astype(np.float32), (bn.bias - bn.running_mean * s).numpy().astype(np.float32)

    blobs = {}
    with torch.no_grad():
        blobs["conv1_w"] = resnet.conv1.weight.numpy().copy()
        blobs["res_conv1_bn_s"], blobs["res_conv1_bn_b"] = affine(resnet.bn1)
        for stage, layer in zip((2, 3, 4, 5), (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)):
            for b, block in enumerate(layer):
                parts = [(getattr(block, c), getattr(block, f"bn{c[-1]}"), branch) for c, branch in C2_PARTS]
                if block.downsample is not None:
                    parts.append((block.downsample[0], block.downsample[1], "branch1"))
                for conv, bn, branch in parts:
                    name = f"res{stage}_{b}_{branch}"
                    blobs[f"{name}_w"] = conv.weight.numpy().copy()
                    blobs[f"{name}_bn_s"], blobs[f"{name}_bn_b"] = affine(bn)
                    blobs[f"{name}_w_momentum"] = np.zeros_like(blobs[f"{name}_w"])
        blobs["fc1000_w"] = resnet.fc.weight.numpy().copy()
        blobs["fc1000_b"] = resnet.fc.bias.numpy().copy()
    return blobs


@pytest.fixture(scope="module")
def caffe2_file(tmp_path_factory):
    import pickle

    resnet = _torch_resnet50_stride_in_1x1()
    path = str(tmp_path_factory.mktemp("c2") / "R-50.pkl")
    with open(path, "wb") as f:
        pickle.dump({"blobs": _caffe2_blobs(resnet)}, f, protocol=2)
    return resnet, path


def test_caffe2_r50_pkl_gives_the_msra_network_features(caffe2_file):
    resnet, path = caffe2_file
    backbone = _pretrained_backbone(D2_PRESET, path)
    images = _images()  # RGB for us; the MSRA network reads BGR
    expected = resnet_features(resnet, np.ascontiguousarray(images[..., ::-1]))
    error = _max_relative_error(backbone(tf.constant(images)), expected)
    assert error < RELATIVE, error


def test_caffe2_conventions_mismatch_fails_in_one_line(caffe2_file):
    _, path = caffe2_file
    with pytest.raises(ValueError, match=r"R-50\.pkl is an MSRA/Caffe2 ImageNet ResNet .*; the model's conventions "
                                         r"differ: set model\.pixel_mean=\(123\.675, 116\.28, 103\.53\) ") as e:
        _pretrained_backbone("coco_r50_fpn_1x", path)  # keras' caffe means 123.68, 116.779, 103.939
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"set model\.backbone\.stride_in_3x3=False \(--params_override\)$"):
        load_backbone_weights(Backbone(name="resnet50", stride_in_3x3=True, norm_epsilon=1e-5), path)
