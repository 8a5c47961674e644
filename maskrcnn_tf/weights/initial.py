"""The backbone's initial weights (`model.backbone.weights`, train.py --pretrained), loaded into a built model.

Building and loading are two steps, as keras-hub's `from_preset(load_weights=...)` and torchvision's
builders keep them: `build_model(cfg)` never reads a file or the network, and `load_initial_weights(model,
cfg.model.backbone.weights)` fills the backbone afterwards. Only a fresh training run calls it
(checkpointing.restore): a resumed run, a restored run directory (run_dir.restore_model), a `.keras` file
(MaskRCNN.from_config) and an import (weights/importer.py) take every weight from their checkpoint.

Sources:
- None: nothing (the layers' own initialisation).
- "imagenet" (ResNets): keras.applications' ResNet50/101 with `weights="imagenet"` (it downloads the notop
  file and checks its hash; needs internet), copied into the backbone layer by layer by name.
- ".pth" / ".pkl": a torchvision or MSRA/Caffe2 ImageNet ResNet, read, checked and mapped by
  weights/imagenet_backbones.py. A torchvision file needs stride_in_3x3=True, checked from the name before
  the file is read.
- Any other path: a Keras weights file loaded with `Model.load_weights` into the backbone's network: a
  Keras 3 `.weights.h5` saved from the same keras.applications network, or the legacy Keras-applications
  `*_notop.h5` file; for the tiny backbone a file saved with `Backbone(name="tiny", ...).network.save_weights`.

keras.applications' ResNet weights (both "imagenet" and Keras files of ResNets) are caffe weights, trained
on BGR images minus the BGR mean: after loading, the input-channel axis of the stem conv kernel is
reversed so the backbone takes RGB (normalised by config pixel_mean/std, whose defaults are the caffe means
in RGB order); conv(rgb, kernel[:, :, ::-1]) == conv(bgr, kernel) exactly. So do not load a file saved
from a backbone's own (already reversed) network into a ResNet: restore trained models from checkpoints.
The tiny backbone has no ImageNet weights ("imagenet" raises) and its files load without reversal.
"""
import os
from typing import Optional

import tensorflow as tf

from maskrcnn_tf.layers import backbone as backbone_lib
from maskrcnn_tf.weights import imagenet_backbones

IMAGENET = "imagenet"
# The stem conv of keras.applications ResNets; its kernel is [7, 7, 3 (BGR), 64].
STEM_CONV = "conv1_conv"
INPUT_CHANNEL_AXIS = 2
# torchvision ImageNet classification checkpoints (--pretrained=FILE.pth).
TORCH_CHECKPOINT_SUFFIX = ".pth"


def check_source(backbone, source: Optional[str]) -> None:
    """ValueError when `source` cannot fill `backbone` for a reason its name tells (no file is read)."""
    if backbone.backbone_name == backbone_lib.TINY and source == IMAGENET:
        raise ValueError("Backbone: the tiny backbone has no ImageNet weights; use weights=None or a path")
    if (backbone.backbone_name != backbone_lib.TINY and isinstance(source, str)
            and source.endswith(TORCH_CHECKPOINT_SUFFIX) and not backbone.stride_in_3x3):
        raise ValueError(f"Backbone: {source} is a torchvision checkpoint, whose ResNets have the stride "
                         "in the 3x3 convs; set stride_in_3x3=True (model.backbone.stride_in_3x3)")


def load_backbone_weights(backbone, source: Optional[str]) -> None:
    """Fills a layers.backbone.Backbone from `source` (module docstring); ValueError naming the file otherwise."""
    check_source(backbone, source)
    if source is None:
        return
    network = backbone.network
    if backbone.backbone_name == backbone_lib.TINY:
        _load_keras_file(network, source)
        return
    if imagenet_backbones.file_format(source) is not None:
        # torchvision ImageNet ResNet (RGB): no channel reversal; MSRA/Caffe2 R-50.pkl: BGR stem reversed by
        # the mapping. The name's hash suffix and the stride / epsilon conventions are checked there.
        imagenet_backbones.load_backbone(network, source, backbone.stride_in_3x3, backbone.norm_epsilon)
        return
    if source == IMAGENET:
        _copy_keras_imagenet(network, backbone.backbone_name)
    else:
        _load_keras_file(network, source)
    # caffe BGR -> RGB: conv(rgb, kernel[:, :, ::-1]) == conv(bgr, kernel).
    kernel = network.get_layer(STEM_CONV).kernel
    kernel.assign(tf.reverse(kernel, axis=[INPUT_CHANNEL_AXIS]))


def load_initial_weights(model, source: Optional[str]) -> None:
    """Fills the backbone of a built MaskRCNN from `source` = cfg.model.backbone.weights (module docstring)."""
    load_backbone_weights(model.backbone, source)


def _load_keras_file(network, path: str) -> None:
    if not tf.io.gfile.exists(path):
        raise ValueError(f"{os.fspath(path)}: no such file")
    network.load_weights(path)


def _copy_keras_imagenet(network, name: str) -> None:
    """keras.applications' ImageNet weights of ResNet `name` (downloaded once into ~/.keras), by layer name."""
    reference = backbone_lib.RESNETS[name](include_top=False, input_shape=(None, None, 3), weights=IMAGENET)
    filled = {layer.name: layer for layer in reference.layers if layer.weights}
    targets = {layer.name: layer for layer in network.layers if layer.weights}
    if set(targets) != set(filled):
        odd = sorted(set(targets) ^ set(filled))
        raise ValueError(f"keras.applications {name} ImageNet weights do not fit the backbone: layer {odd[0]} "
                         "is in only one of them")
    for layer_name, layer in targets.items():
        layer.set_weights(filled[layer_name].get_weights())
