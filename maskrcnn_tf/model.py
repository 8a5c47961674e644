"""MaskRCNN(keras.Model) and build_model(config): the detector, read top to bottom like the paper's figure.

    images -> backbone (C2..C5) -> fpn (P2..P6) -> rpn_head -> proposal_generator
           -> [training: anchor_labeler + roi_sampler] -> roi_align 7x7 -> box_head
           -> [inference: detection_generator] -> roi_align 14x14 -> mask_head

`call(inputs)` is inference: inputs {"images" float32 [B, H, W, 3], "image_info" float32 [B, 4, 2]} ->
{"num_detections" int32 [B], "detection_boxes" float32 [B, D, 4] ([y1, x1, y2, x2] input pixels, -1
padded), "detection_scores" [B, D], "detection_classes" int32 [B, D] (1..K, 0 padded),
"detection_masks" float32 [B, D, 28, 28] probabilities (only with include_mask)}. With
inference_canvases (model.orientation_canvases) the batch runs on the first of those smaller canvases
that holds every image's valid extent (image_info row 1), else on the full one: the images sit
top-left, so the boxes keep their coordinates and only the zero border shrinks.

`train_step` / `test_step` take a batch of the data contract (docs/design.md section 5) and return the loss
components named as the MindSpore original logs them: rpn_cls_loss, rpn_reg_loss, rpn_loss,
rcnn_cls_loss, rcnn_reg_loss, rcnn_mask_loss, rcnn_loss, total_loss.

Distribution (docs/design.md section 13): each loss is a local sum divided by a normalizer of the global
batch (losses.py), and train_step sums the gradients over replicas once, before anything else touches
them, so N replicas equal one replica with the same global batch, and the loss-scale skip-or-apply
decision and gradient clipping (the optimizer's, after unscaling) see the same summed gradients on every
replica. The logged losses are summed over replicas too (_track). With jit_compile under several GPU/CPU
replicas, XLA compiles each replica's forward and backward pass (`compile`), not the step around
strategy.run, which would be one XLA cluster spanning every device.
Padding trimmed per batch (outside XLA): gt are padded to N = data.max_instances (100) and the mask
loss has room for max_mask_rois (128) foreground RoIs per image, but a COCO batch holds ~7 instances per
image and often far fewer foreground RoIs. Unless shapes must be static (`static_shapes`, i.e.
train.trim_padding off, as it is by default on GPU and TPU; a jit_compile'd train step; a TPU strategy),
compute_losses (a) gives the anchor labeler only the first n gt columns, n =
the batch's largest instance count, so the [B, A, N] anchor IoU (A = 261,888 at 1024) shrinks N/n times,
and (b) runs the mask RoIAlign, head, targets and loss on the batch's largest foreground count instead of
max_mask_rois. Both only drop rows and columns that cannot contribute (padding never matches, non-
foreground rows weigh 0), so losses and gradients are those of the static path (tested).
Mixed precision: the backbone and heads compute in the global policy's dtype; everything that handles
boxes (anchor labeling, proposals, sampling, RoIAlign's box math, detection) and all losses are float32.
"""

import functools
import random

import keras
import numpy as np
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import device_defaults, losses
from maskrcnn_tf.layers.banded_conv import BandedConv2D
from maskrcnn_tf.layers.anchor_labeler import AnchorLabeler
from maskrcnn_tf.layers.backbone import Backbone
from maskrcnn_tf.layers.box_head import BoxHead
from maskrcnn_tf.layers.detection_generator import DetectionGenerator
from maskrcnn_tf.layers.fpn import FPN
from maskrcnn_tf.layers.mask_head import MaskHead
from maskrcnn_tf.layers.proposal_generator import ProposalGenerator
from maskrcnn_tf.layers.roi_align import MultilevelRoIAlign
from maskrcnn_tf.layers.roi_sampler import RoISampler
from maskrcnn_tf.layers.rpn_head import RPNHead
from maskrcnn_tf.ops import anchors as anchor_ops
from maskrcnn_tf.ops import boxes as box_ops
from maskrcnn_tf.ops import masks as mask_ops
from maskrcnn_tf.ops import sampling

LOSS_NAMES = ("rpn_cls_loss", "rpn_reg_loss", "rpn_loss", "rcnn_cls_loss", "rcnn_reg_loss",
              "rcnn_mask_loss", "rcnn_loss", "total_loss")


def _sum_over_replicas(values):
    """Sum of `values` (a tensor, or a list of tensors and Nones) over all replicas in sync, as one
    batched all-reduce; identity outside tf.distribute and with one replica. Nones stay None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    if not isinstance(values, (list, tuple)):
        return context.all_reduce(tf.distribute.ReduceOp.SUM, values)
    present = [v for v in values if v is not None]
    summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present) if present else [])
    return [None if v is None else next(summed) for v in values]


def replica_jit_compile(jit_compile: bool, strategy: tf.distribute.Strategy) -> bool:
    """True where jit_compile must compile each replica's forward and backward pass instead of the
    whole step: several replicas of a GPU/CPU strategy. Keras compiles the function around strategy.run,
    which is one XLA cluster spanning all devices ("Trying to access resource ... located in device
    CPU:1 from device CPU:0"); a TPUStrategy compiles the whole step per core itself."""
    on_tpu = isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))
    return bool(jit_compile) and strategy.num_replicas_in_sync > 1 and not on_tpu


def _num_used_columns(valid):
    """1 + the last column index where `valid` [B, N] bool is true in any row (at least 1): int32 scalar."""
    column_numbers = tf.range(1, tf.shape(valid)[1] + 1)  # [N]
    return tf.maximum(tf.reduce_max(tf.where(valid, column_numbers[None], 0)), 1)


def _flatten_levels(outputs, last_dim=None):
    """{"P2": [B, H_l, W_l, A * d], ...} -> [B, sum_l H_l * W_l * A(, d)] in the anchors' order."""
    flat = []
    for level in sorted(outputs):
        x = tf.cast(outputs[level], tf.float32)
        shape = [tf.shape(x)[0], -1] + ([last_dim] if last_dim else [])
        flat.append(tf.reshape(x, shape))  # [B, H_l * W_l * A(, d)]
    return tf.concat(flat, axis=1)  # [B, A(, d)]


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class MaskRCNN(keras.Model):
    """The detector. Layers are built by build_model(config); the constructor takes them ready-made.

    Serialization: get_config() is the build_model Config (`{"config": config.to_dict(cfg)}`) and
    from_config rebuilds through build_model, so `model.save("m.keras")` / `keras.saving.load_model`
    round-trip (docs/design.md section 8). A MaskRCNN assembled by hand has no Config and cannot be saved.
    """

    def __init__(self, *, backbone, fpn, rpn_head, anchor_labeler, proposal_generator, roi_sampler,
                 box_roi_align, box_head, detection_generator, mask_roi_align=None, mask_head=None,
                 anchor_generator, image_size, inference_canvases=(), max_mask_rois, rpn_box_loss_beta,
                 rcnn_box_loss_beta, static_shapes=False, sampling_seed=None, **kwargs):
        # No defaults for config values: build_model passes them from the Config (config.py holds defaults).
        # The model itself is float32 so its inputs (image_info especially) are never cast to float16.
        super().__init__(dtype="float32", **kwargs)
        self.backbone = backbone
        self.fpn = fpn
        self.rpn_head = rpn_head
        self.anchor_labeler = anchor_labeler
        self.proposal_generator = proposal_generator
        self.roi_sampler = roi_sampler
        self.box_roi_align = box_roi_align
        self.box_head = box_head
        self.detection_generator = detection_generator
        self.mask_roi_align = mask_roi_align
        self.mask_head = mask_head
        self.include_mask = mask_head is not None
        # anchor_generator((height, width)) -> {"P2": [n, 4], ...}: a canvas's anchors (ops/anchors.py).
        self._anchor_generator = anchor_generator
        self._anchors_by_canvas = {}
        self.image_size = tuple(image_size)
        self.inference_canvases = tuple(tuple(c) for c in inference_canvases)  # ((h, w), ...) smaller ones
        self.anchors = self.anchors_for(*self.image_size)
        self.flat_anchors = np.concatenate([self.anchors[k] for k in sorted(self.anchors)])  # [A, 4]
        self.max_mask_rois = max_mask_rois
        self.rpn_box_loss_beta = rpn_box_loss_beta
        self.rcnn_box_loss_beta = rcnn_box_loss_beta
        self.static_shapes = static_shapes
        self.config = None  # the Config build_model made this model from (get_config)
        # Anchor / RoI sampling draws keyed by (seed, step, replica), never TF's stateful RNG, so replicas
        # draw differently (a TPU's cores would share one stateful draw). Without train.seed the seed is
        # drawn here from Python's RNG (keras.utils.set_random_seed seeds it): a new draw every run.
        self.sampling_seed = random.randrange(2**31) if sampling_seed is None else sampling_seed
        # compile(jit_compile=True) under several GPU/CPU replicas: XLA per replica (replica_jit_compile).
        self.replica_jit_compile = False
        self._compiled_replica_losses = None
        self._rcnn_coder = box_ops.BoxCoder(weights=box_ops.RCNN_BOX_WEIGHTS)
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_NAMES}

    def build(self, input_shape=None):
        # Sub-layers build themselves on the first call (build_model runs one), nothing to do here.
        self.built = True

    # ------------------------------------------------------------------------------ inference

    def _features(self, images, training):
        pyramid = self.fpn(self.backbone(images, training=training), training=training)
        rpn_scores, rpn_deltas = self.rpn_head(pyramid, training=training)
        return pyramid, rpn_scores, rpn_deltas

    def anchors_for(self, height, width):
        """{"P2": float32 [n, 4], ...} `[y1, x1, y2, x2]` anchors of a height x width canvas (cached)."""
        key = (int(height), int(width))
        if key not in self._anchors_by_canvas:
            self._anchors_by_canvas[key] = {level: np.asarray(a, np.float32)
                                            for level, a in self._anchor_generator(key).items()}
        return self._anchors_by_canvas[key]

    def call(self, inputs, training=False):
        images, image_info = inputs["images"], inputs["image_info"]
        if not self.inference_canvases:
            return self._detect(images, image_info, training)
        extent = tf.reduce_max(image_info[:, 1], axis=0)  # [2] the batch's largest valid (h, w)
        branches = [(tf.reduce_all(extent <= tf.constant(canvas, tf.float32)),
                     functools.partial(self._detect_on, canvas, images, image_info, training))
                    for canvas in self.inference_canvases]
        return tf.case(branches, default=functools.partial(self._detect, images, image_info, training))

    def _detect_on(self, canvas, images, image_info, training):
        """_detect on the top-left canvas (h, w) of images [B, H, W, 3]."""
        height, width = canvas
        return self._detect(images[:, :height, :width], image_info, training)

    def _detect(self, images, image_info, training):
        """Inference on images [B, h, w, 3] (h, w static: the canvas) -> call's output dict."""
        pyramid, rpn_scores, rpn_deltas = self._features(images, training)
        height, width = images.shape[1:3]
        anchors = self.anchors if height is None or width is None else self.anchors_for(height, width)
        proposals, _, proposal_valid = self.proposal_generator(
            rpn_scores, rpn_deltas, image_info, anchors=anchors, training=False)
        class_logits, box_deltas = self.box_head(self.box_roi_align(pyramid, proposals), training=training)
        detections = self.detection_generator(class_logits, box_deltas, proposals, proposal_valid, image_info)
        if self.include_mask:
            mask_features = self.mask_roi_align(pyramid, detections["detection_boxes"])
            mask_logits = self.mask_head(mask_features, detections["detection_classes"], training=training)
            detections["detection_masks"] = tf.sigmoid(tf.cast(mask_logits, tf.float32))  # [B, D, M, M]
        return detections

    # ---------------------------------------------------------------------------------- losses

    def _trims_padding(self) -> bool:
        """False where every shape must be static: XLA (jit_compile) and TPUs (module docstring)."""
        on_tpu = isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy)
        return not (self.static_shapes or self.jit_compile or self.replica_jit_compile or on_tpu)

    def check_batch(self, data):
        """ValueError naming the key when a batch does not fit the data contract (static shapes, so
        this runs once at trace time, not per step)."""
        required = {"images", "image_info", "gt_boxes", "gt_classes"} | ({"gt_masks"} if self.include_mask else set())
        missing = required - set(data)
        if missing:
            raise ValueError(f"batch: missing {sorted(missing)}; got keys {sorted(data)}")
        height, width = self.image_size
        shapes = {k: tuple(tf.TensorShape(v.shape).as_list()) for k, v in data.items()}
        if shapes["images"][1:] != (height, width, 3):
            raise ValueError(f"batch: images has shape {shapes['images']}; the model expects [B, {height}, {width}, 3]")
        expected = {"image_info": (4, 2), "gt_boxes": (None, 4), "gt_classes": (None,)}
        if self.include_mask:
            expected["gt_masks"] = (None, None, None)
        num_instances = shapes["gt_boxes"][1]
        for key, tail in expected.items():
            shape = shapes[key]
            if len(shape) != len(tail) + 1 or any(t is not None and s != t for s, t in zip(shape[1:], tail)):
                expected_shape = ", ".join(str(t or "N") for t in tail)
                raise ValueError(f"batch: {key} has shape {shape}; expected [B, {expected_shape}]")
            if key.startswith("gt_") and shape[1] != num_instances:
                raise ValueError(f"batch: {key} has {shape[1]} instances per image but gt_boxes has {num_instances}")

    def compute_losses(self, data, training=True):
        """The training losses of one (per-replica) batch; see losses.py for the normalizers.

        The replica's own computation (_replica_losses, XLA-compiled per replica under
        replica_jit_compile) returns the mask loss as a sum and its RoI count; the count's sum over
        replicas, the mask loss's normalizer, is taken here, outside XLA."""
        self.check_batch(data)
        if self.replica_jit_compile:
            if self._compiled_replica_losses is None:
                self._compiled_replica_losses = tf.function(self._replica_losses, jit_compile=True,
                                                            reduce_retracing=True)
            values = self._compiled_replica_losses(data, training)
        else:
            values = self._replica_losses(data, training)
        mask_sum, mask_rois = values.pop("rcnn_mask_loss_sum"), values.pop("mask_rois")
        rcnn_mask = mask_sum / tf.maximum(_sum_over_replicas(mask_rois), 1.0)
        values["rcnn_mask_loss"] = rcnn_mask
        values["rcnn_loss"] = values["rcnn_cls_loss"] + values["rcnn_reg_loss"] + rcnn_mask
        values["total_loss"] = values["rpn_loss"] + values["rcnn_loss"]
        return values

    def _replica_losses(self, data, training):
        """compute_losses without the cross-replica sum: the mask loss as "rcnn_mask_loss_sum" (binary
        cross-entropy averaged over each RoI's cells, summed over RoIs) and "mask_rois" (this replica's
        count of mask RoIs)."""
        images, image_info = data["images"], data["image_info"]
        gt_boxes, gt_classes = data["gt_boxes"], tf.cast(data["gt_classes"], tf.int32)
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_images = tf.cast(tf.shape(images)[0] * num_replicas, tf.float32)

        pyramid, rpn_scores, rpn_deltas = self._features(images, training)
        labeled_boxes, labeled_classes = gt_boxes, gt_classes
        if self._trims_padding():
            num_columns = _num_used_columns(gt_classes >= 0)
            labeled_boxes, labeled_classes = gt_boxes[:, :num_columns], gt_classes[:, :num_columns]
        anchor_seed, roi_seed = self._sampling_seeds()
        rpn_targets = self.anchor_labeler(tf.constant(self.flat_anchors), labeled_boxes, labeled_classes,
                                          seed=anchor_seed)
        rpn_normalizer = global_images * self.anchor_labeler.batch_size_per_image
        rpn_cls = losses.rpn_objectness_loss(
            _flatten_levels(rpn_scores), rpn_targets["objectness"], rpn_targets["sampled"], rpn_normalizer)
        rpn_reg = losses.rpn_box_loss(
            _flatten_levels(rpn_deltas, 4), rpn_targets["box_targets"], rpn_targets["positive"],
            rpn_normalizer, self.rpn_box_loss_beta)

        # The RoI stage trains on the training-time proposal counts (top-k 2000 / 1000).
        proposals, _, proposal_valid = self.proposal_generator(
            rpn_scores, rpn_deltas, image_info, anchors=self.anchors, training=True)
        samples = self.roi_sampler(proposals, proposal_valid, gt_boxes, gt_classes, seed=roi_seed)
        rois, classes, foreground = samples["rois"], samples["classes"], samples["is_foreground"]
        class_logits, box_deltas = self.box_head(self.box_roi_align(pyramid, rois), training=training)
        rcnn_normalizer = global_images * self.roi_sampler.num_samples
        # Background rows point at arbitrary gt (maybe -1 padding): encode their own box instead.
        target_boxes = tf.where(foreground[..., None], samples["box_targets"], rois)
        rcnn_cls = losses.rcnn_class_loss(class_logits, classes, samples["is_valid"], rcnn_normalizer)
        rcnn_reg = losses.rcnn_box_loss(
            box_deltas, classes, self._rcnn_coder.encode(target_boxes, rois), foreground, rcnn_normalizer,
            self.rcnn_box_loss_beta)

        mask_sum, mask_rois = tf.constant(0.0), tf.constant(0.0)
        if self.include_mask:
            mask_sum, mask_rois = self._mask_loss_sum(data, pyramid, samples, training)
        return {"rpn_cls_loss": rpn_cls, "rpn_reg_loss": rpn_reg, "rpn_loss": rpn_cls + rpn_reg,
                "rcnn_cls_loss": rcnn_cls, "rcnn_reg_loss": rcnn_reg, "rcnn_mask_loss_sum": mask_sum,
                "mask_rois": mask_rois}

    def _sampling_seeds(self):
        """(anchor labeler seed, RoI sampler seed), each int64 [2] keyed by (sampling_seed, step, replica),
        or (None, None) when sampling_seed is set to None (TF's stateful RNG: tests only). The step is
        optimizer.iterations before this step's update (0 without an optimizer), so a resumed run draws
        what the uninterrupted run drew."""
        if self.sampling_seed is None:
            return None, None
        optimizer = getattr(self, "optimizer", None)
        step = optimizer.iterations if optimizer is not None else 0
        # Replicas see different images; each gets its own draw, as separate processes would.
        replica = tf.distribute.get_replica_context()
        replica_id = replica.replica_id_in_sync_group if replica is not None else 0
        step_seed = sampling.sampling_seed(self.sampling_seed, step, replica_id)
        return (tf.random.experimental.stateless_fold_in(step_seed, 1),
                tf.random.experimental.stateless_fold_in(step_seed, 2))

    def _mask_loss_sum(self, data, pyramid, samples, training):
        """(summed mask loss, mask RoI count) over the first max_mask_rois foreground RoIs of each image
        (a static count, or the batch's largest foreground count when padding is trimmed)."""
        foreground = samples["is_foreground"]
        num_mask_rois = min(self.max_mask_rois, int(foreground.shape[1]))
        if self._trims_padding():
            most_foreground = tf.reduce_max(tf.reduce_sum(tf.cast(foreground, tf.int32), axis=1))
            num_mask_rois = tf.clip_by_value(most_foreground, 1, num_mask_rois)
        # top_k keeps equal values in index order, so this takes the first foreground slots.
        _, index = tf.math.top_k(tf.cast(foreground, tf.int32), k=num_mask_rois)  # [B, Sm]
        rois = tf.gather(samples["rois"], index, batch_dims=1)  # [B, Sm, 4]
        classes = tf.gather(samples["classes"], index, batch_dims=1)  # [B, Sm]
        matched = tf.gather(samples["matched_gt_index"], index, batch_dims=1)  # [B, Sm]
        is_mask_roi = tf.gather(foreground, index, batch_dims=1)  # [B, Sm]
        has_masks = data.get("has_masks")
        if has_masks is not None:
            is_mask_roi &= tf.cast(has_masks, tf.bool)[:, None]
        mask_features = self.mask_roi_align(pyramid, rois)
        # The head's BatchNorm takes its statistics over the mask RoIs only, not over the padding rows of
        # images with fewer foreground RoIs than Sm (torchvision's mask head sees only foreground RoIs).
        mask_logits = self.mask_head(mask_features, classes, training=training,
                                     roi_valid=is_mask_roi)  # [B, Sm, M, M]
        mask_size = int(mask_logits.shape[-1])
        targets = mask_ops.mask_targets(
            tf.cast(data["gt_masks"], tf.float32), data["gt_boxes"], rois, matched, output_size=mask_size)
        weights = tf.cast(is_mask_roi, tf.float32)
        summed = losses.mask_loss(mask_logits, tf.stop_gradient(targets), weights, float(mask_size**2))
        return summed, tf.reduce_sum(weights)

    # ---------------------------------------------------------------------------- train / test

    def compile(self, optimizer=None, jit_compile="auto", **kwargs):
        """keras.Model.compile; jit_compile=True under several GPU/CPU replicas compiles each replica's
        forward and backward pass (replica_jit_compile) and runs the rest of the step without XLA.
        Call it under the strategy's scope."""
        self.replica_jit_compile = replica_jit_compile(jit_compile is True, tf.distribute.get_strategy())
        self._compiled_replica_losses = None
        super().compile(optimizer=optimizer, jit_compile=False if self.replica_jit_compile else jit_compile,
                        **kwargs)

    def train_step(self, data):
        data, _, _ = keras.utils.unpack_x_y_sample_weight(data)  # fit/train_on_batch may wrap x in a tuple
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            values = self.compute_losses(data, training=True)
            # LossScaleOptimizer (mixed_float16) scales here and unscales in apply_gradients.
            scaled_loss = self.optimizer.scale_loss(values["total_loss"])
        # The one cross-replica sum (the optimizer does not sum again: optimizer.py). Every replica then
        # holds the same gradients, so a float16 overflow on any replica skips the step on all of them,
        # and clipping (the optimizer's global_clipnorm, after unscaling) sees the global gradient.
        gradients = _sum_over_replicas(tape.gradient(scaled_loss, variables))
        # Every optimizer op waits for the whole backward pass. Otherwise the graph runs the parts that need
        # no gradient (decoupled weight decay w * wd * lr, momentum m * 0.9) during the backward pass,
        # and their temporaries plus copies of weights whose forward reads the backward still holds
        # raise the step's memory peak (figures: benchmarks/README.md, "Figures behind choices").
        with tf.control_dependencies([g for g in gradients if g is not None]):
            self.optimizer.apply_gradients(zip(gradients, variables))
        return self._track(values)

    def test_step(self, data):
        data, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._track(self.compute_losses(data, training=False))

    def _track(self, values):
        # Each replica holds its share of the global loss: their sum is the global loss, the same on every
        # replica, so whichever replica Keras reports (the first on a TPU) and the NaN check see all.
        names = list(self.loss_trackers)
        totals = _sum_over_replicas([values[name] for name in names])
        for name, total in zip(names, totals):
            self.loss_trackers[name].update_state(total)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

    # --------------------------------------------------------------------------- serialization

    def get_config(self):
        if self.config is None:
            raise NotImplementedError(f"MaskRCNN {self.name!r} was not made by build_model(config), so it has "
                                      "no config to save; build it with build_model or save_weights instead")
        return {"name": self.name, "trainable": self.trainable, "config": config_lib.to_dict(self.config)}

    @classmethod
    def from_config(cls, config):
        # build_model reads no file: the saved file holds every weight (weights/initial.py is never called).
        model = build_model(config_lib.from_dict(config["config"]))
        if not config.get("trainable", True):  # setting True would also unfreeze frozen stages
            model.trainable = False
        return model


def _backbone_conventions(backbone_cfg) -> dict:
    """Backbone keyword arguments for the ResNet conventions (the tiny backbone has none)."""
    if backbone_cfg.name == "tiny":
        return {}
    return dict(stride_in_3x3=backbone_cfg.stride_in_3x3, norm_epsilon=backbone_cfg.norm_epsilon,
                norm=backbone_cfg.norm)


def inference_canvases(model_cfg: config_lib.ModelConfig) -> tuple:
    """((h, w), ...) the canvases smaller than model_cfg.image_size that MaskRCNN.call may run a batch
    on: landscape (S, W) and portrait (H, S), S = resize_short_side rounded up to a multiple of 64, when
    orientation_canvases is on in "short_side" mode; () otherwise (config.py)."""
    if not model_cfg.orientation_canvases or model_cfg.resize_mode != "short_side":
        return ()
    step = config_lib.SIZE_DIVISIBILITY
    side = -(-model_cfg.resize_short_side // step) * step
    height, width = model_cfg.image_size
    return tuple(canvas for canvas, smaller in (((side, width), side < height), ((height, side), side < width))
                 if smaller)


def build_model(cfg: config_lib.Config) -> MaskRCNN:
    """Builds (and runs once, so every weight exists) the MaskRCNN of `cfg`. The one reader of config.

    Sets the global Keras dtype policy from cfg.train.precision before creating layers. Reads no file and
    nothing from the network: every weight has its fresh initial value, cfg.model.backbone.weights included
    (a fresh training run loads those afterwards, weights/initial.load_initial_weights).
    """
    config_lib.validate(cfg)
    keras.mixed_precision.set_global_policy(cfg.train.precision)
    m = cfg.model
    switches = device_defaults.resolve(cfg).train  # CPU-only techniques: "auto" -> on/off for the device
    num_anchors = anchor_ops.num_anchors_per_location(m.anchors.aspect_ratios)
    box_math = {"dtype": "float32"}  # layers that handle boxes never run in float16
    mask_layers = {}
    if m.include_mask:
        mask_layers = dict(
            mask_roi_align=MultilevelRoIAlign(output_size=m.roi.mask_output_size,
                                              sampling_ratio=m.roi.sampling_ratio,
                                              backend=m.roi.roi_align_backend, gradient=switches.roi_align_gradient,
                                              aligned=m.roi.aligned,
                                              torchvision_level_mapper=m.roi.torchvision_level_mapper,
                                              name="mask_roi_align"),
            mask_head=MaskHead(num_classes=m.num_classes, num_convs=m.heads.mask_num_convs,
                               num_filters=m.heads.mask_num_filters, norm=m.heads.mask_norm, name="mask_head"))
    model = MaskRCNN(
        backbone=Backbone(name=m.backbone.name, freeze_at=m.backbone.freeze_at,
                          tiny_width=m.backbone.tiny_width, recompute=switches.recompute_backbone,
                          **_backbone_conventions(m.backbone)),
        fpn=FPN(num_filters=m.fpn_num_filters, norm=m.fpn_norm, name="fpn"),
        rpn_head=RPNHead(num_anchors_per_location=num_anchors, num_filters=m.rpn_num_filters,
                         num_convs=m.rpn_num_convs, name="rpn_head"),
        anchor_labeler=AnchorLabeler(positive_iou=m.rpn.positive_iou, negative_iou=m.rpn.negative_iou,
                                     batch_size_per_image=m.rpn.batch_size_per_image,
                                     positive_fraction=m.rpn.positive_fraction, name="anchor_labeler",
                                     **box_math),
        proposal_generator=ProposalGenerator(
            pre_nms_top_k_train=m.rpn.pre_nms_top_k_train, post_nms_top_k_train=m.rpn.post_nms_top_k_train,
            pre_nms_top_k_test=m.rpn.pre_nms_top_k_test, post_nms_top_k_test=m.rpn.post_nms_top_k_test,
            nms_iou=m.rpn.nms_iou, min_box_size=m.rpn.min_box_size, name="proposal_generator", **box_math),
        roi_sampler=RoISampler(num_samples=m.roi.num_samples, foreground_fraction=m.roi.foreground_fraction,
                               foreground_iou=m.roi.foreground_iou,
                               background_iou_high=m.roi.background_iou_high,
                               background_iou_low=m.roi.background_iou_low, name="roi_sampler", **box_math),
        box_roi_align=MultilevelRoIAlign(output_size=m.roi.box_output_size, sampling_ratio=m.roi.sampling_ratio,
                                         backend=m.roi.roi_align_backend, gradient=switches.roi_align_gradient,
                                         aligned=m.roi.aligned,
                                         torchvision_level_mapper=m.roi.torchvision_level_mapper,
                                         name="box_roi_align"),
        box_head=BoxHead(num_classes=m.num_classes, num_fcs=m.heads.num_fcs, fc_dim=m.heads.fc_dim,
                         num_convs=m.heads.box_num_convs, conv_dim=m.heads.box_conv_dim, norm=m.heads.box_norm,
                         name="box_head"),
        detection_generator=DetectionGenerator(
            score_threshold=m.detection.score_threshold, nms_iou=m.detection.nms_iou,
            max_detections=m.detection.max_detections, pre_nms_top_k=m.detection.pre_nms_top_k,
            min_box_size=m.detection.min_box_size,
            name="detection_generator", **box_math),
        anchor_generator=functools.partial(
            anchor_ops.multilevel_anchors, sizes=m.anchors.sizes, aspect_ratios=m.anchors.aspect_ratios,
            min_level=config_lib.MIN_LEVEL, max_level=config_lib.MAX_LEVEL, offset=m.anchors.offset,
            round_base_anchors=m.anchors.round_base_anchors),
        image_size=m.image_size,
        inference_canvases=inference_canvases(m),
        max_mask_rois=m.roi.max_mask_rois,
        static_shapes=not switches.trim_padding,
        rpn_box_loss_beta=m.rpn.box_loss_beta,
        rcnn_box_loss_beta=m.roi.box_loss_beta,
        sampling_seed=cfg.train.seed,
        name="mask_rcnn",  # fixed: checkpoints key variables by path (run_dir.py)
        **mask_layers,
    )
    model.config = cfg
    for layer in model._flatten_layers():
        if isinstance(layer, BandedConv2D):
            layer.banded_gradients = switches.banded_conv_gradients
    height, width = m.image_size
    model(dummy_inputs(1, height, width), training=False)  # creates every weight
    return model


def dummy_inputs(batch_size, height, width):
    """A zero batch of model inputs (image_info says the whole padded image is valid)."""
    image_info = np.tile(np.array([[height, width], [height, width], [1, 1], [0, 0]], np.float32),
                         [batch_size, 1, 1])  # [B, 4, 2]
    return {"images": tf.zeros([batch_size, height, width, 3]), "image_info": tf.constant(image_info)}
