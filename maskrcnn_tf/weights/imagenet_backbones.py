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
- ".pkl": the MSRA / Caffe2-named ImageNet ResNets detectron2's configs start from (`R-50.pkl`, `R-101.pkl`,
  MODEL.WEIGHTS "detectron2://ImageNetPretrained/MSRA/R-50.pkl"): a pickle of {name: np.ndarray}, or of
  {"blobs": {...}}, read with the allow-list unpickler (detectron2_pickle). Names as detectron2's
  checkpoint/c2_model_loading.py convert_basic_c2_names reads them: conv1_w (stem, BGR input channels),
  res_conv1_bn_{s,b}, res{2..5}_{b}_branch{1,2a,2b,2c}_w and _bn_{s,b} (branch1 = the projection shortcut,
  2a/2b/2c = conv1/2/3 of the bottleneck), fc1000_{w,b} (dropped), *_momentum (dropped, as detectron2's
  _load_file does). The _bn_s / _bn_b pairs are Caffe2 AffineChannel: y = x * s + b, no statistics.
  detectron2 loads them into FrozenBatchNorm2d whose running_var stays at its initial 1 - eps and
  running_mean at 0, so its scale is exactly s; here moving_mean 0, moving_variance 1 - eps (the model's
  epsilon), which gives s for any epsilon. Conventions: the stride in the first 1x1 conv
  (RESNETS.STRIDE_IN_1X1, stride_in_3x3=False), BGR input minus the BGR means 103.53, 116.28, 123.675 with
  std 1 (0..255; our RGB order 123.675, 116.28, 103.53): the stem kernel's input channels are reversed on
  loading so the backbone takes RGB, as the detectron2 importer does.

The file name's hash suffix ("-<8+ hex digits>.pth", torch.hub's convention) is checked first with the
importer's `check_integrity` (its SHA-256 must start with it): a mismatch is a one-line error. The preset's
conventions must be the file's (`mismatches`): when they are not, one line names the fields to set, e.g.
"set model.backbone.norm_epsilon=1e-05". The Backbone layer knows its stride placement and epsilon and
checks them on loading; the pixel statistics live in the model config (`check_model_config`).
"""

import math
import os
import re
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.weights import detectron2_pickle, importer, layout, torch_pickle, torchvision_mapping

TORCHVISION, CAFFE2 = "torchvision", "caffe2"
EXTENSIONS = {".pth": TORCHVISION, ".pkl": CAFFE2}
# Caffe2 names (convert_basic_c2_names): branch -> our block part (keras.applications' _0.._3).
C2_BRANCHES = {"branch1": "0", "branch2a": "1", "branch2b": "2", "branch2c": "3"}
_C2_BLOCK = re.compile(r"^res([2-5])_(\d+)_(branch1|branch2a|branch2b|branch2c)_(w|bn_s|bn_b)$")
C2_STEM = {"conv1_w": ("conv1", "w"), "res_conv1_bn_s": ("conv1", "bn_s"), "res_conv1_bn_b": ("conv1", "bn_b")}
C2_CLASSIFIER_PREFIX = "fc1000_"
C2_DROPPED_SUFFIX = "_momentum"
C2_BLOBS = "blobs."
# detectron2's MSRA configs: PIXEL_MEAN [103.530, 116.280, 123.675] (BGR), PIXEL_STD [1, 1, 1].
C2_PIXEL_MEAN = (123.675, 116.28, 103.53)
C2_PIXEL_STD = (1.0, 1.0, 1.0)
TORCH_BATCH_NORM_EPSILON = 1e-5
# ImageNet mean / std (torchvision's transforms, 0..1 scale) in 0..255 units, RGB: config.TORCHVISION_PIXEL_*.
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)
HASH_HINT = "download it again"


class Conventions(NamedTuple):
    description: str
    stride_in_3x3: bool
    norm_epsilon: Optional[float]  # None: any (the mapping makes the file's scale exact for every epsilon)
    pixel_mean: Sequence[float]  # RGB, 0..255
    pixel_std: Sequence[float]


CONVENTIONS = {
    TORCHVISION: Conventions("a torchvision ImageNet ResNet (stride in the 3x3 conv, BatchNorm eps 1e-5, RGB "
                             "normalised by the ImageNet mean/std)", True, TORCH_BATCH_NORM_EPSILON,
                             IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD),
    CAFFE2: Conventions("an MSRA/Caffe2 ImageNet ResNet (stride in the first 1x1 conv, BGR minus the BGR means "
                        "103.53, 116.28, 123.675, std 1)", False, None, C2_PIXEL_MEAN, C2_PIXEL_STD),
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
    running_epsilon = config_lib.KERAS_NORM_EPSILON if norm_epsilon is None else norm_epsilon
    if want.norm_epsilon is not None and not _close(running_epsilon, want.norm_epsilon):
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
    if fmt == TORCHVISION:
        state_dict = torch_pickle.load_state_dict(path)
        torchvision_mapping.assign_torchvision_resnet(network, state_dict, source=path)
    else:
        state_dict = detectron2_pickle.load_state_dict(path)
        epsilon = config_lib.KERAS_NORM_EPSILON if norm_epsilon is None else float(norm_epsilon)
        try:
            values, sources = caffe2_variables(state_dict, epsilon)
            layout.assign(network, values, sources, torchvision_mapping.BACKBONE_REQUIRED_PREFIXES)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    check_conventions(path, fmt, stride_in_3x3, norm_epsilon)


def caffe2_variables(state_dict: Dict[str, np.ndarray], norm_epsilon: float):
    """({keras.applications ResNet variable path: array}, {path: Caffe2 name}) of an MSRA R-50 / R-101 blob
    dict (module docstring). ValueError naming the first key that has no place (another architecture)."""
    blobs = {}
    for key, value in state_dict.items():
        key = key[len(C2_BLOBS):] if key.startswith(C2_BLOBS) else key
        if not key.endswith(C2_DROPPED_SUFFIX) and not key.startswith(C2_CLASSIFIER_PREFIX):
            blobs[key] = np.asarray(value, np.float32)
    values, sources = {}, {}
    for key, value in sorted(blobs.items()):
        if key in C2_STEM:
            ours, kind = C2_STEM[key]
        else:
            match = _C2_BLOCK.match(key)
            if match is None:
                raise ValueError(f"key {key} (shape {tuple(value.shape)}) has no place in this backbone "
                                 "(another architecture?)")
            stage, block, branch, kind = match.groups()
            ours = f"conv{stage}_block{int(block) + 1}_{C2_BRANCHES[branch]}"
        if kind == "w":
            kernel = layout.conv_kernel(value)  # OIHW -> HWIO
            if ours == "conv1":
                kernel = kernel[:, :, ::-1, :]  # BGR -> RGB input channels
            values[f"{ours}_conv/kernel"], sources[f"{ours}_conv/kernel"] = kernel, key
            values[f"{ours}_conv/bias"] = np.zeros(kernel.shape[-1], np.float32)
            sources[f"{ours}_conv/bias"] = key
        else:
            variable = "gamma" if kind == "bn_s" else "beta"
            values[f"{ours}_bn/{variable}"], sources[f"{ours}_bn/{variable}"] = value, key
            if kind == "bn_s":  # AffineChannel: no statistics; scale s / sqrt(1 - eps + eps) = s
                values[f"{ours}_bn/moving_mean"] = np.zeros_like(value)
                values[f"{ours}_bn/moving_variance"] = np.full_like(value, 1.0 - norm_epsilon)
                sources[f"{ours}_bn/moving_mean"] = sources[f"{ours}_bn/moving_variance"] = key
    return values, sources
