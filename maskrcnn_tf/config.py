"""Configuration: one frozen dataclass tree, the only place defaults live; its JSON form and validation.

`Config(model=ModelConfig, data=DataConfig, train=TrainConfig)`. Presets are plain functions in
presets.py (`coco_r50_fpn_1x`, `tiny`, the reference recipes) looked up by name with
`get_preset(name)`. Overrides use dotted names:

    cfg = replace(get_preset("tiny"), **{"model.image_size": (128, 128), "train.total_steps": 10})

`to_dict` / `from_dict` round-trip through JSON (train.py writes `config.json` into the model dir and
eval/export/predict read it back). `validate(cfg)` raises ValueError naming the field and the allowed
values; `build_model` and `build_dataset` call it, so a bad setting fails at build time.

Semantics follow detectron2 / torchvision (docs/design.md section 10). `num_classes` is K, the number of
foreground classes; classifier logits have K + 1 columns (column 0 = background).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Tuple

BACKBONES = ("resnet50", "resnet101", "tiny")
# RoIAlign implementations (ops/roi_align.py; docs/design.md section 6); the one list of their names.
ROI_ALIGN_BACKENDS = ("crop_and_resize", "gather")
# A mask pixel is foreground at probability (or resampled 0/1 value) >= this, everywhere: mask targets,
# evaluation, export, the predictor and drawings (detectron2 / Model Garden use 0.5 too).
MASK_THRESHOLD = 0.5
RESIZE_MODES = ("fit", "short_side")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = ("step", "cosine")
# TrainConfig switches of CPU-only techniques ("auto" | True | False), resolved by device_defaults.py.
DEVICE_SWITCHES = ("recompute_backbone", "banded_conv_gradients", "heap_trim", "trim_padding")
ROI_ALIGN_GRADIENTS = ("auto", "sparse_matmul", "segment_sum", "native")
WEIGHT_DECAY_TYPES = ("coupled", "decoupled")  # optimizer.py
# Normalization after the convs of the FPN and of the box and mask heads (layers/norm.py): "none" (a conv
# with bias, today's default), "batch_norm" (keras BatchNormalization with torch's eps 1e-5 and momentum
# 0.1, i.e. Keras momentum 0.9), "sync_batch_norm" (the same, synchronized=True: statistics over every
# replica's batch under tf.distribute), "group_norm" (32 groups, eps 1e-5, detectron2's GN). A conv
# followed by a norm has no bias (torchvision's Conv2dNormActivation).
NORMS = ("none", "batch_norm", "sync_batch_norm", "group_norm")
# ResNet backbone BatchNorm (layers/backbone.py): "frozen" (moving statistics and affine fixed, folded into
# the convs: today's default), "batch_norm" / "sync_batch_norm" (ordinary BatchNorm: batch statistics in
# training, moving statistics updated with torch's momentum 0.1, gamma and beta trained).
BACKBONE_NORMS = ("frozen", "batch_norm", "sync_batch_norm")
KERAS_NORM_EPSILON = 1.001e-5  # keras.applications' ResNet BatchNormalization epsilon
# RoIAlign/anchor levels and the FPN output levels: P2..P6 (strides 4..64).
MIN_LEVEL, MAX_LEVEL = 2, 6
# Largest stride of the network is 2**MAX_LEVEL; the padded image must be divisible by it.
SIZE_DIVISIBILITY = 2**MAX_LEVEL


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet50"
    # None (random init), "imagenet" (keras.applications download) or a path to a weights file; loaded
    # into a fresh training run's built model (weights/initial.py), never by build_model.
    weights: Optional[str] = None
    # Stages frozen from the input on: 2 = stem + res2 (detectron2's FREEZE_AT=2).
    freeze_at: int = 2
    # Width of the "tiny" backbone's first stage; ignored for ResNets.
    tiny_width: int = 16
    # ResNets: where a stage's stride-2 goes. False: the first 1x1 conv of the block (keras.applications,
    # MSRA/caffe, detectron2); True: the 3x3 conv, padded 1 on each side as torch does (torchvision).
    stride_in_3x3: bool = False
    # ResNets: BatchNorm epsilon. keras.applications 1.001e-5; detectron2's FrozenBatchNorm2d 1e-5;
    # torchvision's COCO_V1 Mask R-CNN weights run with 0.0 (torchvision calls overwrite_eps(model, 0.0));
    # its v2 model (maskrcnn_resnet50_fpn_v2) uses nn.BatchNorm2d's 1e-5.
    norm_epsilon: float = KERAS_NORM_EPSILON
    # ResNets: "frozen" (default; detectron2's FrozenBatchNorm2d, folded into the convs) or "batch_norm" /
    # "sync_batch_norm": ordinary BatchNorm that trains (batch statistics in training, moving statistics
    # in inference and checkpointed; torchvision v2 from scratch). BACKBONE_NORMS above. Inference is the
    # same function either way; trainable BN runs the convs unfolded and without `recompute_backbone`.
    norm: str = "frozen"


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)  # one size per level P2..P6
    aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    # Centre of cell (i, j) at ((i + offset) * stride, (j + offset) * stride): 0.5 = the cell centre
    # (today's default); 0.0 = the cell corner (torchvision, detectron2's default).
    offset: float = 0.5
    # torchvision's AnchorGenerator: base anchor corners (+-w/2, +-h/2) rounded to whole pixels
    # (half to even) before shifting.
    round_base_anchors: bool = False


@dataclasses.dataclass(frozen=True)
class RPNConfig:
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_k_train: int = 2000  # per level
    post_nms_top_k_train: int = 1000  # per image
    pre_nms_top_k_test: int = 1000
    post_nms_top_k_test: int = 1000
    nms_iou: float = 0.7
    # Proposals are kept when height and width are > 0 and >= min_box_size (pixels); torchvision 1e-3.
    min_box_size: float = 0.0
    # 0 gives L1 (detectron2's default); >0 gives smooth L1 with this beta.
    box_loss_beta: float = 0.0


@dataclasses.dataclass(frozen=True)
class RoIConfig:
    num_samples: int = 512  # per image
    foreground_fraction: float = 0.25
    foreground_iou: float = 0.5  # IoU >= this: foreground
    background_iou_high: float = 0.5  # background: [low, high)
    background_iou_low: float = 0.0
    max_mask_rois: int = 128  # foreground RoIs that get a mask loss, per image
    box_output_size: int = 7
    mask_output_size: int = 14
    # Samples per bin and axis; 0 = adaptive, ceil(roi_size / output_size) per box and axis (detectron2's
    # ROIAlignV2 and torchvision with sampling_ratio=0), capped at MAX_ADAPTIVE_SAMPLING_RATIO (ops/roi_align.py).
    sampling_ratio: int = 2
    # True: half-pixel aligned RoIAlign (detectron2 ROIAlignV2, today's default); False: the original
    # un-aligned one (torchvision's MultiScaleRoIAlign): no -0.5 shift, RoIs at least 1 pixel.
    aligned: bool = True
    # FPN level of a RoI: floor(4 + log2(sqrt(area) / 224 + 1e-6)) (False, today) or torchvision's
    # LevelMapper floor(4 + log2(sqrt(area) / 224) + 1e-6) (True); they differ within ~1e-6 of a boundary.
    torchvision_level_mapper: bool = False
    roi_align_backend: str = "crop_and_resize"
    box_loss_beta: float = 0.0


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    # Box head: box_num_convs x (3x3 conv box_conv_dim + box_norm + ReLU) on the 7x7 RoI features, then
    # flatten and num_fcs x (FC fc_dim + ReLU). Default: 0 convs + 2 FC 1024 (FPN paper, torchvision v1,
    # detectron2); torchvision v2: 4 convs 256 with BatchNorm + 1 FC 1024 (FastRCNNConvFCHead).
    num_fcs: int = 2
    fc_dim: int = 1024
    box_num_convs: int = 0
    box_conv_dim: int = 256
    box_norm: str = "none"  # NORMS; the box convs' norm (convs with a norm have no bias)
    mask_num_convs: int = 4
    mask_num_filters: int = 256
    mask_norm: str = "none"  # NORMS; after each of the mask_num_convs convs (torchvision v2: batch_norm)
    # The mask head's output size is not a setting: one stride-2 deconvolution makes it
    # 2 * roi.mask_output_size (28 by default).


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    pre_nms_top_k: int = 1000  # candidates (RoI, class) kept before class-wise NMS
    # Detections are kept when height and width are >= min_box_size pixels (torchvision 1e-2); 0 = no filter.
    min_box_size: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 80  # K foreground classes
    image_size: Tuple[int, int] = (1024, 1024)  # padded model input (H, W), divisible by 64
    include_mask: bool = True
    backbone: BackboneConfig = BackboneConfig()
    fpn_num_filters: int = 256
    # NORMS: after each FPN lateral 1x1 and output 3x3 conv (torchvision v2: batch_norm, convs without bias).
    fpn_norm: str = "none"
    rpn_num_filters: int = 256
    # 3x3 conv + ReLU layers of the RPN head before its two 1x1 predictors, with bias and no norm
    # (1: the FPN paper, torchvision v1, detectron2; torchvision v2: 2, RPNHead(conv_depth=2)).
    rpn_num_convs: int = 1
    anchors: AnchorConfig = AnchorConfig()
    rpn: RPNConfig = RPNConfig()
    roi: RoIConfig = RoIConfig()
    heads: HeadConfig = HeadConfig()
    detection: DetectionConfig = DetectionConfig()
    # Input normalisation, RGB order: images = (rgb - pixel_mean) / pixel_std. The defaults are the
    # "caffe" statistics keras.applications' ResNet weights were trained with (weights/initial.py turns
    # the BGR weights into RGB ones when it loads them, so no channel swap happens at run time).
    pixel_mean: Tuple[float, float, float] = (123.68, 116.779, 103.939)
    pixel_std: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    # How an image of any size is put on the fixed image_size canvas (transforms.resize_geometry):
    # - "fit": scaled so the whole image fits the canvas, scale = min(H / h, W / w) (today's default);
    #   resized size rounded to whole pixels.
    # - "short_side": torchvision's GeneralizedRCNNTransform (detectron2's ResizeShortestEdge is the same
    #   rule): scale = min(resize_short_side / min(h, w), resize_max_long_side / max(h, w)), resized size
    #   floor(h * scale) x floor(w * scale), bilinear, no antialias. The model stays static-shaped: the
    #   image sits at the top-left of the image_size canvas, zero padded; when it does not fit (a canvas
    #   smaller than the rule's output), the scale is lowered to min(rule, fit). Presets use a square
    #   1344 x 1344 canvas, which holds both orientations at full scale (1333 rounded up to a multiple
    #   of 64). Detections equal the reference's exactly when the canvas equals the reference's padded
    #   batch (resized size rounded up to 32): the zero border beyond it feeds the convolutions near
    #   the bottom/right edge; on a larger canvas those borders are wider, which changes features near
    #   that edge slightly.
    resize_mode: str = "fit"
    resize_short_side: int = 800
    resize_max_long_side: int = 1333
    # Inference on the batch's orientation canvas (model.inference_canvases), off by default: in
    # "short_side" mode a batch whose images all lie runs on the landscape canvas (S, W), one whose
    # images all stand on the portrait canvas (H, S), S = resize_short_side rounded up to a multiple of
    # 64, instead of the full (H, W): 1344 x 1344 -> 832 x 1344 in the presets, 38% fewer pixels. The
    # image keeps its top-left place, so only the zero border shrinks (the border effect above, now
    # nearer the reference's own padding). The price is three traces of the network in every inference
    # graph: more memory, export and load time (benchmarks/README.md, "Orientation canvases").
    # Training always runs on the full canvas.
    orientation_canvases: bool = False


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_batch_size: int = 16  # global batch (all replicas)
    eval_batch_size: int = 8
    max_instances: int = 100  # N: gt padded to this; images with more keep the N largest
    gt_mask_size: int = 112  # Mc: each gt mask cropped to its box and resized to Mc x Mc
    flip_probability: float = 0.5
    scale_jitter: Tuple[float, float] = (1.0, 1.0)  # random scale range; (1, 1) = off
    # Simple Copy-Paste (Ghiasi et al. 2021; torchvision's --use-copypaste), training only: the
    # probability that an example gets a random subset of its batch neighbour's objects pasted on top
    # (pairs of decoded examples, each the other's source; data/transforms.py). Needs mask records.
    # 0 = off (the pipeline is then exactly the per-example one).
    copy_paste_probability: float = 0.0
    shuffle_buffer: int = 1000
    seed: Optional[int] = None
    # Label map: contiguous class i + 1 <-> dataset category id category_ids[i]. Empty = the dataset's
    # ids already are 1..K.
    category_ids: Tuple[int, ...] = ()
    class_names: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    total_steps: int = 90000
    # Reference learning rate at reference_batch_size, scaled linearly to data.train_batch_size.
    base_learning_rate: float = 0.02
    reference_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4  # never applied to normalization layers
    # "coupled": L2 in the gradient before momentum, biases decayed (detectron2, torchvision);
    # "decoupled": Keras' w -= lr * wd * w, biases not decayed (Model Garden). optimizer.py.
    weight_decay_type: str = "coupled"
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    schedule: str = "step"
    decay_fractions: Tuple[float, ...] = (2 / 3, 8 / 9)  # x0.1 at each fraction of the run
    decay_rate: float = 0.1
    precision: str = "float32"
    jit_compile: bool = False
    # Train steps per call of the compiled train function (Keras steps_per_execution): fewer host round
    # trips (a GPU or TPU idles between calls). log_every_steps, checkpoint_every_steps and total_steps
    # must be multiples of it, so loss.log lines and checkpoints land on the same steps as with 1.
    # "auto": 1 on a CPU host; on GPU/TPU the largest divisor of all three up to 100 (device_defaults.py).
    steps_per_loop: int | str = "auto"
    # mixed_float16: the dynamic loss scale's starting value (Keras' default 2**15).
    initial_loss_scale: float = 32768.0
    # CPU-only memory techniques: "auto" (on for a host whose only devices are CPUs and no XLA, off on
    # GPU/TPU and under jit_compile; device_defaults.py resolves it), True or False. Same losses and
    # gradients either way (tests/test_device_defaults.py).
    # Recompute the trainable ResNet stages in the backward pass instead of keeping their activations
    # (layers/backbone.py): less memory for one more forward pass of res3..res5.
    recompute_backbone: str | bool = "auto"
    # Row-banded kernel gradients of the 3x3 FPN/RPN convs (layers/banded_conv.py).
    banded_conv_gradients: str | bool = "auto"
    # Gradient of the crop_and_resize RoIAlign backend (ops/roi_align.py): "auto", "sparse_matmul"
    # (CPU: deterministic, least memory), "segment_sum" (deterministic on GPU under
    # enable_op_determinism), "native" (TF's CropAndResizeGradImage: fastest on GPU, not deterministic).
    roi_align_gradient: str = "auto"
    # glibc malloc_trim thread while training (host_memory.py).
    heap_trim: str | bool = "auto"
    # Train on the batch's largest instance and foreground-RoI counts instead of the padded ones
    # (model.py): less work on a CPU, but a new shape almost every step, which re-runs cuDNN's
    # autotuning on a GPU; XLA and TPUs need static shapes anyway.
    trim_padding: str | bool = "auto"
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 5
    log_every_steps: int = 20
    clip_grad_norm: float = 0.0  # 0 = off
    # Reproducible training: the RPN anchor and RoI sampling draw stateless randoms keyed by (seed, step)
    # (model.py); train.py --seed also sets data.seed (data order, augmentation) and the weight init.
    # None: fresh random draws every run.
    seed: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


def get_preset(name: str) -> Config:
    """The Config of a preset (presets.py) by name; ValueError naming the allowed ones."""
    from maskrcnn_tf import presets  # presets.py builds on this module's dataclasses

    if name not in presets.PRESETS:
        raise ValueError(f"config: unknown preset {name!r}; allowed: {', '.join(sorted(presets.PRESETS))}")
    return presets.PRESETS[name]()


# ------------------------------------------------------------------------------- overrides, JSON


def replace(cfg, **overrides):
    """Returns a copy of `cfg` with dotted-name fields replaced: replace(cfg, **{"model.num_classes": 3}).

    Lists are turned into tuples (as JSON gives them). An unknown name raises ValueError listing the
    fields that exist at that level.
    """
    for dotted, value in overrides.items():
        cfg = _replace_one(cfg, dotted.split("."), value, dotted)
    return cfg


def _replace_one(node, path, value, dotted):
    names = [f.name for f in dataclasses.fields(node)]
    head = path[0]
    if head not in names:
        raise ValueError(f"config: unknown field {dotted!r}; {type(node).__name__} has: {', '.join(names)}")
    if len(path) == 1:
        if isinstance(value, list):
            value = tuple(value)
        return dataclasses.replace(node, **{head: value})
    return dataclasses.replace(node, **{head: _replace_one(getattr(node, head), path[1:], value, dotted)})


def parse_overrides(items) -> dict:
    """Command-line overrides ["dotted.field=value", ...] -> {"dotted.field": value} for `replace`: values
    are JSON (numbers, booleans, lists) or else a bare string, e.g. train.schedule=cosine."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--params_override={item!r}: expected dotted.field=value")
        name, value = item.split("=", 1)
        try:
            overrides[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name.strip()] = value
    return overrides


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Fields older config.json files hold that no longer exist: dotted name -> why reading may ignore it.
REMOVED_FIELDS = {
    "model.heads.mask_size": "always 2 * model.roi.mask_output_size (validate() refused anything else)",
}


# Fields whose default changed the training recipe when they were added, with the value that gives
# the behaviour of runs written before them (their checkpoints hold that optimizer's state).
FIELDS_ADDED_WITH_OLD_BEHAVIOUR = {"train.weight_decay_type": "decoupled"}


def from_dict(d: dict, cls=Config, _prefix=""):
    """Rebuilds a config from `to_dict` output. Unknown keys raise ValueError, except REMOVED_FIELDS
    (written by older versions), which are skipped."""
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in fields:
            if _prefix + key in REMOVED_FIELDS:
                continue
            raise ValueError(f"config: unknown field {key!r} in {cls.__name__}; allowed: {', '.join(fields)}")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            value = from_dict(value, type(default), f"{_prefix}{key}.")
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    for key, value in FIELDS_ADDED_WITH_OLD_BEHAVIOUR.items():
        # A config.json written before the field existed ran the old behaviour: a resumed run keeps it.
        if key.startswith(_prefix) and "." not in key[len(_prefix):] and key[len(_prefix):] not in d:
            kwargs[key[len(_prefix):]] = value
    return cls(**kwargs)


# Fields a dataset sets (label map), not a recipe choice: differences() callers may ignore them.
DATASET_FIELDS = ("model.num_classes", "data.category_ids", "data.class_names")


def differences(base, cfg, ignore=()) -> list:
    """["field: base value -> cfg value", ...] for every dotted field where `cfg` differs from `base`
    (e.g. a run's config against the preset it started from), fields in `ignore` left out."""
    found = []

    def walk(a, b, prefix):
        for key in a:
            name = prefix + key
            if isinstance(a[key], dict):
                walk(a[key], b[key], name + ".")
            elif a[key] != b[key] and name not in ignore:
                found.append(f"{name}: {a[key]!r} -> {b[key]!r}")

    walk(to_dict(base), to_dict(cfg), "")
    return found


def save_json(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_dict(cfg), f, indent=2)


def load_json(path: str) -> Config:
    with open(path, encoding="utf-8") as f:
        return from_dict(json.load(f))


# ------------------------------------------------------------------------------------ validation


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config: {field}={value!r} is not allowed; expected {allowed}")


def validate(cfg: Config) -> Config:
    """Raises ValueError naming the field and the allowed values; returns cfg unchanged."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _check(isinstance(m.num_classes, int) and m.num_classes >= 1, "model.num_classes", m.num_classes,
           "an integer >= 1 (foreground classes)")
    _check(len(m.image_size) == 2 and all(int(s) > 0 and int(s) % SIZE_DIVISIBILITY == 0 for s in m.image_size),
           "model.image_size", m.image_size, f"(height, width), each a positive multiple of {SIZE_DIVISIBILITY}")
    _check(m.backbone.name in BACKBONES, "model.backbone.name", m.backbone.name, " | ".join(BACKBONES))
    _check(0 <= m.backbone.freeze_at <= 5, "model.backbone.freeze_at", m.backbone.freeze_at, "0..5")
    num_levels = MAX_LEVEL - MIN_LEVEL + 1
    _check(len(m.anchors.sizes) == num_levels, "model.anchors.sizes", m.anchors.sizes,
           f"{num_levels} sizes, one per level P{MIN_LEVEL}..P{MAX_LEVEL}")
    _check(len(m.anchors.aspect_ratios) >= 1 and all(r > 0 for r in m.anchors.aspect_ratios),
           "model.anchors.aspect_ratios", m.anchors.aspect_ratios, "positive height/width ratios")
    _check(0 <= m.rpn.negative_iou <= m.rpn.positive_iou <= 1, "model.rpn.negative_iou/positive_iou",
           (m.rpn.negative_iou, m.rpn.positive_iou), "0 <= negative_iou <= positive_iou <= 1")
    _check(0 < m.rpn.positive_fraction <= 1, "model.rpn.positive_fraction", m.rpn.positive_fraction, "(0, 1]")
    _check(0 < m.roi.foreground_fraction <= 1, "model.roi.foreground_fraction", m.roi.foreground_fraction, "(0, 1]")
    _check(m.roi.roi_align_backend in ROI_ALIGN_BACKENDS, "model.roi.roi_align_backend",
           m.roi.roi_align_backend, " | ".join(ROI_ALIGN_BACKENDS))
    _check(m.backbone.norm in BACKBONE_NORMS, "model.backbone.norm", m.backbone.norm, " | ".join(BACKBONE_NORMS))
    _check(m.backbone.name != "tiny" or m.backbone.norm == "frozen", "model.backbone.norm", m.backbone.norm,
           "frozen for the tiny backbone (its GroupNorm always trains)")
    for name, value in (("model.fpn_norm", m.fpn_norm), ("model.heads.box_norm", m.heads.box_norm),
                        ("model.heads.mask_norm", m.heads.mask_norm)):
        _check(value in NORMS, name, value, " | ".join(NORMS))
    _check(isinstance(m.rpn_num_convs, int) and m.rpn_num_convs >= 1, "model.rpn_num_convs", m.rpn_num_convs,
           "an integer >= 1")
    _check(isinstance(m.heads.box_num_convs, int) and m.heads.box_num_convs >= 0, "model.heads.box_num_convs",
           m.heads.box_num_convs, "an integer >= 0")
    _check(m.backbone.norm_epsilon >= 0, "model.backbone.norm_epsilon", m.backbone.norm_epsilon, "a number >= 0")
    _check(isinstance(m.backbone.stride_in_3x3, bool), "model.backbone.stride_in_3x3", m.backbone.stride_in_3x3,
           "true | false")
    _check(0.0 <= m.anchors.offset < 1.0, "model.anchors.offset", m.anchors.offset,
           "a fraction of the stride in [0, 1): 0.5 = cell centre, 0.0 = cell corner")
    _check(isinstance(m.roi.sampling_ratio, int) and m.roi.sampling_ratio >= 0, "model.roi.sampling_ratio",
           m.roi.sampling_ratio, "an integer >= 1, or 0 (adaptive)")
    _check(m.rpn.min_box_size >= 0, "model.rpn.min_box_size", m.rpn.min_box_size, "a number >= 0")
    _check(m.detection.min_box_size >= 0, "model.detection.min_box_size", m.detection.min_box_size, "a number >= 0")
    _check(m.resize_mode in RESIZE_MODES, "model.resize_mode", m.resize_mode, " | ".join(RESIZE_MODES))
    _check(isinstance(m.orientation_canvases, bool), "model.orientation_canvases", m.orientation_canvases,
           "true | false")
    _check(m.resize_mode != "short_side" or 0 < m.resize_short_side <= m.resize_max_long_side,
           "model.resize_short_side/resize_max_long_side", (m.resize_short_side, m.resize_max_long_side),
           "0 < short side <= max long side")
    _check(len(m.pixel_mean) == 3 and len(m.pixel_std) == 3 and all(s > 0 for s in m.pixel_std),
           "model.pixel_mean/pixel_std", (m.pixel_mean, m.pixel_std), "three values each, std > 0")
    _check(d.train_batch_size >= 1, "data.train_batch_size", d.train_batch_size, "an integer >= 1")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "an integer >= 1")
    _check(d.max_instances >= 1, "data.max_instances", d.max_instances, "an integer >= 1")
    _check(0 < d.scale_jitter[0] <= d.scale_jitter[1], "data.scale_jitter", d.scale_jitter,
           "(min, max) with 0 < min <= max")
    _check(0 <= d.flip_probability <= 1, "data.flip_probability", d.flip_probability, "[0, 1]")
    _check(0 <= d.copy_paste_probability <= 1, "data.copy_paste_probability", d.copy_paste_probability, "[0, 1]")
    _check(not d.category_ids or len(d.category_ids) == m.num_classes, "data.category_ids",
           d.category_ids, f"empty or exactly model.num_classes={m.num_classes} ids")
    _check(not d.class_names or len(d.class_names) == m.num_classes, "data.class_names",
           d.class_names, f"empty or exactly model.num_classes={m.num_classes} names")
    _check(t.schedule in LR_SCHEDULES, "train.schedule", t.schedule, " | ".join(LR_SCHEDULES))
    _check(t.precision in PRECISIONS, "train.precision", t.precision, " | ".join(PRECISIONS))
    _check(t.weight_decay_type in WEIGHT_DECAY_TYPES, "train.weight_decay_type", t.weight_decay_type,
           " | ".join(WEIGHT_DECAY_TYPES))
    _check(t.total_steps >= 1, "train.total_steps", t.total_steps, "an integer >= 1")
    for name in DEVICE_SWITCHES:
        value = getattr(t, name)
        _check(isinstance(value, bool) or value == "auto", f"train.{name}", value, "auto | true | false")
    _check(t.roi_align_gradient in ROI_ALIGN_GRADIENTS, "train.roi_align_gradient", t.roi_align_gradient,
           " | ".join(ROI_ALIGN_GRADIENTS))
    _check(t.steps_per_loop == "auto" or (isinstance(t.steps_per_loop, int) and not isinstance(t.steps_per_loop, bool)
                                           and t.steps_per_loop >= 1),
           "train.steps_per_loop", t.steps_per_loop, "auto or an integer >= 1")
    if t.steps_per_loop != "auto":
        for name in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
            _check(getattr(t, name) % t.steps_per_loop == 0, f"train.{name}", getattr(t, name),
                   f"a multiple of train.steps_per_loop={t.steps_per_loop} (steps are only seen every loop)")
    _check(t.initial_loss_scale > 0, "train.initial_loss_scale", t.initial_loss_scale, "a positive number")
    _check(not t.jit_compile or m.roi.roi_align_backend == "gather", "train.jit_compile", t.jit_compile,
           "false with model.roi.roi_align_backend='crop_and_resize' (CropAndResize has no XLA kernel; "
           "set model.roi.roi_align_backend=gather)")
    _check(t.base_learning_rate > 0 and math.isfinite(t.base_learning_rate), "train.base_learning_rate",
           t.base_learning_rate, "a positive number")
    return cfg


def learning_rate(cfg: Config) -> float:
    """Peak learning rate: the reference rate scaled linearly to the global batch (Goyal et al. 2017)."""
    return cfg.train.base_learning_rate * cfg.data.train_batch_size / cfg.train.reference_batch_size
