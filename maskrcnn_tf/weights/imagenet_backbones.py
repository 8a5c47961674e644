"""ImageNet classification ResNets as backbone weights (`train.py --pretrained=FILE`, model.backbone.weights).

Formats, told apart by the file name's extension:
- ".pth": torchvision's ImageNet ResNet-50/101 state dicts (`resnet50-0676ba61.pth` IMAGENET1K_V1,
  `resnet50-11ad3fa6.pth` IMAGENET1K_V2; torchvision/models/resnet.py): conv1.weight, bn1.{weight, bias,
  running_mean, running_var}, layer{1..4}.{b}.conv{1,2,3}.weight, .bn{1,2,3}.*, .downsample.{0,1}.*, fc.*.
  Read without torch (torch_pickle, the allow-list unpickler) and mapped by torchvision_mapping's backbone
  mapping (the detector importer's backbone.body.* mapping with an empty key prefix); fc.* (the ImageNet
  classifier) and num_batches_tracked counters are dropped, any other unused key is an error naming it.
  Conventions: trainable nn.BatchNorm2d (eps 1e-5), the stride in the 3x3 conv (Bottleneck.conv2), RGB input
  in 0..1 normalised with the ImageNet mean / std, i.e. 255 x those in our 0..255 units.

The file name's hash suffix ("-<8+ hex digits>.pth", torch.hub's convention) is checked first with the
importer's `check_integrity` (its SHA-256 must start with it): a mismatch is a one-line error. The preset's
conventions must be the file's (`mismatches`): when they are not, one line names the fields to set, e.g.
"set model.backbone.norm_epsilon=1e-05". The Backbone layer knows its stride placement and epsilon and
checks them on loading; the pixel statistics live in the model config (`check_model_config`).
"""

import math
import os
from typing import List, NamedTuple, Optional, Sequence

from maskrcnn_tf.weights import importer, torch_pickle, torchvision_mapping

TORCHVISION = "torchvision"
EXTENSIONS = {".pth": TORCHVISION}
# keras.applications' BatchNormalization epsilon: what Backbone(norm_epsilon=None) runs with.
KERAS_NORM_EPSILON = 1.001e-5
TORCH_BATCH_NORM_EPSILON = 1e-5
# ImageNet mean / std (torchvision's transforms, 0..1 scale) in 0..255 units, RGB: config.TORCHVISION_PIXEL_*.
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)
HASH_HINT = "download it again"


class Conventions(NamedTuple):
    description: str
    stride_in_3x3: bool
    norm_epsilon: float
    pixel_mean: Sequence[float]  # RGB, 0..255
    pixel_std: Sequence[float]


CONVENTIONS = {
    TORCHVISION: Conventions("a torchvision ImageNet ResNet (stride in the 3x3 conv, BatchNorm eps 1e-5, RGB "
                             "normalised by the ImageNet mean/std)", True, TORCH_BATCH_NORM_EPSILON,
                             IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD),
}


def file_format(path) -> Optional[str]:
    """TORCHVISION for an ImageNet backbone file this module reads (by extension), else None."""
    return EXTENSIONS.get(os.path.splitext(os.fspath(path))[1].lower())


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _values(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def mismatches(fmt: str, stride_in_3x3: bool, norm_epsilon: Optional[float], pixel_mean=None,
               pixel_std=None) -> List[str]:
    """["model.backbone.norm_epsilon=1e-05", ...]: the settings the model needs for a file of `fmt`, for
    every convention it has otherwise (norm_epsilon None: keras.applications' 1.001e-5; pixel statistics
    None: not checked)."""
    want = CONVENTIONS[fmt]
    fields = []
    if bool(stride_in_3x3) != want.stride_in_3x3:
        fields.append(f"model.backbone.stride_in_3x3={want.stride_in_3x3}")
    if not _close(KERAS_NORM_EPSILON if norm_epsilon is None else norm_epsilon, want.norm_epsilon):
        fields.append(f"model.backbone.norm_epsilon={want.norm_epsilon:g}")
    if pixel_mean is not None and not all(_close(a, b) for a, b in zip(pixel_mean, want.pixel_mean)):
        fields.append(f"model.pixel_mean={_values(want.pixel_mean)}")
    if pixel_std is not None and not all(_close(a, b) for a, b in zip(pixel_std, want.pixel_std)):
        fields.append(f"model.pixel_std={_values(want.pixel_std)}")
    return fields


def check_conventions(path, fmt: str, stride_in_3x3: bool, norm_epsilon: Optional[float], pixel_mean=None,
                      pixel_std=None) -> None:
    """ValueError in one line naming the fields to set when the model's conventions are not the file's."""
    fields = mismatches(fmt, stride_in_3x3, norm_epsilon, pixel_mean, pixel_std)
    if fields:
        raise ValueError(f"{os.fspath(path)} is {CONVENTIONS[fmt].description}; the model's conventions differ: "
                         f"set {', '.join(fields)} (--params_override)")


def check_model_config(path, model_cfg) -> None:
    """check_conventions against a config.ModelConfig (backbone fields and pixel statistics); no-op for a
    weights value this module does not read."""
    fmt = file_format(path)
    if fmt is not None:
        b = model_cfg.backbone
        check_conventions(path, fmt, b.stride_in_3x3, b.norm_epsilon, model_cfg.pixel_mean, model_cfg.pixel_std)


def load_backbone(network, path, stride_in_3x3: bool, norm_epsilon: Optional[float]) -> None:
    """Checks the name's hash, reads, maps and assigns an ImageNet backbone file of `file_format` into the
    keras.applications ResNet `network`, then checks the conventions. ValueError in one line starting with
    the file otherwise (network untouched unless only the conventions differ)."""
    path = os.fspath(path)
    fmt = file_format(path)
    if fmt is None:
        raise ValueError(f"{path}: not an ImageNet backbone file ({', '.join(EXTENSIONS)})")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    importer.check_integrity(path, skip_hint=HASH_HINT)
    state_dict = torch_pickle.load_state_dict(path)
    torchvision_mapping.assign_torchvision_resnet(network, state_dict, source=path)
    check_conventions(path, fmt, stride_in_3x3, norm_epsilon)
