"""One training step of ours equals one step of torchvision's Mask R-CNN (the executable oracle).

The same seeded random weights in both (ours through weights/torchvision_mapping.py), the same batch (the
two real COCO images of ../shared/data/coco_2img, resized by 0.5 in NumPy, so that both models get the
same pixels and neither resizes again), the same sampled anchors and RoIs: torchvision samples, its
choice is recorded by patching its BalancedPositiveNegativeSampler, and our AnchorLabeler / RoISampler
take the same rows through their `sampler` hook. Then every loss component, the gradient of every
trainable variable and the weights after one SGD step (momentum 0.9, weight decay 1e-4) are compared.

Differences by definition, each stated and tested here:
- Normalizers. torchvision divides the RPN losses by the anchors it sampled and the box-head losses by
  the RoIs it sampled; ours (and detectron2's RPN) divide by the fixed images x batch_size_per_image and
  images x num_samples. Equal when every image has enough candidates (the usual case, asserted in the
  step test); otherwise ours = torchvision's x sampled / fixed (test_normalizers_...).
- Mask targets. Ours (as detectron2's) are binary: the gt mask resampled on the RoI's 28 x 28 grid,
  thresholded at 0.5, from the pipeline's box-cropped gt masks; torchvision's are the soft RoIAlign of
  the full-image mask. The step compares the mask loss on the same targets (ours are given to
  torchvision) and measures how far torchvision's own targets are from ours.
- Backbone conv biases. keras.applications' ResNet convs have biases, torchvision's have none (the
  import sets them to 0). Ours get a gradient and move; torchvision has nothing to compare them with.
- Box losses: torchvision's smooth L1 with beta 1/9, as the torchvision preset sets it
  (model.rpn/roi.box_loss_beta).
The machinery (batch, sampler recording and forcing, row matching, error measures) is
training_oracle.py's, shared with test_training_equivalence_v2.py (torchvision v2, BatchNorm that trains).
"""
import functools
import json

import cv2
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.model import build_model
from maskrcnn_tf.optimizer import SGDCoupledDecay
from maskrcnn_tf.weights.torchvision_mapping import assign_torchvision_weights, torchvision_variables
from tests.conftest import shared_data
from tests.e2e import training_oracle as oracle
from tests.torch_oracle import import_torch

torch = import_torch()
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

SCALE = 0.25  # 640-wide COCO images -> 160 wide (small, so the two R50s run in seconds)
LONG_SIDE = int(640 * SCALE)  # torchvision's resize: min(10000 / short, LONG_SIDE / long) = 1, no change
CANVAS = (128, 192)  # both images (90 and 106 rows) padded to a multiple of 64: torchvision's batch too
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.02, 0.9, 1e-4


def _config():
    return config_lib.replace(config_lib.get_preset("torchvision_maskrcnn_r50_fpn"), **{
        "model.image_size": CANVAS, "model.backbone.weights": None,
        "data.max_instances": 24, "data.train_batch_size": 2,
        "train.weight_decay": WEIGHT_DECAY, "train.momentum": MOMENTUM})


def _coco_batch(cfg):
    """Both coco_2img images at SCALE: (our batch dict, torchvision images, torchvision targets)."""
    root = shared_data("coco_2img")
    instances = []
    for split in ("train2017", "val2017"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        record = coco["images"][0]
        bgr = cv2.imread(str(root / "images" / split / record["file_name"]))
        h, w = int(record["height"] * SCALE), int(record["width"] * SCALE)
        rgb = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)[..., ::-1].astype(np.float32)
        boxes, classes, masks = [], [], []
        for ann in coco["annotations"]:
            if ann["iscrowd"]:
                continue
            x, y, bw, bh = [v * SCALE for v in ann["bbox"]]
            mask = np.zeros((h, w), np.uint8)
            for polygon in ann["segmentation"]:
                points = np.round(np.asarray(polygon, np.float64).reshape(-1, 2) * SCALE).astype(np.int32)
                cv2.fillPoly(mask, [points], 1)
            boxes.append([y, x, min(y + bh, h), min(x + bw, w)])
            classes.append(ann["category_id"])  # the preset's K = 90 classes are the COCO ids
            masks.append(mask)
        instances.append({"rgb": rgb, "boxes": np.asarray(boxes, np.float32), "classes": classes,
                          "masks": np.stack(masks)})
    return oracle.make_batch(cfg, instances, CANVAS)


def _torchvision_model(cfg):
    """torchvision's maskrcnn_resnet50_fpn architecture: frozen BN, 3 trainable stages, random weights;
    its transform normalises like our preset and neither resizes (scale 1) nor pads beyond CANVAS."""
    torch.manual_seed(0)
    frozen_bn = functools.partial(FrozenBatchNorm2d, eps=cfg.model.backbone.norm_epsilon)
    body = torchvision.models.resnet50(weights=None, norm_layer=frozen_bn)
    model = TorchvisionMaskRCNN(_resnet_fpn_extractor(body, trainable_layers=3), num_classes=91,
                                min_size=10000, max_size=LONG_SIDE,
                                image_mean=[m / 255 for m in cfg.model.pixel_mean],
                                image_std=[s / 255 for s in cfg.model.pixel_std])
    model.transform.size_divisible = 64
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                # Random frozen statistics that keep activations in range through 16 residual blocks
                # without normalisation layers that learn.
                c = module.weight.shape[0]
                module.weight.copy_(0.2 + 0.3 * torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)) and \
                    module.bias is not None:
                module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=generator))
    return model.train()


@pytest.mark.slow
def test_one_training_step_equals_torchvision():
    cfg = _config()
    batch, tv_images, tv_targets = _coco_batch(cfg)
    tv_model = _torchvision_model(cfg)
    model = build_model(cfg)
    initial_state = oracle.state_dict(tv_model)
    assign_torchvision_weights(model, initial_state)

    # 1. Our free pass: the anchor labels and RoI candidates our matching gives.
    recorder = oracle.Recorder(model)
    model.compute_losses(batch, training=True)

    # 2. torchvision's step; its samplers draw (torch seeded) and are recorded. Its RoI sampler may only
    # take candidates that our proposal stage produced too (proposals are compared below).
    tv_losses, record = oracle.torchvision_step(tv_model, recorder, batch, tv_images, tv_targets)

    # 3. Our step on torchvision's samples (anchors, proposals and RoI labels checked to be ours).
    forced = oracle.force_torchvision_samples(model, recorder, record)
    anchor_rows, roi_rows, roi_positive, found = forced.anchor_rows, forced.roi_rows, forced.roi_positive, forced.found
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        ours = model.compute_losses(batch, training=True)
    gradients = dict(zip([v.path for v in variables], tape.gradient(ours["total_loss"], variables)))

    # Normalizers: equal here because every image had enough candidates (module docstring).
    num_anchors = sum(len(r) for r in anchor_rows)
    num_rois = sum(len(r) for r in roi_rows)
    assert num_anchors == 2 * model.anchor_labeler.batch_size_per_image
    assert num_rois == 2 * model.roi_sampler.num_samples
    report = {}
    for our_name, tv_name in oracle.LOSS_PAIRS.items():
        mine, theirs = float(ours[our_name]), float(tv_losses[tv_name].detach())
        report[our_name] = abs(mine - theirs) / abs(theirs)
        assert mine == pytest.approx(theirs, rel=1e-4), (our_name, mine, theirs)
    assert float(ours["rcnn_reg_loss"]) > 0 and float(ours["rcnn_mask_loss"]) > 0  # foreground was sampled

    # Mask targets by definition: torchvision's soft targets vs our binary ones on the same RoIs. They
    # describe the same masks: binarised, they differ only along the boundary (resampling from the
    # pipeline's 112 x 112 box crops; torchvision's target RoIAlign is the unaligned one, half a pixel
    # off). Measured 6.3% of the pixels on these small objects (10-60 px), where the boundary is a large
    # share of a 28 x 28 target; the targets of another instance would differ in far more.
    target_disagreement, target_difference = oracle.mask_target_disagreement(record, roi_positive)
    assert target_disagreement <= 0.1, target_disagreement

    # 4. Gradients, in our layout (the importer's transposes and reorderings are linear).
    group_error = oracle.gradient_errors({p: None if g is None else g.numpy() for p, g in gradients.items()},
                                         oracle.torchvision_gradients(tv_model, cfg.model.num_classes))
    print("\nlargest relative loss difference:", {k: f"{v:.1e}" for k, v in report.items()})
    print("largest relative gradient difference:", oracle.largest(group_error))
    print(f"mask targets: torchvision's binarised differ from ours in {target_disagreement:.4f} of the pixels, mean "
          f"|soft - ours| {target_difference:.3f}; RoI candidates found {found:.4f}")

    # 5. One SGD step (momentum, coupled weight decay) on each side: the same update.
    optimizer = SGDCoupledDecay(learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    before = {v.path: v.numpy() for v in variables}
    optimizer.apply_gradients([(gradients[v.path], v) for v in variables])
    trainable = [p for p in tv_model.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY).step()
    tv_after, _ = torchvision_variables(oracle.state_dict(tv_model), cfg.model.num_classes)
    update_error = oracle.update_errors(before, {v.path: v.numpy() for v in variables}, tv_after)
    print("largest relative update difference beyond one ulp:", oracle.largest(update_error))
    for group in group_error:
        assert group_error[group] and max(group_error[group]) <= GRADIENT_TOLERANCE, (group, max(group_error[group]))
        assert max(update_error[group]) <= GRADIENT_TOLERANCE, (group, max(update_error[group]))


# Measured: at most 9e-5 relative (norm of the difference over the norm) in every group, the float32
# rounding of two implementations that sum in different orders (oneDNN vs torch convolutions, RoIAlign
# as sampling-matrix products vs loops). 10x that: a wrong normalizer is off by >= 2x, a dropped or
# doubled term by far more than 1e-3.
GRADIENT_TOLERANCE = 1e-3


def test_normalizers_differ_from_torchvision_only_when_fewer_rows_are_sampled():
    # torchvision: BCE mean over the n sampled anchors, smooth L1 sum / n; ours: sums / (images x 256).
    from maskrcnn_tf import losses

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 500)).astype(np.float32)
    targets = (rng.random((2, 500)) < 0.2).astype(np.float32)
    deltas, box_targets = (rng.normal(size=(2, 500, 4)).astype(np.float32),
                           rng.normal(size=(2, 500, 4)).astype(np.float32))
    for sampled_per_image in (256, 100):  # enough candidates, and too few
        sampled = np.zeros((2, 500), bool)
        sampled[:, :sampled_per_image] = True
        positive = sampled & (targets > 0)
        fixed = 2 * 256
        ours_cls = float(losses.rpn_objectness_loss(tf.constant(logits), tf.constant(targets), tf.constant(sampled),
                                                    fixed))
        ours_box = float(losses.rpn_box_loss(tf.constant(deltas), tf.constant(box_targets),
                                             tf.constant(positive), fixed,
                                             beta=1 / 9))
        n = int(sampled.sum())
        theirs_cls = float(torch.nn.functional.binary_cross_entropy_with_logits(
            torch.from_numpy(logits[sampled]), torch.from_numpy(targets[sampled])))
        theirs_box = float(torch.nn.functional.smooth_l1_loss(
            torch.from_numpy(deltas[positive]), torch.from_numpy(box_targets[positive]), beta=1 / 9,
            reduction="sum")) / n
        assert ours_cls == pytest.approx(theirs_cls * n / fixed, rel=1e-5)
        assert ours_box == pytest.approx(theirs_box * n / fixed, rel=1e-5)
        if sampled_per_image == 256:
            assert ours_cls == pytest.approx(theirs_cls, rel=1e-5)
        else:
            assert ours_cls < 0.5 * theirs_cls  # 200 of 512: torchvision weighs each anchor 2.56x more
