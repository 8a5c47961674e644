"""detectron2 R-FPN Mask / Faster R-CNN weights -> our variables: assign_detectron2_weights(model, state_dict).

Key names come from detectron2's modules (facebookresearch/detectron2, detectron2/modeling/):
  backbone/resnet.py     backbone.bottom_up.stem.conv1.{weight, norm.*}; res{2..5}.{b}.conv{1,2,3} and
                         .shortcut (first block), each with .norm.{weight, bias, running_mean, running_var}
                         (FrozenBatchNorm2d); convs followed by a norm have no bias
  backbone/fpn.py        backbone.fpn_lateral{2..5}, backbone.fpn_output{2..5} (weight, bias)
  proposal_generator/rpn.py   proposal_generator.rpn_head.{conv, objectness_logits, anchor_deltas}
  roi_heads/box_head.py  roi_heads.box_head.fc{1,2} (after flattening NCHW RoI features)
  roi_heads/fast_rcnn.py roi_heads.box_predictor.cls_score [K + 1] (background last),
                         .bbox_pred [K * 4] (class-specific, no background block)
  roi_heads/mask_head.py roi_heads.mask_head.mask_fcn{1..4}, .deconv, .predictor [K]
The ResNet blocks map onto keras.applications' names: res{n}.{b} -> conv{n}_block{b+1}, conv{i} ->
_{i}_conv / _{i}_bn, shortcut -> _0_conv / _0_bn; the stem is conv1_conv / conv1_bn. Conventions:
- Background: our logits put it in column 0 and have a (zero) background box block; detectron2's
  cls_score row K moves to column 0 and bbox_pred gets four zero rows in front.
- Box deltas: every group of four goes from [dx, dy, dw, dh] to [dy, dx, dh, dw] (RPN and box head).
- Input: the MSRA-initialised model-zoo weights take BGR pixels minus the BGR means. Our model takes RGB
  (pixel_mean in RGB order), so the stem kernel's input channels are reversed, exactly as
  layers/backbone.py does for the caffe ImageNet weights: conv(rgb, reversed kernel) == conv(bgr, kernel).
- Backbone conv biases (absent in detectron2) are set to 0.
- A checkpoint without roi_heads.mask_head.* is a Faster R-CNN one: `has_mask_head` tells the importer
  to build a box-only model. Any key this mapping does not use is an error naming it (a keypoint head,
  a ResNet-101's extra blocks), except the non-weight buffers published files carry (docs/design.md
  section 15), which `check_buffers` compares with the model's config:
  - proposal_generator.anchor_generator.cell_anchors.{0..4} [A, 4] (persistent until detectron2 564bc2fb,
    2021-05; the 2019-2020 model zoo has them): per level, the zero-centred [x0, y0, x1, y1] anchors of
    DefaultAnchorGenerator.generate_cell_anchors (area size**2, w = sqrt(area / ratio), h = ratio * w, no
    rounding). They must equal the config's anchors at offset 0 (model.anchors sizes, aspect_ratios and
    round_base_anchors, same order); the grid offset itself (cfg.MODEL.ANCHOR_GENERATOR.OFFSET) is not
    in the file.
  - pixel_mean / pixel_std [3, 1, 1] (persistent from 9ced00a1, 2020-04, to 3c0509e6, 2021-02: user
    checkpoints of that time): cfg.MODEL.PIXEL_MEAN / PIXEL_STD in the input order, BGR 0..255 for the
    MSRA models; they must equal the config's model.pixel_mean / pixel_std (RGB) reversed.
  - *.num_batches_tracked (BatchNorm2d / SyncBatchNorm counters; FrozenBatchNorm2d saves none): dropped.
The model is recognised from the keys and shapes (`architecture`, `preset_for`): the res2..res5 block
counts (3, 4, 6, 3 = R50 -> detectron2_r50_fpn_1x; 3, 4, 23, 3 = R101 -> detectron2_r101_fpn_3x), the
groups of the 3x3 convs (res2.0.conv2.weight [width, width / groups, 3, 3]: ResNeXt when groups > 1),
the norms (FrozenBN / BN: running statistics; GN: weight and bias only) of the backbone, FPN and heads,
the RPN convs (rpn_head.conv vs rpn_head.conv.conv{k}) and the box head (fc{i}, conv{i}; Cascade R-CNN:
box_head.{stage}.*), and a keypoint head. `check_architecture` refuses, in one line naming what was
found, a file that fits no preset (ResNeXt, the LSJ new baselines, GN, Cascade, keypoint) or another
preset than the one the model is built from.
"""

import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.ops import anchors as anchor_ops
from maskrcnn_tf.weights import layout

BACKBONE = "backbone.bottom_up."
MASK_HEAD = "roi_heads.mask_head."
CELL_ANCHORS = "proposal_generator.anchor_generator.cell_anchors."
_CELL_ANCHOR_KEY = re.compile(r"^proposal_generator\.anchor_generator\.cell_anchors\.(\d+)$")
PIXEL_BUFFERS = ("pixel_mean", "pixel_std")  # detectron2 key == our ModelConfig field
BN_COUNTER = ".num_batches_tracked"
ANCHOR_ATOL = 1e-3  # pixels: detectron2 stores float32 of float64 corners, as ops/anchors.py does
PIXEL_ATOL = 1e-3  # 0..255 units
# The variables the import must fill: backbone (keras.applications names start with conv) and the heads.
REQUIRED_PREFIXES = ("conv", "mask_rcnn/fpn/", "mask_rcnn/rpn_head/", "mask_rcnn/box_head/",
                     "mask_rcnn/mask_head/")
FPN_LEVELS = (2, 3, 4, 5)
_BLOCK_KEY = re.compile(r"^backbone\.bottom_up\.res(\d)\.(\d+)\.(conv[123]|shortcut)\.")


def has_mask_head(state_dict: Dict[str, np.ndarray]) -> bool:
    return any(key.startswith(MASK_HEAD) for key in state_dict)


# ------------------------------------------------------------------ recognising the model from its keys

R50_BLOCKS, R101_BLOCKS = (3, 4, 6, 3), (3, 4, 23, 3)
DEPTHS = {R50_BLOCKS: 50, R101_BLOCKS: 101, (3, 8, 36, 3): 152}  # res2..res5 blocks -> ResNet depth
# The importable models: res2..res5 block counts of a plain ResNet (groups 1, width 64) with FrozenBN, an
# FPN without norm, one RPN conv, the 2-fc box head and (if any) the 4-conv mask head without norm.
PRESETS = {R50_BLOCKS: "detectron2_r50_fpn_1x", R101_BLOCKS: "detectron2_r101_fpn_3x"}
BACKBONE_NAMES = {"resnet50": R50_BLOCKS, "resnet101": R101_BLOCKS}  # config.BackboneConfig.name
SUPPORTED = ("maskrcnn_tf imports detectron2's R50-FPN and R101-FPN with the 2-fc box head "
             f"({', '.join(PRESETS.values())})")
PLAIN_WIDTH = 64  # res2's bottleneck width of a ResNet (groups 1)
NORM_NAMES = {"BN": "BatchNorm", "GN": "GroupNorm", "": ""}
_STAGE_BLOCK = re.compile(r"^backbone\.bottom_up\.res([2-5])\.(\d+)\.")
_CASCADE_KEY = re.compile(r"^roi_heads\.(box_head|box_predictor)\.(\d+)\.")
KEYPOINT_HEAD = "roi_heads.keypoint_head."
RPN_HEAD = "proposal_generator.rpn_head."


class Architecture(NamedTuple):
    """What a detectron2 R-FPN state dict's keys and shapes say about its model (`architecture`)."""
    blocks: Tuple[int, ...]  # res2..res5 block counts
    groups: int  # of the 3x3 convs (1: ResNet; 32: ResNeXt 32x8d)
    width_per_group: int  # res2's bottleneck width / groups (64 for a ResNet, 8 for 32x8d)
    backbone_norm: str  # "BN" (FrozenBN, BN, SyncBN: running statistics), "GN" or "" (none)
    deformable: bool  # deformable 3x3 convs (conv2_offset)
    fpn_norm: str
    rpn_convs: int
    box_convs: int
    box_fcs: int
    box_norm: str
    cascade_stages: int  # 0: a single box head
    mask: bool
    mask_norm: str
    keypoint: bool

    def preset(self) -> Optional[str]:
        """The preset that builds this model, or None."""
        plain = (self.groups == 1 and self.width_per_group == PLAIN_WIDTH and self.backbone_norm == "BN"
                 and not self.deformable and self.fpn_norm == "" and self.rpn_convs == 1 and self.box_convs == 0
                 and self.box_fcs == 2 and self.box_norm == "" and not self.cascade_stages
                 and self.mask_norm == "" and not self.keypoint)
        return PRESETS.get(self.blocks) if plain else None

    def backbone(self) -> str:
        """e.g. "ResNeXt-101 32x8d (res2..res5 blocks 3, 4, 23, 3; 3x3 convs in 32 groups of 8 channels)"."""
        depth = DEPTHS.get(self.blocks)
        if self.groups > 1:
            name = f"ResNeXt-{depth or '?'} {self.groups}x{self.width_per_group}d"
        else:
            name = f"ResNet-{depth}" if depth else "ResNet"
        groups = (f"3x3 convs in {self.groups} group{'s' if self.groups > 1 else ''} of {self.width_per_group} "
                  "channels at res2")
        extras = []
        if self.backbone_norm != "BN":
            extras.append(f"{NORM_NAMES[self.backbone_norm] or 'no norm'} in the backbone")
        if self.deformable:
            extras.append("deformable 3x3 convs")
        return f"{name} (res2..res5 blocks {', '.join(map(str, self.blocks))}; {'; '.join([groups, *extras])})"

    def heads(self) -> str:
        """e.g. "a BatchNorm FPN, a 2-conv RPN head, a 4-conv + 1-fc box head with BatchNorm and a mask head
        with BatchNorm"."""
        parts = [f"a {NORM_NAMES[self.fpn_norm]} FPN" if self.fpn_norm else "an FPN"]
        if self.rpn_convs != 1:
            parts.append(f"a {self.rpn_convs}-conv RPN head")
        if self.cascade_stages:
            parts.append(f"a {self.cascade_stages}-stage Cascade R-CNN box head")
        else:
            convs_fcs = f"{self.box_convs}-conv + {self.box_fcs}-fc" if self.box_convs else f"{self.box_fcs}-fc"
            norm = f" with {NORM_NAMES[self.box_norm]}" if self.box_norm else ""
            parts.append(f"a {convs_fcs} box head{norm}")
        if self.mask:
            parts.append(f"a mask head{f' with {NORM_NAMES[self.mask_norm]}' if self.mask_norm else ''}")
        if self.keypoint:
            parts.append("a keypoint head")
        return f"{', '.join(parts[:-1])} and {parts[-1]}"

    def zoo_name(self) -> Optional[str]:
        """The detectron2 model-zoo config this layout looks like (a guess for the message), or None."""
        depth = DEPTHS.get(self.blocks)
        if depth not in (50, 101):  # the model zoo's R-FPN Mask / Faster R-CNN depths (R152: Cascade only)
            return None
        kind = "keypoint_rcnn" if self.keypoint else "mask_rcnn" if self.mask else "faster_rcnn"
        net = f"R_{depth}" if self.groups == 1 else f"X_{depth}_{self.groups}x{self.width_per_group}d"
        if self.cascade_stages:
            return f"Misc/cascade_{kind}_{net}_FPN_*"
        if "GN" in (self.backbone_norm, self.fpn_norm, self.box_norm):
            return f"Misc/{kind}_{net}_FPN_3x_gn"
        if self.fpn_norm == "BN" and self.rpn_convs == 2 and self.box_convs == 4 and self.box_fcs == 1:
            return f"new_baselines/{kind}_{net}_FPN_*ep_LSJ"
        if self.deformable:
            return f"Misc/{kind}_{net}_FPN_3x_dconv_c3-c5"
        return f"{kind}_{net}_FPN_{'1x or 3x' if depth == 50 else '3x'}"

    def describe(self) -> str:
        """What the file is, for one-line messages: "a ResNet-101 (...) with an FPN, a 2-fc box head and a
        mask head (detectron2 mask_rcnn_R_101_FPN_3x?)"."""
        zoo = self.zoo_name()
        return f"a {self.backbone()} with {self.heads()}{f' (detectron2 {zoo}?)' if zoo else ''}"


def _norm_kind(state_dict: Dict[str, np.ndarray], prefix: str) -> str:
    """"BN" (running statistics: FrozenBatchNorm2d, BatchNorm2d, SyncBatchNorm), "GN" (an affine norm
    without statistics: GroupNorm) or "" (no norm) of the detectron2 Conv2d at `prefix`."""
    if f"{prefix}.norm.running_mean" in state_dict:
        return "BN"
    return "GN" if f"{prefix}.norm.weight" in state_dict else ""


def _count(state_dict: Dict[str, np.ndarray], pattern: str) -> int:
    """How many i = 1, 2, ... have `pattern.format(i)` in the state dict, counted from 1 without a gap."""
    count = 0
    while pattern.format(count + 1) in state_dict:
        count += 1
    return count


def architecture(state_dict: Dict[str, np.ndarray]) -> Optional[Architecture]:
    """The model a detectron2 state dict holds (module docstring), or None when it has no
    backbone.bottom_up.res{2..5} ResNet (then the key mapping names the first key that does not fit)."""
    blocks = {stage: 0 for stage in range(2, 6)}
    for key in state_dict:
        match = _STAGE_BLOCK.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
    if not all(blocks.values()):
        return None
    conv2 = state_dict.get(f"{BACKBONE}res2.0.conv2.weight")
    if conv2 is not None and np.ndim(conv2) == 4 and np.shape(conv2)[1] > 0:
        width, per_group = np.shape(conv2)[0], np.shape(conv2)[1]
        groups = max(1, width // per_group)
    else:
        groups, per_group = 1, 0
    if f"{RPN_HEAD}conv.weight" in state_dict:
        rpn_convs = 1
    else:
        rpn_convs = sum(1 for key in state_dict if re.match(rf"^{re.escape(RPN_HEAD)}conv\.conv\d+\.weight$", key))
    cascade = {int(m.group(2)) for m in map(_CASCADE_KEY.match, state_dict) if m}
    return Architecture(
        blocks=tuple(blocks[stage] for stage in range(2, 6)), groups=int(groups), width_per_group=int(per_group),
        backbone_norm=_norm_kind(state_dict, f"{BACKBONE}stem.conv1"),
        deformable=any(key.startswith(BACKBONE) and ".conv2_offset." in key for key in state_dict),
        fpn_norm=_norm_kind(state_dict, "backbone.fpn_lateral2"), rpn_convs=rpn_convs,
        box_convs=_count(state_dict, "roi_heads.box_head.conv{}.weight"),
        box_fcs=_count(state_dict, "roi_heads.box_head.fc{}.weight"),
        box_norm=_norm_kind(state_dict, "roi_heads.box_head.conv1"),
        cascade_stages=len(cascade), mask=has_mask_head(state_dict),
        mask_norm=_norm_kind(state_dict, f"{MASK_HEAD}mask_fcn1"),
        keypoint=any(key.startswith(KEYPOINT_HEAD) for key in state_dict))


def preset_for(state_dict: Dict[str, np.ndarray]) -> str:
    """The preset (presets.py) that builds the model of a detectron2 state dict: by its res2..res5 block
    counts (PRESETS). A file that fits none gets the R50 preset here; `check_architecture` then refuses
    it in one line naming what it is."""
    found = architecture(state_dict)
    return (found.preset() if found else None) or PRESETS[R50_BLOCKS]


def model_preset(model_cfg) -> Optional[str]:
    """The preset whose detectron2 model a config.ModelConfig builds (backbone and head layout), or None."""
    m, h = model_cfg, model_cfg.heads
    plain = (m.fpn_norm == "none" and m.rpn_num_convs == 1 and h.box_num_convs == 0 and h.num_fcs == 2
             and (not m.include_mask or h.mask_norm == "none"))
    blocks = BACKBONE_NAMES.get(m.backbone.name)
    return PRESETS[blocks] if plain and blocks else None


def check_architecture(state_dict: Dict[str, np.ndarray], model_cfg, preset: str) -> None:
    """ValueError in one line when the file fits no preset (what it is: stage depths, groups, heads; and
    what is importable) or is another model than the one `model_cfg` (from `preset` and any overrides)
    builds (and the --config to import it with)."""
    found = architecture(state_dict)
    if found is None:
        return  # not a detectron2 R-FPN: the key mapping names the first key that does not fit
    wanted = found.preset()
    if wanted is None:
        raise ValueError(f"the checkpoint is {found.describe()}; {SUPPORTED}")
    built = model_preset(model_cfg)
    if built == wanted:
        return
    what = f"the checkpoint is {found.describe()}"
    if built is None:
        m, h = model_cfg, model_cfg.heads
        raise ValueError(
            f"{what} but the overridden model is not one of detectron2's (model.backbone.name={m.backbone.name}, "
            f"model.fpn_norm={m.fpn_norm}, model.rpn_num_convs={m.rpn_num_convs}, model.heads.box_num_convs="
            f"{h.box_num_convs}, model.heads.num_fcs={h.num_fcs}, model.heads.mask_norm={h.mask_norm}); import it "
            f"with --config={wanted} and without --params_override of those fields")
    raise ValueError(f"{what} but --config={preset} builds a {model_cfg.backbone.name} "
                     f"(res2..res5 blocks {', '.join(map(str, BACKBONE_NAMES[model_cfg.backbone.name]))}); import "
                     f"it with --config={wanted} (or without --config: it is recognised from its keys)")


def is_buffer(key: str) -> bool:
    """Whether `key` is one of the non-weight buffers published detectron2 files carry (module docstring)."""
    return bool(_CELL_ANCHOR_KEY.match(key)) or key in PIXEL_BUFFERS or key.endswith(BN_COUNTER)


def config_cell_anchors(anchor_config) -> List[np.ndarray]:
    """Our base anchors per level P2..P6 as detectron2's cell_anchors: float64 [A, 4] [x0, y0, x1, y1] around 0.

    Taken from ops/anchors.py (the anchors the model uses) at cell (0, 0) with offset 0, so sizes, aspect
    ratios, their order and round_base_anchors all enter the comparison.
    """
    side = 2 ** config_lib.MAX_LEVEL
    grids = anchor_ops.multilevel_anchors((side, side), anchor_config.sizes, anchor_config.aspect_ratios,
                                          config_lib.MIN_LEVEL, config_lib.MAX_LEVEL, offset=0.0,
                                          round_base_anchors=anchor_config.round_base_anchors)
    count = anchor_ops.num_anchors_per_location(anchor_config.aspect_ratios)
    return [np.asarray(grids[f"P{level}"][:count], np.float64)[:, [1, 0, 3, 2]]  # [y1, x1, y2, x2] -> xyxy
            for level in range(config_lib.MIN_LEVEL, config_lib.MAX_LEVEL + 1)]


def _numbers(values) -> str:
    return ", ".join(f"{v:.6g}" for v in values)


def _describe_anchors(boxes: np.ndarray) -> str:
    """'size 32, aspect ratios 0.5, 1, 2' (sqrt of area, height / width) of [A, 4] xyxy boxes."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        return f"of shape {boxes.shape}"
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    sizes = np.sqrt(np.abs(widths * heights))
    ratios = heights / np.where(widths == 0, np.nan, widths)
    size = f"size {sizes[0]:.6g}" if np.allclose(sizes, sizes[0], rtol=1e-3) else f"sizes {_numbers(sizes)}"
    return f"{size}, aspect ratios {_numbers(np.round(ratios, 4))}"


def check_buffers(state_dict: Dict[str, np.ndarray], model_config) -> List[str]:
    """Compares the information-carrying buffers (module docstring) with `model_config` (a ModelConfig).

    Returns what was checked (for the import's summary line); ValueError naming the key, the checkpoint's
    values and the config's otherwise (one line).
    """
    checked = []
    levels = {}
    for key in state_dict:
        match = _CELL_ANCHOR_KEY.match(key)
        if match:
            levels[int(match.group(1))] = key
    if levels:
        expected = config_cell_anchors(model_config.anchors)
        if sorted(levels) != list(range(len(expected))):
            raise ValueError(f"{CELL_ANCHORS}{{{', '.join(map(str, sorted(levels)))}}}: anchors of {len(levels)} "
                             f"levels; the model has {len(expected)} "
                             f"(P{config_lib.MIN_LEVEL}..P{config_lib.MAX_LEVEL})")
        for index, want in enumerate(expected):
            key = levels[index]
            got = np.asarray(state_dict[key], np.float64)
            if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=ANCHOR_ATOL):
                raise ValueError(
                    f"{key}: the checkpoint's P{index + config_lib.MIN_LEVEL} anchors ({_describe_anchors(got)}) "
                    f"differ from the config's ({_describe_anchors(want)}, round_base_anchors="
                    f"{model_config.anchors.round_base_anchors}): the RPN was trained on other anchors; give them "
                    "with --params_override=model.anchors.sizes=[...] / model.anchors.aspect_ratios=[...]")
        checked.append(f"{len(levels)} cell_anchors")
    for key in PIXEL_BUFFERS:
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key], np.float64)
        rgb = np.asarray(getattr(model_config, key), np.float64)
        if value.size != 3 or not np.allclose(value.reshape(3)[::-1], rgb, rtol=0, atol=PIXEL_ATOL):
            flat = value.reshape(-1)
            hint = (f"; if the model was trained so, pass --params_override=model.{key}=[{_numbers(flat[::-1])}]"
                    if flat.size == 3 else "")
            raise ValueError(f"{key}: the checkpoint's normalisation [{_numbers(flat)}] (detectron2's input order, "
                             f"BGR) differs from the config's model.{key} ({_numbers(rgb)}) (RGB), "
                             f"[{_numbers(rgb[::-1])}] in BGR{hint}")
        checked.append(key)
    return checked


def _backbone_layer(key: str):
    """(keras layer prefix, detectron2 module prefix) of a backbone conv key, or None."""
    if key.startswith(BACKBONE + "stem.conv1."):
        return "conv1", BACKBONE + "stem.conv1"
    match = _BLOCK_KEY.match(key)
    if match:
        stage, block, conv = match.groups()
        index = "0" if conv == "shortcut" else conv[-1]
        return f"conv{stage}_block{int(block) + 1}_{index}", f"{BACKBONE}res{stage}.{block}.{conv}"
    return None


def detectron2_variables(state_dict: Dict[str, np.ndarray], num_classes: int,
                         box_roi_size: int = 7) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """({our variable path: array}, {path: detectron2 key}) for a detectron2 state dict.

    num_classes: K of the model; box_roi_size: side of the box head's RoI features (7).
    Raises ValueError naming the key when a needed key is missing or an unused one is present. The
    buffers of `is_buffer` are left to `check_buffers` (call it first: this function does not read them).
    """
    values, sources, used = {}, {}, set()

    def take(key):
        if key not in state_dict:
            raise ValueError(f"key {key} is missing from the checkpoint")
        used.add(key)
        return np.asarray(state_dict[key], np.float32)

    def put(path, key, value):
        values[path], sources[path] = value, key

    # Backbone: every conv with a frozen BN, found from the checkpoint's own keys.
    backbone_layers = {}
    for key in state_dict:
        layer = _backbone_layer(key)
        if layer:
            backbone_layers[layer[0]] = layer[1]
    for ours, theirs in backbone_layers.items():  # checkpoint order: errors name its first misfit
        kernel = layout.conv_kernel(take(f"{theirs}.weight"))
        if ours == "conv1":
            kernel = kernel[:, :, ::-1, :]  # BGR -> RGB input channels (module docstring)
        put(f"{ours}_conv/kernel", f"{theirs}.weight", kernel)
        put(f"{ours}_conv/bias", f"{theirs}.weight", np.zeros(kernel.shape[-1], np.float32))
        for variable, buffer in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                                 ("moving_variance", "running_var")):
            put(f"{ours}_bn/{variable}", f"{theirs}.norm.{buffer}", take(f"{theirs}.norm.{buffer}"))

    def conv(path, key, kernel_fn=layout.conv_kernel):
        put(f"{path}/kernel", f"{key}.weight", kernel_fn(take(f"{key}.weight")))
        put(f"{path}/bias", f"{key}.bias", take(f"{key}.bias"))

    for level in FPN_LEVELS:
        conv(f"mask_rcnn/fpn/lateral_P{level}", f"backbone.fpn_lateral{level}")
        conv(f"mask_rcnn/fpn/output_P{level}", f"backbone.fpn_output{level}")

    rpn = "proposal_generator.rpn_head"
    conv("mask_rcnn/rpn_head/conv", f"{rpn}.conv")
    conv("mask_rcnn/rpn_head/objectness", f"{rpn}.objectness_logits")
    put("mask_rcnn/rpn_head/box_deltas/kernel", f"{rpn}.anchor_deltas.weight",
        layout.box_code_order(layout.conv_kernel(take(f"{rpn}.anchor_deltas.weight")), axis=3))
    put("mask_rcnn/rpn_head/box_deltas/bias", f"{rpn}.anchor_deltas.bias",
        layout.box_code_order(take(f"{rpn}.anchor_deltas.bias")))

    fc1_key = "roi_heads.box_head.fc1.weight"
    fc1 = take(fc1_key)
    channels = fc1.shape[1] // (box_roi_size * box_roi_size) if fc1.ndim == 2 else 0
    try:
        fc1_kernel = layout.dense_kernel_after_nchw_flatten(fc1, channels, box_roi_size, box_roi_size)
    except ValueError as e:
        raise ValueError(f"{fc1_key}: {e}") from None
    put("mask_rcnn/box_head/fc1/kernel", fc1_key, fc1_kernel)
    put("mask_rcnn/box_head/fc1/bias", "roi_heads.box_head.fc1.bias", take("roi_heads.box_head.fc1.bias"))
    fc = 2
    while f"roi_heads.box_head.fc{fc}.weight" in state_dict:
        key = f"roi_heads.box_head.fc{fc}"
        put(f"mask_rcnn/box_head/fc{fc}/kernel", f"{key}.weight", layout.dense_kernel(take(f"{key}.weight")))
        put(f"mask_rcnn/box_head/fc{fc}/bias", f"{key}.bias", take(f"{key}.bias"))
        fc += 1

    predictor = "roi_heads.box_predictor"
    cls_weight, cls_bias = take(f"{predictor}.cls_score.weight"), take(f"{predictor}.cls_score.bias")
    if cls_weight.ndim != 2 or cls_weight.shape[0] != num_classes + 1:
        raise ValueError(f"{predictor}.cls_score.weight: expected shape ({num_classes + 1}, D) for "
                         f"{num_classes} classes + background, found {cls_weight.shape}")
    background_first = np.roll(np.arange(num_classes + 1), 1)  # [K, 0, 1, ..., K - 1]
    put("mask_rcnn/box_head/classifier/kernel", f"{predictor}.cls_score.weight",
        layout.dense_kernel(cls_weight[background_first]))
    put("mask_rcnn/box_head/classifier/bias", f"{predictor}.cls_score.bias", cls_bias[background_first])
    box_weight, box_bias = take(f"{predictor}.bbox_pred.weight"), take(f"{predictor}.bbox_pred.bias")
    if box_weight.ndim != 2 or box_weight.shape[0] != num_classes * layout.BOX_CODE_SIZE:
        raise ValueError(f"{predictor}.bbox_pred.weight: expected shape ({num_classes * layout.BOX_CODE_SIZE}, D) "
                         f"(class-specific boxes of {num_classes} classes), found {box_weight.shape}")
    zero_rows = np.zeros((layout.BOX_CODE_SIZE, box_weight.shape[1]), np.float32)
    box_weight = layout.box_code_order(np.concatenate([zero_rows, box_weight]), axis=0)
    box_bias = layout.box_code_order(np.concatenate([np.zeros(layout.BOX_CODE_SIZE, np.float32), box_bias]))
    put("mask_rcnn/box_head/box_regressor/kernel", f"{predictor}.bbox_pred.weight", layout.dense_kernel(box_weight))
    put("mask_rcnn/box_head/box_regressor/bias", f"{predictor}.bbox_pred.bias", box_bias)

    if has_mask_head(state_dict):
        index = 1
        while f"{MASK_HEAD}mask_fcn{index}.weight" in state_dict:
            conv(f"mask_rcnn/mask_head/conv{index}", f"{MASK_HEAD}mask_fcn{index}")
            index += 1
        conv("mask_rcnn/mask_head/deconv", f"{MASK_HEAD}deconv", layout.deconv_kernel)
        conv("mask_rcnn/mask_head/predictor", f"{MASK_HEAD}predictor")

    unused = sorted(k for k in state_dict if k not in used and not is_buffer(k))
    if unused:
        raise ValueError(f"key {unused[0]} (shape {tuple(np.shape(state_dict[unused[0]]))}) has no place in this "
                         f"model ({len(unused)} unused keys; another architecture?)")
    return values, sources


def assign_detectron2_weights(model, state_dict: Dict[str, np.ndarray]) -> None:
    """Copies a detectron2 R-FPN Mask (or Faster) R-CNN state dict into `model` (built with the same K,
    depth and include_mask); ValueError naming the key and the expected and found shapes otherwise.
    The buffers are checked against the model's config (build_model sets it)."""
    num_classes = model.box_head.num_classes
    if getattr(model, "config", None) is not None:
        check_buffers(state_dict, model.config.model)
    if has_mask_head(state_dict) != model.include_mask:
        raise ValueError(f"the checkpoint {'has' if has_mask_head(state_dict) else 'has no'} mask head "
                         f"(roi_heads.mask_head.*) but the model has include_mask={model.include_mask}")
    values, sources = detectron2_variables(state_dict, num_classes, model.box_roi_align.output_size)
    layout.assign(model, values, sources, REQUIRED_PREFIXES)
