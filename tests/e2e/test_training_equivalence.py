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
"""
import functools
import json

import cv2
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.data import transforms
from maskrcnn_tf.model import build_model
from maskrcnn_tf.ops import masks as mask_ops
from maskrcnn_tf.ops import sampling
from maskrcnn_tf.optimizer import SGDCoupledDecay
from maskrcnn_tf.weights.torchvision_mapping import assign_torchvision_weights, torchvision_variables
from tests.conftest import shared_data
from tests.torch_oracle import import_torch

torch = import_torch()
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN  # noqa: E402
from torchvision.models.detection import roi_heads as tv_roi_heads  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

SCALE = 0.25  # 640-wide COCO images -> 160 wide (small, so the two R50s run in seconds)
LONG_SIDE = int(640 * SCALE)  # torchvision's resize: min(10000 / short, LONG_SIDE / long) = 1, no change
CANVAS = (128, 192)  # both images (90 and 106 rows) padded to a multiple of 64: torchvision's batch too
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.02, 0.9, 1e-4
LOSS_PAIRS = {"rpn_cls_loss": "loss_objectness", "rpn_reg_loss": "loss_rpn_box_reg",
              "rcnn_cls_loss": "loss_classifier", "rcnn_reg_loss": "loss_box_reg", "rcnn_mask_loss": "loss_mask"}
GROUPS = (("backbone", "conv"), ("fpn", "mask_rcnn/fpn/"), ("rpn", "mask_rcnn/rpn_head/"),
          ("box head", "mask_rcnn/box_head/"), ("mask head", "mask_rcnn/mask_head/"))


def _config():
    return config_lib.replace(config_lib.get_preset("torchvision_maskrcnn_r50_fpn"), **{
        "model.image_size": CANVAS, "model.backbone.weights": None,
        "data.max_instances": 24, "data.train_batch_size": 2,
        "train.weight_decay": WEIGHT_DECAY, "train.momentum": MOMENTUM})


def _coco_batch(cfg):
    """Both coco_2img images at SCALE: (our batch dict, torchvision images, torchvision targets, extras)."""
    root = shared_data("coco_2img")
    images, targets = [], []
    n_max, mc = cfg.data.max_instances, cfg.data.gt_mask_size
    batch = {"images": np.zeros((2, *CANVAS, 3), np.float32), "image_info": np.zeros((2, 4, 2), np.float32),
             "gt_boxes": -np.ones((2, n_max, 4), np.float32), "gt_classes": -np.ones((2, n_max), np.int32),
             "gt_masks": np.zeros((2, n_max, mc, mc), np.float32)}
    for b, split in enumerate(("train2017", "val2017")):
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
        boxes, n = np.asarray(boxes, np.float32), len(boxes)
        mean, std = np.asarray(cfg.model.pixel_mean, np.float32), np.asarray(cfg.model.pixel_std, np.float32)
        batch["images"][b, :h, :w] = (rgb - mean) / std  # zero padding after normalisation, as torchvision
        info = np.array([[h, w], [h, w], [1, 1], [0, 0]], np.float32)
        batch["image_info"][b] = info
        batch["gt_boxes"][b, :n], batch["gt_classes"][b, :n] = boxes, classes
        batch["gt_masks"][b, :n] = transforms.crop_masks(
            tf.constant(np.stack(masks)), tf.constant(boxes), tf.range(n), tf.constant(info), mc).numpy()
        images.append(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1) / 255.0)).float())
        targets.append({"boxes": torch.from_numpy(boxes[:, [1, 0, 3, 2]].copy()),
                        "labels": torch.tensor(classes, dtype=torch.int64),
                        "masks": torch.from_numpy(np.stack(masks))})
    return {k: tf.constant(v) for k, v in batch.items()}, images, targets


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


def _state_dict(model, use_grad=False):
    values = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if use_grad and isinstance(value, torch.nn.Parameter):
            value = value.grad if value.grad is not None else torch.zeros_like(value)
        values[key] = value.detach().numpy().copy()
    return values


def _match_rows(ours_yxyx, ours_valid, theirs_xyxy, tolerance=1e-2):
    """For each of their boxes, the index of our valid box within `tolerance` pixels, or -1."""
    theirs = theirs_xyxy[:, [1, 0, 3, 2]]
    distance = np.abs(theirs[:, None, :] - ours_yxyx[None, :, :]).max(-1)  # [R_theirs, R_ours]
    distance[:, ~ours_valid] = np.inf
    best = distance.argmin(1)
    return np.where(distance[np.arange(len(theirs)), best] <= tolerance, best, -1)


class _Recorder:
    """Our model's first (free) pass: the labels our samplers see and the RoI candidates."""

    def __init__(self, model):
        self.anchor_labels = self.roi_labels = self.candidates = self.candidate_valid = None
        model.anchor_labeler.sampler = self._anchor_sampler
        model.roi_sampler.sampler = self._roi_sampler
        original_call = model.roi_sampler.call

        def recording_call(proposals, proposal_valid, gt_boxes, gt_classes, seed=None):
            self.candidates = tf.concat([proposals, gt_boxes], axis=1).numpy()
            self.candidate_valid = tf.concat([proposal_valid, gt_classes > 0], axis=1).numpy()
            return original_call(proposals, proposal_valid, gt_boxes, gt_classes, seed=seed)

        model.roi_sampler.call = recording_call

    def _anchor_sampler(self, labels, num_samples, fraction, seed):
        self.anchor_labels = labels.numpy()
        return sampling.balanced_sample(labels, num_samples, fraction, seed)

    def _roi_sampler(self, labels, num_samples, fraction, seed):
        self.roi_labels = labels.numpy()
        return sampling.balanced_sample(labels, num_samples, fraction, seed)


def _forced_sampler(rows_per_image, positive_per_image, num_slots):
    """A `sampler` hook that returns the given rows (lists per image) in their order."""
    index = np.zeros((len(rows_per_image), num_slots), np.int32)
    valid = np.zeros(index.shape, bool)
    positive = np.zeros(index.shape, bool)
    for b, (rows, pos) in enumerate(zip(rows_per_image, positive_per_image)):
        assert len(rows) <= num_slots
        index[b, :len(rows)], valid[b, :len(rows)], positive[b, :len(rows)] = rows, True, pos
    return lambda labels, num_samples, fraction, seed: (tf.constant(index), tf.constant(positive),
                                                        tf.constant(valid))


def _relative(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


@pytest.mark.slow
def test_one_training_step_equals_torchvision():
    cfg = _config()
    batch, tv_images, tv_targets = _coco_batch(cfg)
    tv_model = _torchvision_model(cfg)
    model = build_model(cfg)
    initial_state = _state_dict(tv_model)
    assign_torchvision_weights(model, initial_state)

    # 1. Our free pass: the anchor labels and RoI candidates our matching gives.
    recorder = _Recorder(model)
    model.compute_losses(batch, training=True)

    # 2. torchvision's step; its samplers draw (torch seeded) and are recorded. Its RoI sampler may only
    # take candidates that our proposal stage produced too (proposals are compared below).
    record = {}
    rpn_sampler, roi_sampler = tv_model.rpn.fg_bg_sampler, tv_model.roi_heads.fg_bg_sampler
    add_gt_proposals = tv_model.roi_heads.add_gt_proposals

    def recording_rpn_sampler(labels):
        record["anchor_labels"] = [l.numpy().copy() for l in labels]
        pos, neg = rpn_sampler(labels)
        record["anchor_pos"], record["anchor_neg"] = ([p.numpy().astype(bool) for p in pos],
                                                      [n.numpy().astype(bool) for n in neg])
        return pos, neg

    def recording_add_gt_proposals(proposals, gt_boxes):
        candidates = add_gt_proposals(proposals, gt_boxes)
        record["candidates"] = [c.detach().numpy().copy() for c in candidates]
        return candidates

    def restricted_roi_sampler(labels):
        record["roi_map"], restricted = [], []
        for b, (label, boxes) in enumerate(zip(labels, record["candidates"])):
            rows = _match_rows(recorder.candidates[b], recorder.candidate_valid[b], boxes)
            record["roi_map"].append(rows)
            restricted.append(torch.where(torch.from_numpy(rows >= 0), label, torch.full_like(label, -1)))
        record["roi_labels"] = [l.numpy().copy() for l in labels]
        pos, neg = roi_sampler(restricted)
        record["roi_pos"], record["roi_neg"] = ([p.numpy().astype(bool) for p in pos],
                                                [n.numpy().astype(bool) for n in neg])
        return pos, neg

    own_targets, given_targets, image_counter = [], [], iter(range(2))

    def our_mask_targets(gt_masks, boxes, matched_idxs, size):
        # torchvision's loss on our targets (mask loss compared on equal targets); its own kept aside.
        own_targets.append(tv_project_masks(gt_masks, boxes, matched_idxs, size).numpy())
        b = next(image_counter)
        ours = mask_ops.mask_targets(batch["gt_masks"][b:b + 1], batch["gt_boxes"][b:b + 1],
                                     tf.constant(boxes.detach().numpy()[None][..., [1, 0, 3, 2]]),
                                     tf.constant(matched_idxs.numpy()[None].astype(np.int32)), output_size=size)
        given_targets.append(ours.numpy()[0])
        return torch.from_numpy(given_targets[-1])

    tv_project_masks = tv_roi_heads.project_masks_on_boxes
    tv_model.rpn.fg_bg_sampler = recording_rpn_sampler
    tv_model.roi_heads.fg_bg_sampler = restricted_roi_sampler
    tv_model.roi_heads.add_gt_proposals = recording_add_gt_proposals
    tv_roi_heads.project_masks_on_boxes = our_mask_targets
    try:
        torch.manual_seed(2)
        tv_losses = tv_model(tv_images, tv_targets)
    finally:
        tv_roi_heads.project_masks_on_boxes = tv_project_masks
    tv_total = sum(tv_losses.values())
    tv_total.backward()

    # Anchors and their labels agree row by row (same anchors, same matching): one index space.
    for b in range(2):
        np.testing.assert_array_equal(recorder.anchor_labels[b], record["anchor_labels"][b])
    # The proposal stage agrees: (almost) every torchvision candidate is one of ours.
    found = np.concatenate([rows >= 0 for rows in record["roi_map"]])
    assert found.mean() >= 0.99, f"only {found.mean():.4f} of torchvision's RoI candidates are ours"

    # 3. Our step on torchvision's samples.
    anchor_rows = [np.concatenate([np.flatnonzero(p), np.flatnonzero(n)]) for p, n in
                   zip(record["anchor_pos"], record["anchor_neg"])]
    anchor_positive = [np.arange(len(r)) < p.sum() for r, p in zip(anchor_rows, record["anchor_pos"])]
    model.anchor_labeler.sampler = _forced_sampler(anchor_rows, anchor_positive,
                                                   model.anchor_labeler.batch_size_per_image)
    roi_rows, roi_positive = [], []
    for b in range(2):
        taken = np.flatnonzero(record["roi_pos"][b] | record["roi_neg"][b])  # torchvision's order
        roi_rows.append(record["roi_map"][b][taken])
        roi_positive.append(record["roi_labels"][b][taken] > 0)
        # Our matching labels those rows as torchvision's does (foreground or background).
        np.testing.assert_array_equal(recorder.roi_labels[b][roi_rows[b]] == 1, roi_positive[b])
    model.roi_sampler.sampler = _forced_sampler(roi_rows, roi_positive, model.roi_sampler.num_samples)
    del model.roi_sampler.call  # back to the class's call

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
    for our_name, tv_name in LOSS_PAIRS.items():
        mine, theirs = float(ours[our_name]), float(tv_losses[tv_name].detach())
        report[our_name] = abs(mine - theirs) / abs(theirs)
        assert mine == pytest.approx(theirs, rel=1e-4), (our_name, mine, theirs)
    assert float(ours["rcnn_reg_loss"]) > 0 and float(ours["rcnn_mask_loss"]) > 0  # foreground was sampled

    # Mask targets by definition: torchvision's soft targets vs our binary ones on the same RoIs. They
    # describe the same masks: binarised, they differ only along the boundary (resampling from the
    # pipeline's 112 x 112 box crops; torchvision's target RoIAlign is the unaligned one, half a pixel
    # off). Measured 6.3% of the pixels on these small objects (10-60 px), where the boundary is a large
    # share of a 28 x 28 target; the targets of another instance would differ in far more.
    theirs_soft, ours_binary = np.concatenate(own_targets), np.concatenate(given_targets)
    assert theirs_soft.shape == ours_binary.shape and theirs_soft.shape[0] == sum(int(p.sum()) for p in roi_positive)
    assert set(np.unique(ours_binary)) <= {0.0, 1.0}
    target_disagreement = float(((theirs_soft >= 0.5) != ours_binary).mean())
    assert target_disagreement <= 0.1, target_disagreement

    # 4. Gradients, in our layout (the importer's transposes and reorderings are linear).
    tv_gradients, _ = torchvision_variables(_state_dict(tv_model, use_grad=True), cfg.model.num_classes)
    group_error = {name: [] for name, _ in GROUPS}
    for path, gradient in gradients.items():
        if path.startswith("conv") and path.endswith("_conv/bias"):
            continue  # torchvision's ResNet convs have no bias (module docstring)
        assert gradient is not None, path
        error = _relative(gradient.numpy(), tv_gradients[path])
        group = next(name for name, prefix in GROUPS if path.startswith(prefix))
        group_error[group].append(error)
    print("\nlargest relative loss difference:", {k: f"{v:.1e}" for k, v in report.items()})
    print("largest relative gradient difference:", {k: f"{max(v):.1e}" for k, v in group_error.items()})
    print(f"mask targets: torchvision's binarised differ from ours in {target_disagreement:.4f} of the pixels, mean "
          f"|soft - ours| {np.abs(theirs_soft - ours_binary).mean():.3f}; RoI candidates found {found.mean():.4f}")

    # 5. One SGD step (momentum, coupled weight decay) on each side: the same update.
    optimizer = SGDCoupledDecay(learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    before = {v.path: v.numpy() for v in variables}
    optimizer.apply_gradients([(gradients[v.path], v) for v in variables])
    trainable = [p for p in tv_model.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY).step()
    tv_after, _ = torchvision_variables(_state_dict(tv_model), cfg.model.num_classes)
    update_error = {name: [] for name, _ in GROUPS}
    for v in variables:
        if v.path.startswith("conv") and v.path.endswith("_conv/bias"):
            continue
        group = next(name for name, prefix in GROUPS if v.path.startswith(prefix))
        # An update is known only to the rounding of the weight it was added to: one float32 ulp per
        # element (2**-23 relative), which for weights of norm ~1 and updates ~1e-6 is 1e-3 of the update.
        ulp_noise = 2.0**-23 * np.linalg.norm(before[v.path])
        theirs = tv_after[v.path] - before[v.path]
        difference = np.linalg.norm((v.numpy() - before[v.path]) - theirs)
        update_error[group].append(max(difference - ulp_noise, 0.0) / np.linalg.norm(theirs))
    print("largest relative update difference beyond one ulp:", {k: f"{max(v):.1e}" for k, v in update_error.items()})
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
