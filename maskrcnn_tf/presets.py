"""Presets: named configurations (config.get_preset(name)), each a plain function returning a Config.

The reference presets reproduce a published recipe or model's conventions; each docstring tabulates the
source's settings next to ours, with the published AP. `PRESETS` maps names to functions.
"""

from __future__ import annotations

import dataclasses

from maskrcnn_tf.config import (AnchorConfig, BackboneConfig, Config, DataConfig, DetectionConfig, HeadConfig,
                                ModelConfig, RoIConfig, RPNConfig, TrainConfig)


def coco_r50_fpn_1x() -> Config:
    """ResNet-50-FPN, 1x schedule (90k steps at batch 16 = 12 COCO epochs), docs/design.md section 10.

    Command: `python train.py --config=coco_r50_fpn_1x --train_file_pattern=OUT/train-* ...`.
    Expected: about 37.7-38.6 box AP / 33.9-35.2 mask AP on COCO val2017 with ImageNet weights
    (Detectron/detectron2 figures for this recipe).
    """
    return Config(model=ModelConfig(backbone=BackboneConfig(weights="imagenet")))


def tiny() -> Config:
    """A small model for tests and the built-in demo: it trains on a 2-core CPU in minutes.

    256x256 input, a 4-stage ResNet-like backbone 16..128 channels wide, 64-channel FPN, few proposals
    and samples. Command: `python train.py` (no dataset flags) runs the shapes demo with it.
    Not meant for COCO accuracy.
    """
    return Config(
        model=ModelConfig(
            num_classes=3,
            image_size=(256, 256),
            backbone=BackboneConfig(name="tiny", weights=None, freeze_at=0),
            fpn_num_filters=64,
            rpn_num_filters=64,
            anchors=AnchorConfig(sizes=(16, 32, 64, 128, 256)),
            rpn=RPNConfig(
                batch_size_per_image=128,
                pre_nms_top_k_train=256,
                post_nms_top_k_train=128,
                pre_nms_top_k_test=256,
                post_nms_top_k_test=100,
            ),
            roi=RoIConfig(num_samples=64, max_mask_rois=32),
            heads=HeadConfig(fc_dim=256, mask_num_convs=2, mask_num_filters=64),
            detection=DetectionConfig(max_detections=20, pre_nms_top_k=200),
            pixel_mean=(127.5, 127.5, 127.5),
            pixel_std=(64.0, 64.0, 64.0),
        ),
        data=DataConfig(train_batch_size=4, eval_batch_size=4, max_instances=20, gt_mask_size=56,
                        shuffle_buffer=64),
        train=TrainConfig(total_steps=1000, base_learning_rate=0.02, reference_batch_size=16,
                          warmup_steps=50, checkpoint_every_steps=200, log_every_steps=10),
    )


# Both reference conventions put the whole image on a square canvas of the 1333 px long side rounded up to
# a multiple of SIZE_DIVISIBILITY, so images of either orientation get the reference's scale.
REFERENCE_CANVAS = (1344, 1344)
# torchvision's ImageNet normalisation in 0..255 units: 255 * (0.485, 0.456, 0.406), 255 * (0.229, 0.224, 0.225).
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)
# torchvision's COCO heads have 91 outputs: background and the COCO category ids 1..90 (ids without a
# category are never trained). K = 90, contiguous class i = COCO category id i.
TORCHVISION_COCO_NUM_CLASSES = 90


TORCHVISION_BOX_LOSS_BETA = 1.0 / 9.0  # smooth L1 beta of torchvision's RPN and Fast R-CNN box losses


def torchvision_maskrcnn_r50_fpn() -> Config:
    """torchvision's `maskrcnn_resnet50_fpn` (COCO_V1: 37.9 box AP / 34.6 mask AP): its conventions and
    test-time settings, for weights imported with maskrcnn_tf.weights.torchvision_mapping.

    ResNet-50 with the stride in the 3x3 convs and frozen-BN epsilon 0, RGB input with ImageNet mean/std,
    anchors at cell corners with rounded base sizes, un-aligned RoIAlign with 2 samples per bin, RPN
    1000/1000 proposals at test time (2000/2000 in training) dropping those under 1e-3 px, detections
    scoring > 0.05 and at least 1e-2 px wide and high, 100 per image, short side 800 / long side <= 1333
    on a 1344 x 1344 canvas (ModelConfig.resize_mode). Classes are COCO category ids 1..90 (K = 90).
    Detection pre_nms_top_k caps the (RoI, class) candidates entering NMS (torchvision has no cap).
    Box losses as torchvision trains (fine-tuning from imported weights): smooth L1 with beta 1/9 for the
    RPN and the box head (rpn.py, roi_heads.py fastrcnn_loss).
    """
    return Config(
        model=ModelConfig(
            num_classes=TORCHVISION_COCO_NUM_CLASSES,
            image_size=REFERENCE_CANVAS,
            backbone=BackboneConfig(name="resnet50", weights=None, freeze_at=2, stride_in_3x3=True,
                                    norm_epsilon=0.0),
            anchors=AnchorConfig(offset=0.0, round_base_anchors=True),
            rpn=RPNConfig(pre_nms_top_k_train=2000, post_nms_top_k_train=2000, pre_nms_top_k_test=1000,
                          post_nms_top_k_test=1000, nms_iou=0.7, min_box_size=1e-3,
                          box_loss_beta=TORCHVISION_BOX_LOSS_BETA),
            roi=RoIConfig(sampling_ratio=2, aligned=False, torchvision_level_mapper=True,
                          box_loss_beta=TORCHVISION_BOX_LOSS_BETA),
            detection=DetectionConfig(score_threshold=0.05, nms_iou=0.5, max_detections=100,
                                      pre_nms_top_k=2000, min_box_size=1e-2),
            pixel_mean=TORCHVISION_PIXEL_MEAN,
            pixel_std=TORCHVISION_PIXEL_STD,
            resize_mode="short_side",
        ),
        data=DataConfig(category_ids=tuple(range(1, TORCHVISION_COCO_NUM_CLASSES + 1))),
    )


# torchvision's ResNet-50 v2 detectors build their backbone with nn.BatchNorm2d (default eps), not the frozen
# eps-0 BatchNorm of the COCO_V1 v1 weights.
TORCHVISION_V2_NORM_EPSILON = 1e-5


def torchvision_maskrcnn_r50_fpn_v2() -> Config:
    """torchvision's `maskrcnn_resnet50_fpn_v2` (COCO_V1: 47.4 box AP / 41.8 mask AP; its Faster R-CNN twin
    `fasterrcnn_resnet50_fpn_v2`: 46.7 box AP, imported as this preset with include_mask False): inference
    and fine-tuning from weights imported with import_weights.py --source=torchvision.

    The v1 preset (torchvision_maskrcnn_r50_fpn) with v2's architecture. Sources: torchvision
    models/detection/mask_rcnn.py `maskrcnn_resnet50_fpn_v2` (MR), faster_rcnn.py (FR), rpn.py (RPN),
    backbone_utils.py `_resnet_fpn_extractor` (BU), ops/feature_pyramid_network.py (FPN), ops/misc.py
    Conv2dNormActivation (CNA: a conv has a bias only without a norm); recipe: pytorch/vision PR #5773.

    | setting               | torchvision v2                                     | ours                                  | source  |
    |-----------------------|----------------------------------------------------|---------------------------------------|---------|
    | weights file          | maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth         | import_weights.py (from the keys)     | MR      |
    | published AP          | 47.4 box / 41.8 mask (Faster v2: 46.7 box)         | not measured here (no COCO run)       | MR, FR  |
    | backbone              | resnet50(norm_layer default nn.BatchNorm2d)        | resnet50, stride_in_3x3               | MR      |
    | backbone BN eps       | 1e-5 (no overwrite_eps, unlike v1's 0.0)           | norm_epsilon 1e-5                     | MR      |
    | backbone BN in eval   | running statistics                                 | norm frozen (folded): the same        | MR      |
    | trainable stages      | trainable_backbone_layers 3 with weights (5 from   | freeze_at 2 (conv1 + layer1 frozen)   | MR, BU  |
    |                       | scratch); requires_grad only, inference unchanged  |                                       |         |
    | FPN                   | 1x1 lateral + 3x3 output: conv (no bias) + BN      | fpn_norm batch_norm                   | BU, FPN |
    | FPN extra level       | LastLevelMaxPool: P6 = P5[::2, ::2]                | the same (P6 from P5)                 | BU, FPN |
    | RPN head              | RPNHead(conv_depth=2): 2 x (3x3 conv + ReLU),      | rpn_num_convs 2                       | MR, RPN |
    |                       | with bias, no norm                                 |                                       |         |
    | box head              | FastRCNNConvFCHead: 4 x (3x3 conv 256, no bias,    | box_num_convs 4, box_conv_dim 256,    | MR, FR  |
    |                       | BN, ReLU), flatten (C, H, W), Linear 12544 -> 1024 | box_norm batch_norm, num_fcs 1,       |         |
    |                       | + ReLU                                             | fc_dim 1024 (fc1 kernel permuted)     |         |
    | mask head             | MaskRCNNHeads: 4 x (3x3 conv 256, no bias, BN,     | mask_norm batch_norm, 4 convs 256     | MR      |
    |                       | ReLU); predictor deconv + 1x1 as v1                |                                       |         |
    | BN (FPN, heads)       | nn.BatchNorm2d: eps 1e-5, momentum 0.1             | eps 1e-5, Keras momentum 0.9          | CNA     |
    | everything else       | MaskRCNN defaults, as v1: anchors, RPN 2000/1000   | as torchvision_maskrcnn_r50_fpn       | MR      |
    |                       | pre/post NMS, RoIAlign 7/14 sampling 2, 800/1333,  |                                       |         |
    |                       | score 0.05, NMS 0.5, 100 detections                |                                       |         |
    | training recipe       | 400 epochs, batch 64 (32 GPUs x 2), SGD lr 0.1,    | not this preset: fine-tuning uses the | PR 5773 |
    |                       | steps 352/384, wd 4e-5, SyncBN, LSJ, no pretrained | v1 preset's solver settings           |         |
    |                       | backbone                                           |                                       |         |

    Deviations, chosen: the backbone BN is frozen (folded into the convs), which is exactly torchvision's
    inference; fine-tuning in torchvision would train it with batch statistics (nn.BatchNorm2d in train
    mode): set model.backbone.norm=batch_norm or sync_batch_norm for that. The FPN and head BN layers
    train with batch statistics as torchvision's do (model.fpn_norm / heads.*_norm = sync_batch_norm
    for statistics over all replicas). PR #5773's text also lists "c5 instead of p5 input on extra
    layers"; that is RetinaNet's LastLevelP6P7: Mask R-CNN v2 keeps LastLevelMaxPool on P5 (BU).
    """
    base = torchvision_maskrcnn_r50_fpn()
    model = dataclasses.replace(
        base.model,
        backbone=dataclasses.replace(base.model.backbone, norm_epsilon=TORCHVISION_V2_NORM_EPSILON, norm="frozen"),
        fpn_norm="batch_norm",
        rpn_num_convs=2,
        heads=dataclasses.replace(base.model.heads, box_num_convs=4, box_conv_dim=256, box_norm="batch_norm",
                                  num_fcs=1, fc_dim=1024, mask_num_convs=4, mask_num_filters=256,
                                  mask_norm="batch_norm"),
    )
    return dataclasses.replace(base, model=model)


# COCO train2017 images with at least one annotation: torchvision's references drop the others
# (_coco_remove_images_without_annotations), so this is their epoch.
COCO_TRAIN_IMAGES_WITH_ANNOTATIONS = 117266
LSJ_CANVAS = (1024, 1024)
LSJ_SCALE_RANGE = (0.1, 2.0)


def coco_r50_fpn_v2_lsj(epochs: int = 400) -> Config:
    """torchvision v2's from-scratch recipe (pytorch/vision PR #5773: 47.4 box / 41.8 mask AP at 400
    epochs): the v2 architecture trained on COCO with large-scale jitter and synchronized BatchNorm, no
    pretrained backbone. `epochs` sets total_steps; the lr steps stay at 352/400 and 384/400 of the run.

    | setting            | torchvision (PR 5773, references/detection)     | ours                                     |
    |--------------------|-------------------------------------------------|------------------------------------------|
    | architecture       | maskrcnn_resnet50_fpn_v2                        | torchvision_maskrcnn_r50_fpn_v2's model  |
    | backbone init      | none (weights_backbone None), all 5 stages train| weights None, freeze_at 0                |
    | BatchNorm          | --sync-bn: SyncBatchNorm in backbone, FPN, heads| sync_batch_norm in backbone, FPN, heads  |
    | augmentation       | --data-augmentation lsj: ScaleJitter(1024,      | image_size 1024x1024, resize_mode fit,   |
    |                    | 0.1-2.0), FixedSizeCrop(1024, fill 0), flip 0.5 | scale_jitter (0.1, 2.0), flip 0.5        |
    | batch, lr          | 64, SGD lr 0.1, momentum 0.9                    | train_batch_size 64, lr 0.1 at 64        |
    | weight decay       | 4e-5, --norm-weight-decay 0.0                   | 4e-5 coupled, none on norm parameters    |
    | schedule           | 400 epochs, x0.1 at epochs 352 and 384          | total_steps = epochs x 117266 / 64 to    |
    |                    |                                                 | whole 1000s, decay_fractions (0.88, 0.96)|
    | warm-up            | linear from 1e-3 over min(1000, epoch) iters    | 1000 steps from 0.001                    |
    | precision          | (not stated in the recipe)                      | mixed_float16 (mixed_bfloat16 on a TPU:  |
    |                    |                                                 | --params_override=train.precision=...)   |

    Deviation, chosen: torchvision's model transform resizes every 1024 x 1024 LSJ crop again to
    800 x 800 (min_size 800) before the network, in training and evaluation alike; ours trains and
    evaluates at the LSJ scale itself (1024 canvas, long side 1024 at test time), as detectron2's LSJ
    baselines do. Not trained to completion here (about 733k steps; no COCO run on this project's
    machines), so the AP above is the source's, not ours.
    """
    if epochs <= 0:
        raise ValueError(f"coco_r50_fpn_v2_lsj: epochs={epochs}; expected a positive count")
    base = torchvision_maskrcnn_r50_fpn_v2()
    batch = 64
    heads = dataclasses.replace(base.model.heads, box_norm="sync_batch_norm", mask_norm="sync_batch_norm")
    model = dataclasses.replace(
        base.model,
        image_size=LSJ_CANVAS,
        resize_mode="fit",
        backbone=dataclasses.replace(base.model.backbone, weights=None, freeze_at=0, norm="sync_batch_norm"),
        fpn_norm="sync_batch_norm",
        heads=heads,
    )
    data = dataclasses.replace(base.data, train_batch_size=batch, flip_probability=0.5, scale_jitter=LSJ_SCALE_RANGE)
    train = dataclasses.replace(
        # Whole thousands, so that checkpoints (every 1000) and steps_per_loop divide the run.
        base.train, total_steps=max(1, round(epochs * COCO_TRAIN_IMAGES_WITH_ANNOTATIONS / batch / 1000)) * 1000,
        base_learning_rate=0.1, reference_batch_size=batch, momentum=0.9, weight_decay=4e-5,
        weight_decay_type="coupled", warmup_steps=1000, warmup_factor=0.001, schedule="step",
        decay_fractions=(352 / 400, 384 / 400), decay_rate=0.1, precision="mixed_float16")
    return dataclasses.replace(base, model=model, data=data, train=train)


def detectron2_r50_fpn_1x() -> Config:
    """detectron2's model-zoo R50-FPN Mask R-CNN (1x: 38.6 box AP / 35.2 mask AP): its model conventions.

    MSRA ResNet-50 (stride in the 1x1 convs, frozen-BN epsilon 1e-5), caffe BGR means with std 1 (the
    backbone takes RGB; the BGR stem kernel is reversed when weights are loaded, as for
    keras.applications' caffe weights), anchors at cell corners (offset 0, not rounded), aligned
    RoIAlign (ROIAlignV2) with adaptive sampling, no detection size filter, short side 800 / long side
    <= 1333 on a 1344 x 1344 canvas.

    Recipe, setting by setting. Sources: detectron2 configs/COCO-InstanceSegmentation/
    mask_rcnn_R_50_FPN_1x.yaml (1x), configs/Base-RCNN-FPN.yaml (Base), detectron2/config/defaults.py
    (Def), detectron2/solver/build.py (Solver), detectron2/modeling/* (Code).

    | setting                   | detectron2                          | ours                               | source      |
    |---------------------------|-------------------------------------|------------------------------------|-------------|
    | images per batch          | IMS_PER_BATCH 16                    | train_batch_size 16                | Base        |
    | base learning rate        | BASE_LR 0.02 at 16 images           | base_learning_rate 0.02 at 16      | Base        |
    | iterations                | MAX_ITER 90000                      | total_steps 90000                  | Base        |
    | LR steps                  | STEPS (60000, 80000), GAMMA 0.1     | decay_fractions (2/3, 8/9), 0.1    | Base, Def   |
    | warmup                    | linear, 1000 iters, factor 1/1000   | warmup_steps 1000, factor 0.001    | Def         |
    | momentum / nesterov       | 0.9 / False                         | momentum 0.9, no nesterov          | Def         |
    | weight decay              | 1e-4, L2 in torch.optim.SGD         | 1e-4, weight_decay_type coupled    | Def, Solver |
    | decay of norm layers      | WEIGHT_DECAY_NORM 0.0               | 0 (optimizer.py)                   | Def         |
    | decay of biases           | WEIGHT_DECAY_BIAS None = 1e-4       | 1e-4                               | Def, Solver |
    | gradient clipping         | CLIP_GRADIENTS off                  | clip_grad_norm 0 (off)             | Def         |
    | precision                 | AMP off (float32)                   | precision float32                  | Def         |
    | train resolution          | short side from 640, 672, ..., 800, | short 800 x uniform scale in       | Base, Def   |
    |                           | long side <= 1333                   | scale_jitter (0.8, 1.0), <= 1333   |             |
    | test resolution           | short side 800, long side <= 1333   | short side 800, long side <= 1333  | Def         |
    | horizontal flip           | RANDOM_FLIP horizontal (p 0.5)      | flip_probability 0.5               | Def         |
    | empty images              | FILTER_EMPTY_ANNOTATIONS True       | kept (see below)                   | Def         |
    | gt per image              | all                                 | max_instances 100 (COCO has <= 93) | -           |
    | backbone                  | R-50, FrozenBN, FREEZE_AT 2         | resnet50, frozen BN, freeze_at 2   | 1x, Def     |
    | anchors                   | 32..512 on P2..P6, ratios .5, 1, 2  | the same                           | Base        |
    | RPN IoU (neg, pos)        | (0.3, 0.7), low-quality matches     | (0.3, 0.7), low-quality matches    | Def, Code   |
    | RPN anchors/img, pos frac | 256 / 0.5                           | 256 / 0.5                          | Def         |
    | RPN pre-NMS top-k tr/test | 2000 / 1000 per level               | 2000 / 1000 per level              | Base        |
    | RPN post-NMS top-k tr/te  | 1000 / 1000 per image               | 1000 / 1000 per image              | Base        |
    | RPN NMS IoU / min size    | 0.7 / 0                             | 0.7 / 0                            | Def         |
    | RPN box loss              | smooth_l1 with beta 0 = L1          | L1 (rpn.box_loss_beta 0)           | Def         |
    | RPN loss normalizer       | 256 x images                        | 256 x images                       | Code        |
    | RoIs/img, fg fraction     | 512 / 0.25                          | 512 / 0.25                         | Def         |
    | RoI IoU fg / bg           | >= 0.5 / [0, 0.5)                   | >= 0.5 / [0, 0.5)                  | Def         |
    | gt added to proposals     | PROPOSAL_APPEND_GT True             | append_gt_boxes True               | Def         |
    | box head                  | 2 fc x 1024, 7x7 ROIAlignV2         | 2 fc x 1024, 7x7 aligned           | Base, Def   |
    | box coder weights / loss  | (10, 10, 5, 5) / L1 (beta 0)        | (10, 10, 5, 5) / L1                | Def         |
    | box losses normalizer     | sampled RoIs (512 x images)         | 512 x images                       | Code        |
    | mask head                 | 4 conv x 256, 14x14 -> 28x28        | 4 conv x 256, 14x14 -> 28x28       | Base, Def   |
    | mask loss                 | BCE mean over fg RoIs x 28 x 28     | the same (max_mask_rois 128 = all) | Code        |
    | test score/NMS/detections | 0.05 / 0.5 / 100                    | 0.05 / 0.5 / 100                   | Def         |
    | seed                      | SEED -1 (random)                    | train.seed None (random)           | Def         |

    Deviations, chosen: the short side is drawn uniformly from [640, 800] instead of from the six values
    640, 672, ..., 800 (same range and mean); for images longer than 1333:800 the jitter scales the
    size capped by the long side (detectron2 caps after drawing, so it jitters those less); images without annotations are not filtered by the
    trainer (converters may drop them); every image sits on the fixed 1344 x 1344 canvas instead of
    a batch padded to its largest image (aspect-ratio grouping): more compute, the same math up to the
    zero border (ModelConfig.resize_mode). The box losses' normalizer is the fixed 512 x images where
    detectron2 divides by the RoIs actually sampled: equal whenever an image has >= 512 candidates,
    always the case with 1000 proposals per image (RoIs with IoU in [0, 0.5) are all background).
    Expected: 38.6 box AP / 35.2 mask AP (detectron2 MODEL_ZOO.md, model 137260431), with detectron2's
    ImageNet R-50 weights (MSRA R-50.pkl, maskrcnn_tf.weights) rather than keras.applications'.
    """
    base = coco_r50_fpn_1x()
    model = dataclasses.replace(
        base.model,
        image_size=REFERENCE_CANVAS,
        backbone=dataclasses.replace(base.model.backbone, stride_in_3x3=False, norm_epsilon=1e-5),
        anchors=AnchorConfig(offset=0.0, round_base_anchors=False),
        roi=RoIConfig(sampling_ratio=0, aligned=True),
        pixel_mean=(123.675, 116.28, 103.53),
        pixel_std=(1.0, 1.0, 1.0),
        resize_mode="short_side",
    )
    # The recipe's data and solver settings, written out (not inherited) so that a changed default elsewhere
    # cannot move this preset away from detectron2 (table above).
    data = dataclasses.replace(base.data, train_batch_size=16, flip_probability=0.5, scale_jitter=(0.8, 1.0),
                               max_instances=100)
    train = dataclasses.replace(
        base.train, total_steps=90000, base_learning_rate=0.02, reference_batch_size=16, momentum=0.9,
        weight_decay=1e-4, weight_decay_type="coupled", warmup_steps=1000, warmup_factor=0.001,
        schedule="step", decay_fractions=(2 / 3, 8 / 9), decay_rate=0.1, precision="float32",
        clip_grad_norm=0.0, seed=None)
    return dataclasses.replace(base, model=model, data=data, train=train)


def detectron2_r101_fpn_3x() -> Config:
    """detectron2's model-zoo R101-FPN Mask R-CNN, 3x schedule (42.9 box AP / 38.6 mask AP): its model
    conventions, those of detectron2_r50_fpn_1x with ResNet-101.

    detectron2's mask_rcnn_R_101_FPN_3x.yaml is Base-RCNN-FPN.yaml (the file detectron2_r50_fpn_1x
    follows) with MODEL.RESNETS.DEPTH 101, MODEL.WEIGHTS R-101.pkl (the ImageNet init), SOLVER.STEPS
    (210000, 250000) and MAX_ITER 270000. Every other row of detectron2_r50_fpn_1x's table holds here
    unchanged, deviations included. Sources: detectron2 configs/COCO-InstanceSegmentation/
    mask_rcnn_R_101_FPN_3x.yaml (3x), configs/Base-RCNN-FPN.yaml (Base), detectron2/config/defaults.py
    (Def), MODEL_ZOO.md (Zoo), detectron2/modeling/backbone/resnet.py (Code).

    | setting                   | detectron2                          | ours                               | source      |
    |---------------------------|-------------------------------------|------------------------------------|-------------|
    | backbone                  | R-101 (res2..res5: 3, 4, 23, 3      | resnet101 (keras.applications      | 3x, Code    |
    |                           | blocks), FrozenBN eps 1e-5,         | layout), frozen BN eps 1e-5,       |             |
    |                           | STRIDE_IN_1X1, FREEZE_AT 2          | stride_in_3x3 False, freeze_at 2   |             |
    | ImageNet init             | MSRA R-101.pkl                      | weights "imagenet" (keras); R-101  | 3x          |
    |                           |                                     | .pkl through maskrcnn_tf.weights   |             |
    | pixels                    | BGR, mean (103.53, 116.28, 123.675),| RGB, the same means reversed,      | Def         |
    |                           | std 1                               | std 1                              |             |
    | images per batch, lr      | IMS_PER_BATCH 16, BASE_LR 0.02      | train_batch_size 16, lr 0.02 at 16 | Base        |
    | iterations                | MAX_ITER 270000                     | total_steps 270000                 | 3x          |
    | LR steps                  | STEPS (210000, 250000), GAMMA 0.1   | decay_fractions (7/9, 25/27), 0.1  | 3x, Def     |
    | warmup                    | linear, 1000 iters, factor 1/1000   | warmup_steps 1000, factor 0.001    | Def         |
    | weight decay              | 1e-4 (L2), none on norms            | 1e-4 coupled, none on norms        | Def         |
    | train / test resolution   | short side 640..800 / 800, <= 1333  | short 800 x (0.8, 1.0) / 800,      | Base, Def   |
    |                           |                                     | <= 1333, 1344 x 1344 canvas        |             |
    | heads                     | FPN 256, 1-conv RPN, 2 fc x 1024    | the same                           | Base        |
    |                           | box head, 4 conv x 256 mask head    |                                    |             |
    | weights file              | model_final_a3ec72.pkl (MD5 a3ec72) | import_weights.py --source=        | Zoo         |
    |                           | model id 138205316                  | detectron2 (recognised from keys)  |             |

    Expected: 42.9 box AP / 38.6 mask AP (detectron2 MODEL_ZOO.md, model 138205316): the published
    file's figures, not measured here (no COCO run of the imported file or of the 270k-iteration recipe
    on this project's machines).
    """
    base = detectron2_r50_fpn_1x()
    model = dataclasses.replace(base.model, backbone=dataclasses.replace(base.model.backbone, name="resnet101"))
    # Written as detectron2's iteration counts, so that int(fraction * total_steps) gives them exactly.
    train = dataclasses.replace(base.train, total_steps=270000, decay_fractions=(210000 / 270000, 250000 / 270000))
    return dataclasses.replace(base, model=model, train=train)


PRESETS = {"coco_r50_fpn_1x": coco_r50_fpn_1x, "tiny": tiny,
           "torchvision_maskrcnn_r50_fpn": torchvision_maskrcnn_r50_fpn,
           "torchvision_maskrcnn_r50_fpn_v2": torchvision_maskrcnn_r50_fpn_v2,
           "coco_r50_fpn_v2_lsj": coco_r50_fpn_v2_lsj,
           "detectron2_r50_fpn_1x": detectron2_r50_fpn_1x,
           "detectron2_r101_fpn_3x": detectron2_r101_fpn_3x}
