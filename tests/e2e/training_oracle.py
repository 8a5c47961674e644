"""torchvision's Mask R-CNN as the executable oracle of one training step: the machinery the training-
equivalence tests share (test_training_equivalence.py: v1, frozen BN; test_training_equivalence_v2.py:
v2, BatchNorm that trains, on one and two replicas).

The procedure (the tests' docstrings say what each compares and which differences are by definition):
1. Both models hold the same weights (ours through weights/torchvision_mapping.py) and get the same
   pixels (`make_batch`: images already at the canvas scale, so neither model resizes).
2. Our free pass (`Recorder`): the anchor labels our matching gives and our RoI candidates.
3. torchvision's step (`torchvision_step`): its samplers draw (torch seeded) and are recorded by patching
   them; its RoI sampler may only take candidates our proposal stage produced too; its mask loss is
   computed on our (binary) mask targets, its own (soft) ones kept aside.
4. Our step on torchvision's samples (`force_torchvision_samples`: the `sampler` hooks of our
   AnchorLabeler / RoISampler return torchvision's anchor rows and the rows of its RoIs' boxes, per
   replica under tf.distribute).
5. Gradients and updates in our layout (`gradient_errors`, `update_errors`; the importer's transposes
   and reorderings are linear), as relative errors per group of variables.
"""
import functools
import threading
import types

import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.data import transforms
from maskrcnn_tf.ops import masks as mask_ops
from maskrcnn_tf.ops import sampling
from maskrcnn_tf.weights.torchvision_mapping import torchvision_variables
from tests.torch_oracle import import_torch

torch = import_torch()
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import roi_heads as tv_roi_heads  # noqa: E402

LOSS_PAIRS = {"rpn_cls_loss": "loss_objectness", "rpn_reg_loss": "loss_rpn_box_reg",
              "rcnn_cls_loss": "loss_classifier", "rcnn_reg_loss": "loss_box_reg", "rcnn_mask_loss": "loss_mask"}
# (group, prefix of our variable paths); keras.applications' ResNet layers are conv1_*, conv2_block1_*, ...
GROUPS = (("backbone", "conv"), ("fpn", "mask_rcnn/fpn/"), ("rpn", "mask_rcnn/rpn_head/"),
          ("box head", "mask_rcnn/box_head/"), ("mask head", "mask_rcnn/mask_head/"))


def is_backbone_conv_bias(path):
    """keras.applications' ResNet convs have biases, torchvision's none (the import sets them to 0)."""
    return path.startswith("conv") and path.endswith("_conv/bias")


def make_batch(cfg, instances, canvas):
    """Images already at the models' scale -> (our batch dict, torchvision images, torchvision targets).

    instances: per image a dict {"rgb": float32 [h, w, 3] in 0..255, "boxes": float32 [n, 4] [y1, x1, y2, x2]
    pixels, "classes": int [n] in 1..K, "masks": uint8 [n, h, w]}. Ours: normalised by the config's pixel
    statistics, zero-padded to `canvas` after normalisation (as torchvision pads its batch), gt masks
    box-cropped by the data pipeline's transforms.crop_masks. torchvision's: 0..1 CHW images (its
    transform normalises them the same way), [x1, y1, x2, y2] boxes, full-image masks."""
    n_max, mc, images = cfg.data.max_instances, cfg.data.gt_mask_size, len(instances)
    batch = {"images": np.zeros((images, *canvas, 3), np.float32),
             "image_info": np.zeros((images, 4, 2), np.float32),
             "gt_boxes": -np.ones((images, n_max, 4), np.float32), "gt_classes": -np.ones((images, n_max), np.int32),
             "gt_masks": np.zeros((images, n_max, mc, mc), np.float32)}
    mean, std = np.asarray(cfg.model.pixel_mean, np.float32), np.asarray(cfg.model.pixel_std, np.float32)
    tv_images, tv_targets = [], []
    for b, image in enumerate(instances):
        rgb, boxes, masks = image["rgb"], np.asarray(image["boxes"], np.float32), np.asarray(image["masks"], np.uint8)
        classes, (h, w), n = np.asarray(image["classes"], np.int64), rgb.shape[:2], len(boxes)
        batch["images"][b, :h, :w] = (rgb - mean) / std
        info = np.array([[h, w], [h, w], [1, 1], [0, 0]], np.float32)
        batch["image_info"][b] = info
        batch["gt_boxes"][b, :n], batch["gt_classes"][b, :n] = boxes, classes
        batch["gt_masks"][b, :n] = transforms.crop_masks(
            tf.constant(masks), tf.constant(boxes), tf.range(n), tf.constant(info), mc).numpy()
        tv_images.append(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1) / 255.0)).float())
        tv_targets.append({"boxes": torch.from_numpy(boxes[:, [1, 0, 3, 2]].copy()),
                           "labels": torch.from_numpy(classes), "masks": torch.from_numpy(masks)})
    return {k: tf.constant(v) for k, v in batch.items()}, tv_images, tv_targets


def state_dict(model, use_grad=False):
    """{key: numpy} of a torch model's state dict; with use_grad, parameters replaced by their gradients."""
    values = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if use_grad and isinstance(value, torch.nn.Parameter):
            value = value.grad if value.grad is not None else torch.zeros_like(value)
        values[key] = value.detach().numpy().copy()
    return values


def match_rows(ours_yxyx, ours_valid, theirs_xyxy, tolerance=1e-2):
    """For each of their boxes, the index of our valid box within `tolerance` pixels, or -1."""
    theirs = theirs_xyxy[:, [1, 0, 3, 2]]
    distance = np.abs(theirs[:, None, :] - ours_yxyx[None, :, :]).max(-1)  # [R_theirs, R_ours]
    distance[:, ~ours_valid] = np.inf
    best = distance.argmin(1)
    return np.where(distance[np.arange(len(theirs)), best] <= tolerance, best, -1)


class Recorder:
    """Our model's first (free, eager) pass: the labels our samplers see and the RoI candidates."""

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


def _replica_images(images):
    """Indices in the global batch of this replica's `images` images (replica r: r * images + 0..images-1)."""
    replica = tf.distribute.get_replica_context()
    replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int32) if replica is not None else 0
    return tf.range(images) + replica_id * images


def _padded(rows_per_image, positive_per_image, num_slots, width=()):
    """(rows [I, num_slots, *width], positive [I, num_slots], valid [I, num_slots]) numpy, zero padded."""
    index = np.zeros((len(rows_per_image), num_slots, *width), np.asarray(rows_per_image[0]).dtype)
    valid = np.zeros((len(rows_per_image), num_slots), bool)
    positive = np.zeros(valid.shape, bool)
    for b, (rows, pos) in enumerate(zip(rows_per_image, positive_per_image)):
        assert len(rows) <= num_slots
        index[b, :len(rows)], valid[b, :len(rows)], positive[b, :len(rows)] = rows, True, pos
    return index, positive, valid


def forced_sampler(rows_per_image, positive_per_image, num_slots):
    """A `sampler` hook that returns the given rows (lists per image of the global batch) in their order.
    Under tf.distribute, replica r's batch of B images is images r * B .. r * B + B - 1 of the global one."""
    arrays = _padded([np.asarray(r, np.int32) for r in rows_per_image], positive_per_image, num_slots)

    def sampler(labels, num_samples, fraction, seed):
        take = _replica_images(tf.shape(labels)[0])
        return tuple(tf.gather(tf.constant(a), take) for a in arrays)

    return sampler


class ForcedRoIs:
    """Makes a RoISampler take given boxes (per image of the global batch, [y1, x1, y2, x2], in order): its
    call finds each box among the candidates of this call (within `tolerance` pixels, else the step fails)
    and its `sampler` hook returns those rows. By box, not by row, because the candidates' order follows
    the proposals' scores, whose near-ties fall differently in another graph (tf.function vs eager, plain vs
    synchronized BatchNorm). Under tf.distribute each replica takes its images' boxes (forced_sampler)."""

    def __init__(self, roi_sampler, boxes_per_image, positive_per_image, tolerance=1e-2):
        self.boxes, self.positive, self.valid = _padded([np.asarray(b, np.float32) for b in boxes_per_image],
                                                        positive_per_image, roi_sampler.num_samples, (4,))
        self.tolerance, self.rows = tolerance, {}  # rows by thread: MirroredStrategy runs a thread per replica
        self.original_call = functools.partial(type(roi_sampler).call, roi_sampler)
        roi_sampler.call, roi_sampler.sampler = self._forcing_call, self._sampler

    def _forcing_call(self, proposals, proposal_valid, gt_boxes, gt_classes, seed=None):
        candidates = tf.concat([proposals, gt_boxes], axis=1)  # [B, R + N, 4], the sampler's rows
        candidate_valid = tf.concat([proposal_valid, gt_classes > 0], axis=1)
        take = _replica_images(tf.shape(proposals)[0])
        wanted, valid = tf.gather(tf.constant(self.boxes), take), tf.gather(tf.constant(self.valid), take)
        distance = tf.reduce_max(tf.abs(wanted[:, :, None, :] - candidates[:, None, :, :]), axis=-1)  # [B, S, R + N]
        distance = tf.where(candidate_valid[:, None, :], distance, np.inf)
        nearest = tf.reduce_min(distance, axis=-1)  # [B, S]
        check = tf.debugging.assert_less_equal(
            tf.where(valid, nearest, 0.0), self.tolerance, message="a forced RoI is not among our candidates")
        with tf.control_dependencies([check]):
            self.rows[threading.get_ident()] = tf.where(valid, tf.argmin(distance, axis=-1, output_type=tf.int32), 0)
        return self.original_call(proposals, proposal_valid, gt_boxes, gt_classes, seed=seed)

    def _sampler(self, labels, num_samples, fraction, seed):
        take = _replica_images(tf.shape(labels)[0])
        return (self.rows[threading.get_ident()], tf.gather(tf.constant(self.positive), take),
                tf.gather(tf.constant(self.valid), take))


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def torchvision_step(tv_model, recorder, batch, tv_images, tv_targets, seed=2):
    """torchvision's training forward (torch seeded) and backward with its samples recorded -> (losses, record).

    Its RoI sampler is restricted to candidates our free pass (`recorder`) produced too; its mask loss
    is computed on our mask targets. record: anchor_labels / anchor_pos / anchor_neg, candidates, roi_map
    (per image: our candidate row of each of its candidates, -1 if none), roi_labels / roi_pos / roi_neg,
    own_mask_targets (its soft targets) and given_mask_targets (ours, which it used), per image."""
    record = {"own_mask_targets": [], "given_mask_targets": []}
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
            rows = match_rows(recorder.candidates[b], recorder.candidate_valid[b], boxes)
            record["roi_map"].append(rows)
            restricted.append(torch.where(torch.from_numpy(rows >= 0), label, torch.full_like(label, -1)))
        record["roi_labels"] = [l.numpy().copy() for l in labels]
        pos, neg = roi_sampler(restricted)
        record["roi_pos"], record["roi_neg"] = ([p.numpy().astype(bool) for p in pos],
                                                [n.numpy().astype(bool) for n in neg])
        return pos, neg

    image_counter = iter(range(len(tv_images)))
    tv_project_masks = tv_roi_heads.project_masks_on_boxes

    def our_mask_targets(gt_masks, boxes, matched_idxs, size):
        # torchvision's loss on our targets (mask loss compared on equal targets); its own kept aside.
        record["own_mask_targets"].append(tv_project_masks(gt_masks, boxes, matched_idxs, size).numpy())
        record["given_mask_targets"].append(_our_mask_targets(batch, next(image_counter), boxes, matched_idxs, size))
        return torch.from_numpy(record["given_mask_targets"][-1])

    tv_model.rpn.fg_bg_sampler = recording_rpn_sampler
    tv_model.roi_heads.fg_bg_sampler = restricted_roi_sampler
    tv_model.roi_heads.add_gt_proposals = recording_add_gt_proposals
    tv_roi_heads.project_masks_on_boxes = our_mask_targets
    try:
        torch.manual_seed(seed)
        tv_losses = tv_model(tv_images, tv_targets)
    finally:
        tv_roi_heads.project_masks_on_boxes = tv_project_masks
        tv_model.rpn.fg_bg_sampler, tv_model.roi_heads.fg_bg_sampler = rpn_sampler, roi_sampler
        del tv_model.roi_heads.add_gt_proposals  # back to the class's method
    sum(tv_losses.values()).backward()
    return tv_losses, record


def _our_mask_targets(batch, image, boxes, matched_idxs, size):
    """Our binary mask targets (numpy float32 [R, size, size]) for torchvision's RoIs `boxes` (a tensor
    [R, 4] [x1, y1, x2, y2]) of image `image`, matched to its gt `matched_idxs`."""
    targets = mask_ops.mask_targets(batch["gt_masks"][image:image + 1], batch["gt_boxes"][image:image + 1],
                                    tf.constant(boxes.detach().float().numpy()[None][..., [1, 0, 3, 2]]),
                                    tf.constant(matched_idxs.numpy()[None].astype(np.int32)), output_size=size)
    return targets.numpy()[0]


def replay_torchvision_step(tv_model, record, batch, tv_images, tv_targets):
    """torchvision's training forward and backward on the samples of a recorded torchvision_step (the same
    anchors; the same RoI boxes, found among this run's candidates, whose order may differ; our mask
    targets), e.g. in float64 (tv_model and images converted) as the exact reference. -> losses."""
    candidates = {}
    add_gt_proposals = tv_model.roi_heads.add_gt_proposals

    def recording_add_gt_proposals(proposals, gt_boxes):
        candidates["boxes"] = add_gt_proposals(proposals, gt_boxes)
        return candidates["boxes"]

    def recorded_rpn_sampler(labels):
        return ([torch.from_numpy(p.astype(np.uint8)) for p in record["anchor_pos"]],
                [torch.from_numpy(n.astype(np.uint8)) for n in record["anchor_neg"]])

    def recorded_roi_sampler(labels):
        chosen = []
        for b, boxes in enumerate(candidates["boxes"]):
            boxes = boxes.detach().double().numpy()
            for taken in (record["roi_pos"][b], record["roi_neg"][b]):
                distance = np.abs(record["candidates"][b][taken][:, None, :] - boxes[None]).max(-1)
                assert distance.min(1).max() <= 1e-2, "a recorded RoI is not among this run's candidates"
                mask = np.zeros(len(boxes), np.uint8)
                mask[distance.argmin(1)] = 1
                assert mask.sum() == taken.sum()
                chosen.append(torch.from_numpy(mask))
        return chosen[0::2], chosen[1::2]

    image_counter = iter(range(len(tv_images)))
    tv_project_masks = tv_roi_heads.project_masks_on_boxes

    def our_mask_targets(gt_masks, boxes, matched_idxs, size):
        targets = _our_mask_targets(batch, next(image_counter), boxes, matched_idxs, size)
        return torch.from_numpy(targets).to(boxes.dtype)

    rpn_sampler, roi_sampler = tv_model.rpn.fg_bg_sampler, tv_model.roi_heads.fg_bg_sampler
    tv_model.rpn.fg_bg_sampler, tv_model.roi_heads.fg_bg_sampler = recorded_rpn_sampler, recorded_roi_sampler
    tv_model.roi_heads.add_gt_proposals = recording_add_gt_proposals
    tv_roi_heads.project_masks_on_boxes = our_mask_targets
    try:
        tv_losses = tv_model(tv_images, tv_targets)
    finally:
        tv_roi_heads.project_masks_on_boxes = tv_project_masks
        tv_model.rpn.fg_bg_sampler, tv_model.roi_heads.fg_bg_sampler = rpn_sampler, roi_sampler
        del tv_model.roi_heads.add_gt_proposals
    sum(tv_losses.values()).backward()
    return tv_losses


def force_torchvision_samples(model, recorder, record):
    """Checks that torchvision's anchors, proposals and RoI labels are ours (free pass), then makes our
    samplers take torchvision's anchor rows and RoI boxes (install_samples). -> namespace: anchor_rows /
    anchor_positive, roi_rows (our free pass's rows) / roi_boxes / roi_positive per image, and found (the
    share of torchvision's RoI candidates that are ours)."""
    images = len(record["anchor_labels"])
    # Anchors and their labels agree row by row (same anchors, same matching): one index space.
    for b in range(images):
        np.testing.assert_array_equal(recorder.anchor_labels[b], record["anchor_labels"][b])
    # The proposal stage agrees: (almost) every torchvision candidate is one of ours.
    found = float(np.concatenate([rows >= 0 for rows in record["roi_map"]]).mean())
    assert found >= 0.99, f"only {found:.4f} of torchvision's RoI candidates are ours"

    anchor_rows = [np.concatenate([np.flatnonzero(p), np.flatnonzero(n)]) for p, n in
                   zip(record["anchor_pos"], record["anchor_neg"])]
    anchor_positive = [np.arange(len(r)) < p.sum() for r, p in zip(anchor_rows, record["anchor_pos"])]
    roi_rows, roi_boxes, roi_positive = [], [], []
    for b in range(images):
        taken = np.flatnonzero(record["roi_pos"][b] | record["roi_neg"][b])  # torchvision's order
        roi_rows.append(record["roi_map"][b][taken])
        roi_boxes.append(record["candidates"][b][taken][:, [1, 0, 3, 2]])
        roi_positive.append(record["roi_labels"][b][taken] > 0)
        # Our matching labels those rows as torchvision's does (foreground or background).
        np.testing.assert_array_equal(recorder.roi_labels[b][roi_rows[b]] == 1, roi_positive[b])
    del model.roi_sampler.call  # the Recorder's, back to the class's call
    forced = types.SimpleNamespace(anchor_rows=anchor_rows, anchor_positive=anchor_positive, roi_rows=roi_rows,
                                   roi_boxes=roi_boxes, roi_positive=roi_positive, found=found)
    install_samples(model, forced)
    return forced


def install_samples(model, forced):
    """Our model's samplers take force_torchvision_samples' anchor rows and RoI boxes."""
    model.anchor_labeler.sampler = forced_sampler(forced.anchor_rows, forced.anchor_positive,
                                                  model.anchor_labeler.batch_size_per_image)
    ForcedRoIs(model.roi_sampler, forced.roi_boxes, forced.roi_positive)


def mask_target_disagreement(record, roi_positive):
    """Share of the mask target pixels where torchvision's soft targets, binarised at 0.5, differ from our
    binary ones on the same RoIs (and the mean |soft - ours|)."""
    theirs_soft = np.concatenate(record["own_mask_targets"])
    ours_binary = np.concatenate(record["given_mask_targets"])
    assert theirs_soft.shape == ours_binary.shape and theirs_soft.shape[0] == sum(int(p.sum()) for p in roi_positive)
    assert set(np.unique(ours_binary)) <= {0.0, 1.0}
    return float(((theirs_soft >= 0.5) != ours_binary).mean()), float(np.abs(theirs_soft - ours_binary).mean())


def group_of(path):
    """The GROUPS name of one of our variable paths."""
    return next(name for name, prefix in GROUPS if path.startswith(prefix))


GROUP_NAMES = tuple(name for name, _ in GROUPS)


def torchvision_gradients(tv_model, num_classes):
    """{our variable path: gradient} of the gradients torchvision's backward left on tv_model."""
    return torchvision_variables(state_dict(tv_model, use_grad=True), num_classes)[0]


def gradient_errors(gradients, tv_gradients, group=group_of, names=GROUP_NAMES):
    """{group name: [relative error of each variable's gradient]} of our {path: numpy gradient} against
    torchvision's (torchvision_gradients); backbone conv biases skipped (no counterpart)."""
    errors = {name: [] for name in names}
    for path, gradient in gradients.items():
        if is_backbone_conv_bias(path):
            continue
        assert gradient is not None, path
        errors[group(path)].append(relative(gradient, tv_gradients[path]))
    return errors


def update_errors(before, after, tv_after, group=group_of, names=GROUP_NAMES):
    """{group name: [relative error of each variable's update beyond one float32 ulp of the weight]}: ours
    (before -> after, {path: numpy}) against torchvision's (before -> tv_after, mapped to our paths)."""
    errors = {name: [] for name in names}
    for path in after:
        if is_backbone_conv_bias(path):
            continue
        # An update is known only to the rounding of the weight it was added to: one float32 ulp per
        # element (2**-23 relative), which for weights of norm ~1 and updates ~1e-6 is 1e-3 of the update.
        ulp_noise = 2.0**-23 * np.linalg.norm(before[path])
        theirs = tv_after[path] - before[path]
        difference = np.linalg.norm((after[path] - before[path]) - theirs)
        errors[group(path)].append(max(difference - ulp_noise, 0.0) / np.linalg.norm(theirs))
    return errors


def largest(errors):
    return {k: f"{max(v):.1e}" for k, v in errors.items() if v}
