"""One training step of our torchvision-v2 Mask R-CNN equals one step of torchvision's
maskrcnn_resnet50_fpn_v2 trained from scratch, on one replica and on two with synchronized BatchNorm.

torchvision's side: maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None), i.e.
trainable_backbone_layers=5 and nn.BatchNorm2d in the backbone, BN after every FPN, box-head and
mask-head conv, all in training mode (module.train(): batch statistics, running statistics updated with
momentum 0.1; in the RoI heads the statistics run over the RoIs of all images: torchvision concatenates
the images' sampled RoIs before its box head and their foreground RoIs before its mask head). Its BN
affine parameters, running statistics and biases are random (so a missing or swapped parameter shows);
the last BN of each residual branch (bn3) gets gamma in 0.1..0.3, as trained ResNets have small
residual-branch scales: with gamma ~1 the 16 random blocks in batch-statistics mode make the step so ill-
conditioned that torchvision's own float32 gradients are 1.5% off its float64 ones. Ours: the preset
torchvision_maskrcnn_r50_fpn_v2 with model.backbone.norm=batch_norm and freeze_at 0 (nothing frozen),
imported by weights/torchvision_mapping.py. Both sample 64 RoIs per image (the preset's 512 only makes the
4-conv box head 8x slower). The batch: two generated images (4 and 1 rectangles, ellipses or triangles
on a gradient, 128 x 160 and 112 x 160 pixels; no data files), which torchvision pads to 128 x 192 (size
divisible by 64), our canvas; neither model resizes (torchvision: min_size 10000, max_size 160: scale 1).

The procedure is training_oracle.py's (the v1 test's, test_training_equivalence.py): our free pass
records our anchor labels and RoI candidates, torchvision's step records the anchors and RoIs it samples,
our step takes the same anchors and RoI boxes through the `sampler` hooks. Compared:
- every loss, to 1e-4 relative (measured <= 6e-7);
- every BN layer's moving mean and variance after the step (their updates to 1e-3; measured <= 8e-6);
- the gradient of every trainable variable, BN gamma and beta included (per group, BN apart), against
  torchvision's float32 gradients (printed) and against the exact ones: torchvision's step replayed in
  float64 on the same samples. Random BN networks amplify float32 rounding: torchvision's own float32
  gradients are up to 6.8e-3 off the exact ones (5.3e-3 in the RPN head); ours up to 1.8e-2 in the
  backbone on one replica (3.2e-2 with other images) and <= 6.1e-3 elsewhere. Ours is the less precise
  because TensorFlow's CPU reductions over the batch and spatial axes (BatchNorm's moments) sum
  sequentially: per-channel mean and variance errors of ~1e-6..1e-5 where torch's are ~1e-7, which the
  backbone's backward pass amplifies; two replicas, each summing half as many values, come closer.
  Tolerances: 0.1 in the backbone, 2e-2 elsewhere;
- the update, one SGD step (momentum 0.9, coupled weight decay 4e-5, none on normalization parameters as
  the torchvision references' --norm-weight-decay 0: torch.optim.SGD with the parameter groups of
  torchvision.ops._utils.split_normalization_params; ours: SGDCoupledDecay excluding
  optimizer.normalization_variables, as build_optimizer does): each side's step is that rule applied to
  its own gradients (to 1e-5 beyond one float32 ulp of the weight; measured 0), so ours differs from
  torchvision's only by the gradients (printed).

- One replica, batch 2, every norm batch_norm, model.train_step run eagerly. The images have different
  foreground RoI counts (16 and 7), so our mask head's [2, 16] batch has padding rows; its BN statistics
  leave them out (MaskHead's roi_valid; with them the mask loss is off by 0.6% and the mask head's
  gradients by 33%).
- Two replicas (tests/conftest.py's MirroredStrategy on 2 logical CPUs), one image each, every norm
  sync_batch_norm (backbone, FPN, heads), model.train_step as a tf.function: the oracle is the same
  single-process torchvision step on the 2-image batch (nn.BatchNorm2d over the batch equals
  SyncBatchNorm over two one-image processes). Losses are the global batch's (summed over replicas, as
  train_step logs them), gradients summed over replicas (train_step's all-reduce), and both replicas
  hold the same gradients, weights and moving statistics.

Differences by definition (the v1 test's, and one of BatchNorm's):
- Normalizers: torchvision divides the RPN and box losses by the rows it sampled, ours by the fixed
  images x batch_size_per_image / num_samples; equal when every image has enough candidates (asserted;
  the other case is test_training_equivalence.py's test_normalizers_...).
- Mask targets: ours binary, torchvision's soft; the mask loss is compared on ours (given to torchvision)
  and the two targets' disagreement measured.
- Backbone conv biases: keras.applications' ResNet convs have one, torchvision's none (imported as 0).
  Before a BN in batch-statistics mode its gradient is 0 up to rounding; not compared.
- Moving variance: Keras updates it with the biased batch variance, torch with the unbiased one (a
  factor n / (n - 1), n the values per channel: images x H x W in the backbone and FPN, RoIs x 7 x 7 or
  RoIs x 14 x 14 in the heads, over the global batch). The expected moving variance is torch's with that
  factor taken out: 0.9 * old + (torch's new - 0.9 * old) * (n - 1) / n.
"""
import threading
import types

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.layers import norm as norm_lib
from maskrcnn_tf.model import build_model
from maskrcnn_tf.optimizer import SGDCoupledDecay, normalization_variables
from maskrcnn_tf.weights.torchvision_mapping import assign_torchvision_weights, torchvision_variables
from tests.conftest import two_replica_strategy
from tests.e2e import training_oracle as oracle
from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()
from torchvision.ops._utils import split_normalization_params  # noqa: E402

SIZES = ((128, 160), (112, 160))  # (h, w) of the two generated images; equal long sides: scale 1
LONG_SIDE = 160
CANVAS = (128, 192)  # torchvision's padded batch (multiples of 64) = our canvas
SHAPES_PER_IMAGE = (4, 1)  # different foreground RoI counts: padding rows in our mask head's batch
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.02, 0.9, 4e-5
ROI_SAMPLES = 64  # RoIs sampled per image on both sides (the preset's 512: 8x the box head's work)
TORCH_BN_MOMENTUM = 0.1
# Groups of variables: training_oracle.GROUPS, each with its BN parameters apart.
GROUP_NAMES = tuple(name for g in oracle.GROUP_NAMES for name in (g, f"{g} BN") if name != "rpn BN")
# Gradients against the exact ones (torchvision in float64 on the same samples), relative per variable (norm
# of the difference over the norm), largest per group. Measured (module docstring): ours <= 1.8e-2 in the
# backbone (3.2e-2 with other images) and <= 6.1e-3 elsewhere; torchvision's own float32 gradients <= 6.8e-3
# in the backbone and <= 5.3e-3 elsewhere. A wrong
# normalizer is off by >= 2x, a dropped term or BN statistics over other rows by far more than 2e-2 in
# the heads; the losses, BN statistics and update rule are compared far tighter.
BACKBONE_GRADIENT_TOLERANCE = 0.1
GRADIENT_TOLERANCE = 2e-2
UPDATE_TOLERANCE = 1e-5  # SGD's rule on the own gradients, beyond one ulp of the weight (measured 0)
STATISTICS_TOLERANCE = 1e-3  # moving statistics' updates (measured <= 8e-6)


def _group(path):
    group = oracle.group_of(path)
    return f"{group} BN" if "_bn/" in path or "_norm/" in path else group


def _config(norm):
    return config_lib.replace(config_lib.get_preset("torchvision_maskrcnn_r50_fpn_v2"), **{
        "model.image_size": CANVAS, "model.backbone.weights": None,
        "model.backbone.norm": norm, "model.backbone.freeze_at": 0, "model.fpn_norm": norm,
        "model.heads.box_norm": norm, "model.heads.mask_norm": norm, "model.roi.num_samples": ROI_SAMPLES,
        "data.max_instances": 8, "data.train_batch_size": 2,
        "train.weight_decay": WEIGHT_DECAY, "train.momentum": MOMENTUM})


def _shape_images(seed=0):
    """Per image of SIZES: {"rgb", "boxes", "classes", "masks"} (training_oracle.make_batch's input): a
    linear-gradient background, SHAPES_PER_IMAGE non-overlapping filled rectangles, ellipses and
    triangles of 20-64 px in contrasting colours, pixel noise; classes drawn from 1..90."""
    rng = np.random.default_rng(seed)
    images = []
    for (h, w), shapes in zip(SIZES, SHAPES_PER_IMAGE):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        rgb = low + ramp[..., None] * (high - low)  # [h, w, 3]
        boxes, classes, masks = [], [], []
        occupied = np.zeros((h, w), bool)
        for _ in range(200):
            if len(masks) == shapes:
                break
            bh, bw = rng.integers(20, 65, 2)
            y1, x1 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            y2, x2 = y1 + int(bh), x1 + int(bw)
            mask = np.zeros((h, w), np.uint8)
            kind = int(rng.integers(3))
            if kind == 0:
                mask[y1:y2, x1:x2] = 1
            elif kind == 1:
                cv2.ellipse(mask, (((x1 + x2) / 2, (y1 + y2) / 2), (x2 - x1, y2 - y1), 0), 1, -1)
            else:
                cv2.fillPoly(mask, [np.array([[x1, y2 - 1], [x2 - 1, y2 - 1], [(x1 + x2) // 2, y1]], np.int32)], 1)
            if (occupied & (mask > 0)).any():
                continue
            occupied |= mask > 0
            colour = rgb[mask > 0].mean(0)
            rgb[mask > 0] = np.where(colour > 127, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3))
            ys, xs = np.nonzero(mask)
            boxes.append([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
            classes.append(int(rng.integers(1, 91)))
            masks.append(mask)
        assert len(masks) == shapes
        rgb = np.clip(np.round(rgb + rng.normal(0.0, 6.0, rgb.shape)), 0, 255).astype(np.float32)
        images.append({"rgb": rgb, "boxes": np.asarray(boxes, np.float32), "classes": classes,
                       "masks": np.stack(masks)})
    return images


def _torchvision_v2_model(cfg):
    """maskrcnn_resnet50_fpn_v2 from scratch (every layer trainable, nn.BatchNorm2d everywhere), seeded
    random weights with random BN affine parameters, running statistics and biases, in training mode;
    its transform normalises like our preset and neither resizes (scale 1) nor pads beyond CANVAS."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91,
                                     min_size=10000, max_size=LONG_SIDE, size_divisible=64,
                                     box_batch_size_per_image=ROI_SAMPLES,
                                     image_mean=[m / 255 for m in cfg.model.pixel_mean],
                                     image_std=[s / 255 for s in cfg.model.pixel_std])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.weight.shape[0]
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                if name.endswith(".bn3"):  # the last BN of a residual branch (module docstring)
                    module.weight.mul_(0.2)
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=generator))
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)) and \
                    module.bias is not None:
                module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=generator))
    model.train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 53 + 8 + 4 + 4 and all(m.training and m.eps == 1e-5 for m in norms)
    assert all(p.requires_grad for p in model.parameters())  # trainable_backbone_layers=5
    return model


def _count_batch_norm_values(tv_model):
    """{BN module name: values per channel of its last training call}, filled by forward hooks."""
    counts = {}
    for name, module in tv_model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(
                lambda m, inputs, output, name=name: counts.__setitem__(name, inputs[0].numel() // inputs[0].shape[1]))
    return counts


def _moving_statistics(model):
    return {v.path: v for v in model.non_trainable_variables if v.path.endswith(("moving_mean", "moving_variance"))}


@pytest.fixture(scope="module")
def step():
    """torchvision's step on the two images and everything ours needs to repeat it: the samplers forced
    to torchvision's rows, torchvision's losses, gradients (float32, and float64 on the same samples),
    weights and BN statistics after its step."""
    cfg = _config("batch_norm")
    batch, tv_images, tv_targets = oracle.make_batch(cfg, _shape_images(), CANVAS)
    tv_model = _torchvision_v2_model(cfg)
    initial_state = oracle.state_dict(tv_model)
    model = build_model(cfg)
    assign_torchvision_weights(model, initial_state)

    # Our free pass (BN in training mode, as torchvision's proposals see it); it moves our moving
    # statistics, which are put back.
    statistics = {path: v.numpy() for path, v in _moving_statistics(model).items()}
    recorder = oracle.Recorder(model)
    model.compute_losses(batch, training=True)
    for path, v in _moving_statistics(model).items():
        v.assign(statistics[path])

    counts = _count_batch_norm_values(tv_model)
    tv_losses, record = oracle.torchvision_step(tv_model, recorder, batch, tv_images, tv_targets)
    forced = oracle.force_torchvision_samples(model, recorder, record)
    roi_positive = forced.roi_positive
    # Normalizers: equal because every image had enough candidates (module docstring).
    assert [len(r) for r in forced.anchor_rows] == [model.anchor_labeler.batch_size_per_image] * 2
    assert [len(r) for r in forced.roi_rows] == [ROI_SAMPLES] * 2
    # The heads' BN sees all RoIs of the batch: the sampled ones in the box head, the foreground ones in
    # the mask head.
    assert counts["roi_heads.box_head.0.1"] == 2 * ROI_SAMPLES * 7 * 7
    assert counts["roi_heads.mask_head.0.1"] == sum(int(p.sum()) for p in roi_positive) * 14 * 14
    # Different foreground counts: our mask head's [2, Sm] batch has padding rows, which its BN statistics
    # must leave out (MaskHead's roi_valid).
    assert int(roi_positive[0].sum()) != int(roi_positive[1].sum())
    disagreement, difference = oracle.mask_target_disagreement(record, roi_positive)
    assert disagreement <= 0.1, disagreement  # the same masks (test_training_equivalence.py)
    print(f"\nforeground RoIs per image {[int(p.sum()) for p in roi_positive]}; mask targets differ in "
          f"{disagreement:.4f} of the pixels (mean |soft - ours| {difference:.3f}); RoI candidates found "
          f"{forced.found:.4f}")

    # The exact gradients: torchvision's step in float64 on the same samples and targets.
    exact = _torchvision_v2_model(cfg).double()
    exact_losses = oracle.replay_torchvision_step(exact, record, batch, [i.double() for i in tv_images],
                                                  [dict(t, boxes=t["boxes"].double()) for t in tv_targets])
    for name, value in tv_losses.items():
        assert float(exact_losses[name]) == pytest.approx(float(value), rel=1e-4), name
    exact_gradients = oracle.torchvision_gradients(exact, cfg.model.num_classes)
    tv_gradients = oracle.torchvision_gradients(tv_model, cfg.model.num_classes)

    # torchvision's update: SGD with the references' parameter groups (--norm-weight-decay 0).
    norm_parameters, other_parameters = split_normalization_params(tv_model)
    norm_keys = {name for name, p in tv_model.named_parameters() if any(p is q for q in norm_parameters)}
    torch.optim.SGD([{"params": other_parameters, "weight_decay": WEIGHT_DECAY},
                     {"params": norm_parameters, "weight_decay": 0.0}],
                    lr=LEARNING_RATE, momentum=MOMENTUM).step()
    tv_after, sources = torchvision_variables(oracle.state_dict(tv_model), cfg.model.num_classes)
    initial, _ = torchvision_variables(initial_state, cfg.model.num_classes)
    decayed = {path: source not in norm_keys for path, source in sources.items()}
    assert sum(not d for d in decayed.values()) == 2 * (53 + 8 + 4 + 4)  # gamma and beta of every BN
    return types.SimpleNamespace(
        batch=batch, model=model, initial_state=initial_state, initial=initial, forced=forced, counts=counts,
        tv_losses={k: float(v.detach()) for k, v in tv_losses.items()}, tv_gradients=tv_gradients,
        exact_gradients=exact_gradients, tv_after=tv_after, sources=sources, decayed=decayed)


def _sgd_update_error(before, after, gradients, decayed):
    """{path: relative error, beyond one float32 ulp of the weight, of the update before -> after against
    torch.optim.SGD's first step (momentum buffer = gradient) with weight decay where `decayed`}."""
    errors = {}
    for path, w in before.items():
        if oracle.is_backbone_conv_bias(path):
            continue
        w, gradient = w.astype(np.float64), gradients[path]
        expected = -LEARNING_RATE * (gradient + (WEIGHT_DECAY * w if decayed[path] else 0.0))
        ulp_noise = 2.0**-23 * np.linalg.norm(w)
        errors[path] = max(np.linalg.norm((after[path] - w) - expected) - ulp_noise, 0.0) / np.linalg.norm(expected)
    return errors


def _train_step(model, batch, strategy):
    """model.train_step under `strategy` (one image per replica) with SGDCoupledDecay excluding the
    normalization parameters from decay -> (losses, summed gradients {path: numpy}, weights before and after,
    moving statistics after per replica {path: [numpy per replica]})."""
    with strategy.scope():
        optimizer = SGDCoupledDecay(learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        optimizer.exclude_from_weight_decay(var_list=normalization_variables(model))
        model.compile(optimizer=optimizer, jit_compile=False)
        optimizer.build(model.trainable_variables)
    variables = model.trainable_variables
    before = {v.path: v.numpy() for v in variables}

    # train_step's gradients, as it hands them to the optimizer (after its sum over replicas); each
    # replica's function runs in a thread of its own.
    captured, apply_gradients = {}, optimizer.apply_gradients

    def recording_apply_gradients(grads_and_vars, *args, **kwargs):
        pairs = list(grads_and_vars)
        captured[threading.get_ident()] = [g for g, _ in pairs]
        return apply_gradients(pairs, *args, **kwargs)

    optimizer.apply_gradients = recording_apply_gradients

    def replica_step(data):
        logs = model.train_step(data)
        return logs, captured[threading.get_ident()]

    replicas = strategy.num_replicas_in_sync
    per_replica = len(SIZES) // replicas
    data = strategy.experimental_distribute_values_from_function(
        lambda context: {k: v[context.replica_id_in_sync_group * per_replica:][:per_replica]
                         for k, v in batch.items()})
    run = lambda d: strategy.run(replica_step, args=(d,))  # noqa: E731
    # One replica: eagerly (3 s; tracing the step takes 20 s). Two: as a tf.function, as Keras runs
    # train_step (run eagerly, MirroredStrategy's threads give the FPN lateral BN betas gradients 0.7% off).
    logs, gradients = (run if replicas == 1 else tf.function(run))(data)
    logs = {k: [float(x) for x in strategy.experimental_local_results(v)] for k, v in logs.items()}
    gradients = [[g.numpy() for g in strategy.experimental_local_results(v)] for v in gradients]
    for name, values in logs.items():  # every replica logs the global batch's losses
        assert len(values) == replicas and values.count(values[0]) == replicas, (name, values)
    for v, local in zip(variables, gradients):  # and holds the same summed gradients
        for g in local[1:]:
            np.testing.assert_array_equal(g, local[0], err_msg=v.path)
    after = {}
    for v in variables:
        copies = [x.numpy() for x in strategy.experimental_local_results(v.value)]
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0], err_msg=v.path)
        after[v.path] = copies[0]
    statistics = {path: [x.numpy() for x in strategy.experimental_local_results(v.value)]
                  for path, v in _moving_statistics(model).items()}
    return ({k: v[0] for k, v in logs.items()}, {v.path: g[0] for v, g in zip(variables, gradients)},
            before, after, statistics)


def _compare(step, losses, gradients, before, after, statistics):
    """Asserts every comparison of the module docstring; prints the measured errors."""
    loss_error = {}
    for ours, theirs in oracle.LOSS_PAIRS.items():
        loss_error[ours] = abs(losses[ours] - step.tv_losses[theirs]) / abs(step.tv_losses[theirs])
        assert losses[ours] == pytest.approx(step.tv_losses[theirs], rel=1e-4), (ours, losses[ours], step.tv_losses)
    assert losses["rcnn_reg_loss"] > 0 and losses["rcnn_mask_loss"] > 0  # foreground was sampled

    # Gradients: ours against torchvision's float32 ones (reported) and against the exact (float64) ones.
    gradient_error = oracle.gradient_errors(gradients, step.tv_gradients, _group, GROUP_NAMES)
    exact_error = oracle.gradient_errors(gradients, step.exact_gradients, _group, GROUP_NAMES)
    reference_error = oracle.gradient_errors({p: step.tv_gradients[p] for p in gradients}, step.exact_gradients,
                                             _group, GROUP_NAMES)

    # The update: torchvision's (SGD, momentum, decay except on norm parameters) applied to our gradients,
    # and torchvision's own step is that rule applied to its gradients. Ours vs torchvision's: reported.
    our_rule_error = _sgd_update_error(before, after, gradients, step.decayed)
    tv_rule_error = _sgd_update_error(before, step.tv_after, step.tv_gradients, step.decayed)
    update_error = oracle.update_errors(before, after, step.tv_after, _group, GROUP_NAMES)

    # Moving statistics: the update (new - old) against torch's, the moving variance's with torch's
    # unbiased n / (n - 1) taken out (module docstring). Every replica holds the same.
    statistics_error = {"mean": [], "variance": []}
    keep = 1.0 - TORCH_BN_MOMENTUM
    for path, copies in statistics.items():
        old, theirs = step.initial[path], step.tv_after[path]
        if path.endswith("moving_variance"):
            n = step.counts[step.sources[path].rsplit(".", 1)[0]]
            theirs = keep * old + (theirs - keep * old) * (n - 1) / n
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0], err_msg=path)
        ulp_noise = 2.0**-23 * np.linalg.norm(old)
        difference = np.linalg.norm((copies[0] - old) - (theirs - old))
        statistics_error["mean" if path.endswith("moving_mean") else "variance"].append(
            max(difference - ulp_noise, 0.0) / np.linalg.norm(theirs - old))
    assert len(statistics_error["mean"]) == len(statistics_error["variance"]) == 53 + 8 + 4 + 4

    print("\nlargest relative loss difference:", {k: f"{v:.1e}" for k, v in loss_error.items()})
    print("largest relative gradient difference, ours vs torchvision:", oracle.largest(gradient_error))
    print("  ours vs exact (torchvision float64):", oracle.largest(exact_error))
    print("  torchvision float32 vs exact:", oracle.largest(reference_error))
    print("largest relative update difference beyond one ulp, ours vs torchvision:", oracle.largest(update_error))
    print(f"  vs SGD's rule on the own gradients: ours {max(our_rule_error.values()):.1e}, "
          f"torchvision {max(tv_rule_error.values()):.1e}")
    print("largest relative BN statistics update difference:", oracle.largest(statistics_error))
    for group in GROUP_NAMES:
        tolerance = BACKBONE_GRADIENT_TOLERANCE if group.startswith("backbone") else GRADIENT_TOLERANCE
        assert exact_error[group] and max(exact_error[group]) <= tolerance, (group, max(exact_error[group]))
        # The float64 replay is the same step (a replay on other samples would be off by far more).
        assert max(reference_error[group]) <= tolerance, (group, max(reference_error[group]))
    for errors in (our_rule_error, tv_rule_error):
        worst = max(errors, key=errors.get)
        assert errors[worst] <= UPDATE_TOLERANCE, (worst, errors[worst])
    for kind, errors in statistics_error.items():
        assert max(errors) <= STATISTICS_TOLERANCE, (kind, max(errors))


@pytest.mark.slow
def test_one_replica_step_with_batch_norm_equals_torchvision_v2(step):
    _compare(step, *_train_step(step.model, step.batch, tf.distribute.get_strategy()))


@pytest.mark.slow
def test_two_replica_step_with_sync_batch_norm_equals_torchvision_v2_on_the_whole_batch(step):
    strategy = two_replica_strategy()
    with strategy.scope():
        model = build_model(_config("sync_batch_norm"))
        assign_torchvision_weights(model, step.initial_state)
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 53 + 8 + 4 + 4 and all(n.synchronized and n.trainable for n in norms)
    oracle.install_samples(model, step.forced)
    _compare(step, *_train_step(model, step.batch, strategy))


def test_masked_batch_norm_takes_statistics_over_the_counted_rows_of_every_replica():
    """layers/norm.py's BatchNormalization with a row mask (the mask head's padding rows left out): the
    statistics of the counted rows only, over both replicas with sync_batch_norm (torch's BatchNorm2d on
    the counted rows of both replicas), and a batch without a counted row keeps the moving statistics
    (keras' own masked statistics are never synchronized)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 3, 3, 6)) * rng.uniform(0.5, 2.0, 6) + rng.normal(0.0, 1.0, 6)).astype(np.float32)
    rows = np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)  # replica 0: rows 0..3, replica 1: rows 4..7
    reference = torch.nn.BatchNorm2d(6).train()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x[rows]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    n = int(rows.sum()) * 3 * 3
    expected_mean = reference.running_mean.numpy()
    expected_variance = 0.9 + (reference.running_var.numpy() - 0.9) * (n - 1) / n  # biased (module docstring)

    def check(layer, outputs):
        np.testing.assert_allclose(outputs[rows], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), expected_variance, rtol=1e-5, atol=1e-6)

    mask = np.broadcast_to(rows[:, None, None], x.shape[:3])
    single = norm_lib.make("batch_norm", 6, "single")
    check(single, single(tf.constant(x), training=True, mask=tf.constant(mask)).numpy())

    strategy = two_replica_strategy()
    with strategy.scope():
        synced = norm_lib.make("sync_batch_norm", 6, "synced")
        synced.build(x.shape)
    inputs = strategy.experimental_distribute_values_from_function(
        lambda context: (tf.constant(x[4 * context.replica_id_in_sync_group:][:4]),
                         tf.constant(mask[4 * context.replica_id_in_sync_group:][:4])))
    outputs = strategy.run(tf.function(lambda pair: synced(pair[0], training=True, mask=pair[1])), args=(inputs,))
    check(synced, np.concatenate([o.numpy() for o in strategy.experimental_local_results(outputs)]))

    before = [single.moving_mean.numpy(), single.moving_variance.numpy()]
    single(tf.constant(x), training=True, mask=tf.zeros(x.shape[:3], tf.bool))
    np.testing.assert_allclose(single.moving_mean.numpy(), before[0], rtol=1e-6)  # 0.9 m + 0.1 m, rounded
    np.testing.assert_allclose(single.moving_variance.numpy(), before[1], rtol=1e-6)
