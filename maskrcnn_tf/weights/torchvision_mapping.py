"""torchvision Mask / Faster R-CNN R50-FPN weights -> our variables, and torchvision ImageNet ResNets -> the backbone.

assign_torchvision_weights(model, state_dict): a `maskrcnn_resnet50_fpn` / `fasterrcnn_resnet50_fpn`
state dict (torchvision/models/detection/: backbone_utils.py, resnet.py, ops/feature_pyramid_network.py,
rpn.py, faster_rcnn.py, mask_rcnn.py) onto a model built with the torchvision_maskrcnn_r50_fpn preset:
  backbone.body.conv1 / bn1                    conv1_conv / conv1_bn
  backbone.body.layer{n}.{b}.conv{i} / bn{i}   conv{n+1}_block{b+1}_{i}_conv / _{i}_bn
  backbone.body.layer{n}.{b}.downsample.0 / .1 conv{n+1}_block{b+1}_0_conv / _0_bn
  backbone.fpn.inner_blocks.{i}.0              fpn/lateral_P{i+2}
  backbone.fpn.layer_blocks.{i}.0              fpn/output_P{i+2}
  rpn.head.conv.0.0, .cls_logits, .bbox_pred   rpn_head/conv, objectness, box_deltas
  roi_heads.box_head.fc6, fc7                  box_head/fc1, fc2 (fc6 reads NCHW-flattened RoI features)
  roi_heads.box_predictor.cls_score, bbox_pred box_head/classifier, box_regressor
  roi_heads.mask_head.{i}.0                    mask_head/conv{i+1}
  roi_heads.mask_predictor.conv5_mask          mask_head/deconv
  roi_heads.mask_predictor.mask_fcn_logits     mask_head/predictor (row 0, background, dropped)
Checkpoints saved by older torchvision releases (the published COCO_V1 files among them) name some of
these differently (fpn inner_blocks.{i}.weight, rpn.head.conv.weight, mask_head.mask_fcn{i}.weight);
torchvision upgrades them on load and so does `canonical_key`.

torchvision's v2 detectors (`maskrcnn_resnet50_fpn_v2`, `fasterrcnn_resnet50_fpn_v2`; the
torchvision_maskrcnn_r50_fpn_v2 preset) differ in the FPN and the heads; `architecture(state_dict)`
tells them apart by their keys (V2_KEYS / V1_KEYS):
  backbone.fpn.inner_blocks.{i}.0 / .1         fpn/lateral_P{i+2} (no bias) / lateral_P{i+2}_norm (BatchNorm)
  backbone.fpn.layer_blocks.{i}.0 / .1         fpn/output_P{i+2} (no bias) / output_P{i+2}_norm
  rpn.head.conv.{j}.0                          rpn_head/conv, conv2 (two 3x3 convs with bias)
  roi_heads.box_head.{j}.0 / .1 (j = 0..3)     box_head/conv{j+1} (no bias) / conv{j+1}_norm
  roi_heads.box_head.5 (after Flatten at 4)    box_head/fc1 (reads the last conv's NCHW-flattened output)
  roi_heads.mask_head.{i}.0 / .1               mask_head/conv{i+1} (no bias) / conv{i+1}_norm
The predictors and the backbone map as in v1. The old key forms above are upgraded for v2 files too
(torchvision renames only weight/bias keys: `{block}.{i}.weight`, `rpn.head.conv.weight`,
`mask_head.mask_fcn{i}.weight`, so a v2 file's `.1.*` BatchNorm keys and `rpn.head.conv.1.0.*` keep
their names). `check_architecture` refuses a v1 file in a v2 model and the reverse in one line that
names the file's builder and the --config to import it with.

Conventions:
- Background: torchvision's classifier column 0 is background, like ours; its COCO heads have 91
  outputs (background + category ids 1..90), so the model has K = 90 and class i = COCO id i.
- Box deltas: every group of four goes from [dx, dy, dw, dh] to [dy, dx, dh, dw] (RPN and box head).
- Input: RGB, no channel reversal (the preset normalises with ImageNet mean/std in 0..255 units).
- Backbone conv biases (absent in torchvision) are set to 0. The ResNets have the stride in the 3x3
  convs and COCO_V1 runs its frozen BN with eps 0: the preset's backbone fields, not weights.
- num_batches_tracked buffers (nn.BatchNorm2d's counters; torchvision's FrozenBatchNorm2d has none and
  drops them on load) are dropped; their presence in the backbone tells the importer the model ran
  nn.BatchNorm2d, eps 1e-5 (`backbone_batch_norm_counters`). A torchvision state dict has no other
  buffers (AnchorGenerator.cell_anchors and the transform's image_mean / image_std are plain attributes).
  Any other key the mapping does not use is an error naming it (a keypoint head, a ResNet-101's extra
  blocks), as is a shape mismatch (expected and found).
"""

import re
from typing import Dict, Optional, Tuple

import numpy as np

from maskrcnn_tf.weights import layout

BODY = "backbone.body."
MASK_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
# The variables a detector import must fill (keras.applications backbone names start with conv).
REQUIRED_PREFIXES = ("conv", "mask_rcnn/fpn/", "mask_rcnn/rpn_head/", "mask_rcnn/box_head/",
                     "mask_rcnn/mask_head/")
BACKBONE_REQUIRED_PREFIXES = ("conv",)
IGNORED_SUFFIX = "num_batches_tracked"
# Classification checkpoints: the ImageNet classifier has no place in a detector backbone.
CLASSIFIER_PREFIX = "fc."
FPN_LEVELS = (2, 3, 4, 5)
BN_BUFFERS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
              ("moving_variance", "running_var"))
_BLOCK_KEY = re.compile(r"^layer(\d)\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.")
# Old-release key -> current key (torchvision's own _load_from_state_dict upgrades).
_OLD_KEYS = (
    (re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"), r"backbone.fpn.\1.\2.0.\3"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"), None),
)


# torchvision R50-FPN detector generations, their presets (presets.py) and builders (include_mask -> name).
V1, V2 = "v1", "v2"
PRESETS = {V1: "torchvision_maskrcnn_r50_fpn", V2: "torchvision_maskrcnn_r50_fpn_v2"}
BUILDERS = {(V1, True): "maskrcnn_resnet50_fpn", (V1, False): "fasterrcnn_resnet50_fpn",
            (V2, True): "maskrcnn_resnet50_fpn_v2", (V2, False): "fasterrcnn_resnet50_fpn_v2"}
DESCRIPTIONS = {V1: "v1: FPN and heads without norm, one RPN conv, 2-FC box head",
                V2: "v2: BatchNorm FPN and heads, two RPN convs, 4-conv + 1-FC box head"}
# Keys (current form) only one generation has: v2's second RPN conv, conv box head and FPN BatchNorm;
# v1's TwoMLPHead.
V2_KEYS = ("rpn.head.conv.1.0.weight", "roi_heads.box_head.0.0.weight", "backbone.fpn.inner_blocks.0.1.weight")
V1_KEYS = ("roi_heads.box_head.fc6.weight",)
BATCH_NORMS = ("batch_norm", "sync_batch_norm")  # config.NORMS that load a torch BatchNorm2d
# v2's shape (mask_rcnn.py maskrcnn_resnet50_fpn_v2): RPNHead(conv_depth=2), FastRCNNConvFCHead([256] * 4, [1024]).
V2_RPN_CONVS, V2_BOX_CONVS, V2_BOX_FCS = 2, 4, 1
V1_RPN_CONVS, V1_BOX_FCS = 1, 2


def canonical_key(key: str) -> str:
    """The current torchvision name of a (possibly old-release) state dict key."""
    for pattern, replacement in _OLD_KEYS:
        match = pattern.match(key)
        if match:
            if replacement is None:  # mask_fcn{i} (1-based) -> {i - 1}.0
                return f"roi_heads.mask_head.{int(match.group(1)) - 1}.0.{match.group(2)}"
            return pattern.sub(replacement, key)
    return key


def _canonical(state_dict: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(state dict under current key names without num_batches_tracked, {current key: the file's key})."""
    out, original = {}, {}
    for key, value in state_dict.items():
        if key.endswith(IGNORED_SUFFIX):
            continue
        new = canonical_key(key)
        out[new], original[new] = value, key
    return out, original


def backbone_batch_norm_counters(state_dict: Dict[str, np.ndarray]) -> int:
    """How many backbone BatchNorm layers saved a num_batches_tracked counter (nn.BatchNorm2d, not frozen)."""
    return sum(1 for key in state_dict if key.startswith(BODY) and key.endswith(IGNORED_SUFFIX))


def has_mask_head(state_dict: Dict[str, np.ndarray]) -> bool:
    return any(key.startswith(MASK_PREFIXES) for key in state_dict)


def architecture(state_dict: Dict[str, np.ndarray]) -> str:
    """V2 when the (old- or new-form) keys hold one of V2_KEYS and none of V1_KEYS, else V1 (a file of
    neither then fails in the mapping, naming its first missing or unused key)."""
    keys = {canonical_key(key) for key in state_dict}
    is_v2 = any(key in keys for key in V2_KEYS) and not any(key in keys for key in V1_KEYS)
    return V2 if is_v2 else V1


def preset_for(state_dict: Dict[str, np.ndarray]) -> str:
    """The preset (presets.py) that builds the model of a torchvision detector state dict."""
    return PRESETS[architecture(state_dict)]


def model_architecture(model_cfg) -> Optional[str]:
    """V1 or V2 when a config.ModelConfig builds that torchvision generation's layers, else None."""
    m, h = model_cfg, model_cfg.heads
    if (m.fpn_norm == "none" and m.rpn_num_convs == V1_RPN_CONVS and h.box_num_convs == 0
            and h.num_fcs == V1_BOX_FCS and (not m.include_mask or h.mask_norm == "none")):
        return V1
    if (m.fpn_norm in BATCH_NORMS and m.rpn_num_convs == V2_RPN_CONVS and h.box_num_convs == V2_BOX_CONVS
            and h.box_norm in BATCH_NORMS and h.num_fcs == V2_BOX_FCS
            and (not m.include_mask or h.mask_norm in BATCH_NORMS)):
        return V2
    return None


# Key prefixes of torchvision models that are not Mask / Faster R-CNN -> what the file is.
OTHER_MODELS = (
    ("roi_heads.keypoint_", "torchvision's keypoint R-CNN (keypointrcnn_resnet50_fpn: person boxes and 17 "
                            "keypoints, roi_heads.keypoint_head.*)"),
    ("head.classification_head.", "a torchvision single-stage detector (RetinaNet or FCOS: "
                                  "head.classification_head.*)"),
    ("fc.weight", "an ImageNet classification network (fc.weight; as a backbone: train.py --pretrained=FILE)"),
)


def check_detector_kind(state_dict: Dict[str, np.ndarray]) -> None:
    """ValueError in one line when the file is a torchvision model other than Mask / Faster R-CNN, naming it
    (otherwise its keys would fail later as a class count or an unused key)."""
    for prefix, what in OTHER_MODELS:
        if any(key.startswith(prefix) for key in state_dict):
            raise ValueError(f"the checkpoint is {what}; maskrcnn_tf imports torchvision's Mask R-CNN and Faster "
                             "R-CNN (v1 and v2) only")


def check_architecture(state_dict: Dict[str, np.ndarray], model_cfg, preset: str) -> None:
    """ValueError in one line when the file is not a Mask / Faster R-CNN (check_detector_kind) or its
    generation (architecture) is not the one `model_cfg` (made from `preset` and any overrides) builds:
    what the file is and the --config to import it with."""
    check_detector_kind(state_dict)
    found, built = architecture(state_dict), model_architecture(model_cfg)
    if found == built:
        return
    what = f"the checkpoint is torchvision's {builder_of(state_dict)} ({DESCRIPTIONS[found]})"
    if built is None:
        m, h = model_cfg, model_cfg.heads
        raise ValueError(
            f"{what} but the overridden model is neither torchvision v1 nor v2 (model.fpn_norm={m.fpn_norm}, "
            f"model.rpn_num_convs={m.rpn_num_convs}, model.heads.box_num_convs={h.box_num_convs}, "
            f"model.heads.box_norm={h.box_norm}, model.heads.num_fcs={h.num_fcs}, model.heads.mask_norm="
            f"{h.mask_norm}); import it with --config={PRESETS[found]} and without --params_override of those fields")
    raise ValueError(f"{what} but --config={preset} builds a torchvision {built} model; import it with "
                     f"--config={PRESETS[found]} (or without --config: it is recognised from its keys)")


def builder_of(state_dict: Dict[str, np.ndarray]) -> str:
    """torchvision's builder name of a detector state dict, e.g. "fasterrcnn_resnet50_fpn_v2"."""
    return BUILDERS[(architecture(state_dict), has_mask_head(state_dict))]


class _Table:
    """Collects {our variable path: array} and {path: checkpoint key}, remembering the keys used."""

    def __init__(self, state_dict, original):
        self.state_dict, self.original = state_dict, original
        self.values, self.sources, self.used = {}, {}, set()

    def take(self, key):
        if key not in self.state_dict:
            raise ValueError(f"key {key} is missing from the checkpoint")
        self.used.add(key)
        return np.asarray(self.state_dict[key], np.float32)

    def put(self, path, key, value):
        self.values[path], self.sources[path] = value, self.original.get(key, key)

    def conv(self, path, key, kernel_fn=layout.conv_kernel, bias=True):
        kernel = kernel_fn(self.take(f"{key}.weight"))
        self.put(f"{path}/kernel", f"{key}.weight", kernel)
        if bias:
            self.put(f"{path}/bias", f"{key}.bias", self.take(f"{key}.bias"))
        return kernel

    def norm(self, path, key):
        """A torch BatchNorm2d `key` (weight, bias, running_mean, running_var) -> Keras BN `path`."""
        for variable, buffer in BN_BUFFERS:
            self.put(f"{path}/{variable}", f"{key}.{buffer}", self.take(f"{key}.{buffer}"))

    def conv_norm(self, path, key, with_norm):
        """torchvision's Conv2dNormActivation `key`: conv `{key}.0` with a bias when without norm, else
        without bias and followed by the BatchNorm `{key}.1` (our `{path}_norm`). Returns the kernel."""
        kernel = self.conv(path, f"{key}.0", bias=not with_norm)
        if with_norm:
            self.norm(f"{path}_norm", f"{key}.1")
        return kernel

    def unused_error(self, ignore_prefix=None):
        unused = sorted(k for k in self.state_dict if k not in self.used
                        and not (ignore_prefix and k.startswith(ignore_prefix)))
        if unused:
            key = unused[0]
            raise ValueError(f"key {self.original.get(key, key)} (shape {tuple(np.shape(self.state_dict[key]))}) "
                             f"has no place in this model ({len(unused)} unused keys; another architecture?)")


def _resnet(table: _Table, prefix: str) -> None:
    """The ResNet body under `prefix` ("backbone.body." or "" for classification checkpoints)."""
    layers = {"conv1": (f"{prefix}conv1", f"{prefix}bn1")}
    for key in table.state_dict:
        if not key.startswith(prefix):
            continue
        match = _BLOCK_KEY.match(key[len(prefix):])
        if match:
            stage, block, part = match.groups()
            index = "0" if part.startswith("downsample") else part[-1]
            base = f"{prefix}layer{stage}.{block}"
            conv, norm = ((f"{base}.downsample.0", f"{base}.downsample.1") if index == "0"
                          else (f"{base}.conv{index}", f"{base}.bn{index}"))
            layers[f"conv{int(stage) + 1}_block{int(block) + 1}_{index}"] = (conv, norm)
    for ours, (conv, norm) in sorted(layers.items()):
        kernel = table.conv(f"{ours}_conv", conv, bias=False)
        table.put(f"{ours}_conv/bias", f"{conv}.weight", np.zeros(kernel.shape[-1], np.float32))
        table.norm(f"{ours}_bn", norm)


def _first_fc(table: _Table, key: str, channels: int, box_roi_size: int) -> None:
    """The box head's first Linear `key` over NCHW-flattened [channels, P, P] features -> fc1."""
    weight = table.take(f"{key}.weight")
    try:
        kernel = layout.dense_kernel_after_nchw_flatten(weight, channels, box_roi_size, box_roi_size)
    except ValueError as e:
        raise ValueError(f"{table.original.get(f'{key}.weight', f'{key}.weight')}: {e}") from None
    table.put("mask_rcnn/box_head/fc1/kernel", f"{key}.weight", kernel)
    table.put("mask_rcnn/box_head/fc1/bias", f"{key}.bias", table.take(f"{key}.bias"))


def _two_fc_box_head(table: _Table, box_roi_size: int) -> None:
    """v1's TwoMLPHead: fc6 (over the NCHW-flattened RoI features), fc7."""
    fc6 = table.take("roi_heads.box_head.fc6.weight")
    channels = fc6.shape[1] // (box_roi_size * box_roi_size) if fc6.ndim == 2 else 0
    _first_fc(table, "roi_heads.box_head.fc6", channels, box_roi_size)
    table.put("mask_rcnn/box_head/fc2/kernel", "roi_heads.box_head.fc7.weight",
              layout.dense_kernel(table.take("roi_heads.box_head.fc7.weight")))
    table.put("mask_rcnn/box_head/fc2/bias", "roi_heads.box_head.fc7.bias", table.take("roi_heads.box_head.fc7.bias"))


def _conv_fc_box_head(table: _Table, box_roi_size: int) -> None:
    """v2's FastRCNNConvFCHead, an nn.Sequential: Conv2dNormActivation blocks 0..n-1 (conv without bias +
    BatchNorm + ReLU), Flatten at n, then (Linear, ReLU) pairs from n + 1; the first Linear reads the last
    conv's NCHW-flattened output."""
    prefix = "roi_heads.box_head"
    convs = 0
    while f"{prefix}.{convs}.0.weight" in table.state_dict:
        kernel = table.conv_norm(f"mask_rcnn/box_head/conv{convs + 1}", f"{prefix}.{convs}", with_norm=True)
        convs += 1
    channels = kernel.shape[-1] if convs else 0
    index = convs + 1  # after the Flatten
    _first_fc(table, f"{prefix}.{index}", channels, box_roi_size)
    fc = 2
    while f"{prefix}.{index + 2}.weight" in table.state_dict:
        index += 2
        table.put(f"mask_rcnn/box_head/fc{fc}/kernel", f"{prefix}.{index}.weight",
                  layout.dense_kernel(table.take(f"{prefix}.{index}.weight")))
        table.put(f"mask_rcnn/box_head/fc{fc}/bias", f"{prefix}.{index}.bias", table.take(f"{prefix}.{index}.bias"))
        fc += 1


def torchvision_variables(state_dict: Dict[str, np.ndarray], num_classes: int, box_roi_size: int = 7,
                          include_mask: bool = True) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """({our variable path: array}, {path: checkpoint key}) for a torchvision R50-FPN detector state dict,
    v1 or v2 (`architecture`, from its keys).

    num_classes: K of the model (torchvision COCO: 90); box_roi_size: side of the box head's RoI
    features (7). Raises ValueError naming the key when a needed key is missing, an unused one is present
    or the class count differs.
    """
    canonical, original = _canonical(state_dict)
    table = _Table(canonical, original)
    if has_mask_head(canonical) != include_mask:
        raise ValueError(f"the checkpoint {'has' if has_mask_head(canonical) else 'has no'} mask head "
                         f"(roi_heads.mask_head.*) but the model has include_mask={include_mask}")
    with_norm = architecture(canonical) == V2  # v2: BatchNorm after the FPN, box and mask head convs
    _resnet(table, BODY)
    for i, level in enumerate(FPN_LEVELS):
        table.conv_norm(f"mask_rcnn/fpn/lateral_P{level}", f"backbone.fpn.inner_blocks.{i}", with_norm)
        table.conv_norm(f"mask_rcnn/fpn/output_P{level}", f"backbone.fpn.layer_blocks.{i}", with_norm)

    table.conv("mask_rcnn/rpn_head/conv", "rpn.head.conv.0.0")
    index = 1
    while f"rpn.head.conv.{index}.0.weight" in canonical:  # v2: RPNHead(conv_depth=2)
        table.conv(f"mask_rcnn/rpn_head/conv{index + 1}", f"rpn.head.conv.{index}.0")
        index += 1
    table.conv("mask_rcnn/rpn_head/objectness", "rpn.head.cls_logits")
    table.put("mask_rcnn/rpn_head/box_deltas/kernel", "rpn.head.bbox_pred.weight",
              layout.box_code_order(layout.conv_kernel(table.take("rpn.head.bbox_pred.weight")), axis=3))
    table.put("mask_rcnn/rpn_head/box_deltas/bias", "rpn.head.bbox_pred.bias",
              layout.box_code_order(table.take("rpn.head.bbox_pred.bias")))

    if with_norm:
        _conv_fc_box_head(table, box_roi_size)
    else:
        _two_fc_box_head(table, box_roi_size)

    predictor = "roi_heads.box_predictor"
    cls_weight = table.take(f"{predictor}.cls_score.weight")
    if cls_weight.ndim != 2 or cls_weight.shape[0] != num_classes + 1:
        raise ValueError(f"{predictor}.cls_score.weight: expected shape ({num_classes + 1}, D) for {num_classes} "
                         f"classes + background, found {cls_weight.shape}")
    table.put("mask_rcnn/box_head/classifier/kernel", f"{predictor}.cls_score.weight", layout.dense_kernel(cls_weight))
    table.put("mask_rcnn/box_head/classifier/bias", f"{predictor}.cls_score.bias",
              table.take(f"{predictor}.cls_score.bias"))
    # Background block included (column block 0), as ours: only the delta order changes.
    table.put("mask_rcnn/box_head/box_regressor/kernel", f"{predictor}.bbox_pred.weight",
              layout.dense_kernel(layout.box_code_order(table.take(f"{predictor}.bbox_pred.weight"), axis=0)))
    table.put("mask_rcnn/box_head/box_regressor/bias", f"{predictor}.bbox_pred.bias",
              layout.box_code_order(table.take(f"{predictor}.bbox_pred.bias")))

    if include_mask:
        index = 0
        while f"roi_heads.mask_head.{index}.0.weight" in canonical:
            table.conv_norm(f"mask_rcnn/mask_head/conv{index + 1}", f"roi_heads.mask_head.{index}", with_norm)
            index += 1
        table.conv("mask_rcnn/mask_head/deconv", "roi_heads.mask_predictor.conv5_mask", layout.deconv_kernel)
        logits_key = "roi_heads.mask_predictor.mask_fcn_logits"
        logits = table.take(f"{logits_key}.weight")
        if logits.ndim != 4 or logits.shape[0] != num_classes + 1:
            raise ValueError(f"{logits_key}.weight: expected shape ({num_classes + 1}, C, 1, 1) for {num_classes} "
                             f"classes + background, found {logits.shape}")
        # Our mask head has no background channel: class c reads channel c - 1.
        table.put("mask_rcnn/mask_head/predictor/kernel", f"{logits_key}.weight", layout.conv_kernel(logits[1:]))
        table.put("mask_rcnn/mask_head/predictor/bias", f"{logits_key}.bias", table.take(f"{logits_key}.bias")[1:])
    table.unused_error()
    return table.values, table.sources


def assign_torchvision_weights(model, state_dict: Dict[str, np.ndarray]) -> None:
    """Copies a torchvision maskrcnn_resnet50_fpn / fasterrcnn_resnet50_fpn (v1 or v2) state dict into `model`
    (built with the same K, depth and include_mask; the torchvision_maskrcnn_r50_fpn or _v2 preset, as
    `preset_for` says, for its outputs).
    ValueError naming the key and the expected and found shapes otherwise; the model is untouched then."""
    values, sources = torchvision_variables(state_dict, model.box_head.num_classes,
                                            model.box_roi_align.output_size, model.include_mask)
    layout.assign(model, values, sources, REQUIRED_PREFIXES)


def assign_torchvision_resnet(network, state_dict: Dict[str, np.ndarray], source: str = "checkpoint") -> None:
    """Copies a torchvision ImageNet ResNet-50/101 classification state dict (conv1.weight, bn1.*,
    layer1.0.conv1.weight, ...; fc.* ignored) into a keras.applications ResNet `network`.
    ValueError starting with `source` (the file) and naming the key otherwise."""
    canonical, original = _canonical(state_dict)
    table = _Table(canonical, original)
    try:
        _resnet(table, "")
        table.unused_error(ignore_prefix=CLASSIFIER_PREFIX)
        layout.assign(network, table.values, table.sources, BACKBONE_REQUIRED_PREFIXES)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def assign_torchvision_backbone(backbone_layer, state_dict: Dict[str, np.ndarray], source: str = "checkpoint") -> None:
    """`assign_torchvision_resnet` into a layers.backbone.Backbone (its Keras network)."""
    assign_torchvision_resnet(backbone_layer.network, state_dict, source)
