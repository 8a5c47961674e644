"""TF Model Garden side of the model cases: `infer` (batch 1, incl. MG's own mask pasting) and `train` (one
SGD step, batch 2), through tf-models-official's public API only. One JSON line on stdout, logs on stderr.

  /work/peer_mg/bin/python benchmarks/cases/modelgarden_model.py --case=infer [--image_size=1024] [--repeats=5]
      [--box_head=2fc|experiment]
  /work/peer_mg/bin/python benchmarks/cases/modelgarden_model.py --case=train [--repeats=3]

Decisions:
- Model: the `maskrcnn_resnetfpn_coco` experiment (exp_factory.get_exp_config), input S x S, built by
  the task (`task_factory.get_task(exp.task).build_model()`, i.e. factory.build_maskrcnn plus its L2
  regulariser and warm-up call), random init (no init_checkpoint is loaded), float32 (the experiment's
  bfloat16 policy is for TPUs), no XLA, 91 classes (the experiment's).
- Box head: the experiment's default is MG's 4conv1fc head (four 3x3 convs with BN on 7x7 RoIs, +115
  GFLOPs on 1000 RoIs). With --box_head=2fc (default) it is set to the 2-FC 1024 head that ours and
  torchvision use (num_convs=0, num_fcs=2), so all sides run the same architecture; --box_head=experiment
  keeps MG's own. MG's FPN, RPN head and mask head keep their BatchNorm layers (MG's architecture).
- Counts: RPN 1000 pre-NMS per level / 1000 post-NMS at test time, 2000 / 1000 for training (MG's
  defaults, checked into the JSON), 100 detections, detection score threshold 0 so that exactly 100
  detections come out (asserted). MG's detection generator keeps its per-class candidates
  (pre_nms_top_k 5000 per class, i.e. all 1000 RoIs for each of the 90 classes).
- `infer` pastes masks with `official.vision.ops.mask_ops.paste_instance_masks` (NumPy + cv2, one
  mask at a time), the function MG's COCO evaluator uses: it returns binary uint8 [100, S, S] masks
  (torchvision and ours return probabilities). The model call runs in a `tf.function`, as MG's
  evaluator and export do; pasting runs on the host after it. The input is one decoded image normalised
  with MG's preprocess_ops.normalize_image.
- `train`: `task.train_step((images, labels), model, optimizer)` (MG's own step: GradientTape, its
  losses incl. the L2 regulariser, apply_gradients) inside one `tf.function`, as MG's trainer runs it,
  with a tf_keras SGD(momentum 0.9). Frozen BN and stem + res2 frozen as on the other sides: the
  experiment's `backbone.resnet.bn_trainable=False` plus `trainable=False` on the stem and res2 blocks
  (MG itself can only freeze the whole backbone). Labels come from MG's own training parser
  (maskrcnn_input.Parser.parse_fn(is_training=True)) on decoded images, outside the timed step: in MG,
  RPN anchor labelling and gt mask cropping happen in the input pipeline, not in the train step (ours
  labels anchors inside the step). Augmentation off.
- Threads: tf.config.threading intra-op = --threads (2).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402

SIDE = "modelgarden"
EXPERIMENT = "maskrcnn_resnetfpn_coco"
BASE_LR, REFERENCE_BATCH = 0.02, 16  # the same linear scaling as ours (irrelevant for speed)
STEM_AND_RES2 = ("conv2d", "batch_normalization", "activation", "max_pooling2d",
                 "bottleneck_block", "bottleneck_block_1", "bottleneck_block_2", "block_group_l2")


def parse_args():
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--box_head", choices=("2fc", "experiment"), default="2fc")
    return harness.parse_model_case_args(parser)


def experiment(args):
    from official.core import exp_factory

    exp = exp_factory.get_exp_config(EXPERIMENT)
    task = exp.task
    m = task.model
    m.input_size = [args.image_size, args.image_size, 3]
    m.roi_generator.test_pre_nms_top_k = 1000
    m.roi_generator.test_num_proposals = 1000
    m.roi_generator.pre_nms_top_k = 2000
    m.roi_generator.num_proposals = 1000
    m.roi_sampler.num_sampled_rois = 512
    m.roi_sampler.foreground_fraction = 0.25
    m.detection_generator.max_num_detections = 100
    if args.case == "infer":
        m.detection_generator.pre_nms_score_threshold = 0.0
    if args.box_head == "2fc":
        m.detection_head.num_convs = 0
        m.detection_head.num_fcs = 2
        m.detection_head.fc_dims = 1024
    m.backbone.resnet.bn_trainable = False
    task.init_checkpoint = None
    p = task.train_data.parser
    p.aug_rand_hflip, p.aug_scale_min, p.aug_scale_max = False, 1.0, 1.0
    p.rpn_batch_size_per_im, p.rpn_fg_fraction = 256, 0.5
    task.train_data.dtype = "float32"
    return exp


def counts(exp) -> dict:
    m = exp.task.model
    return {
        "test_pre_nms_top_k_per_level": m.roi_generator.test_pre_nms_top_k,
        "test_num_proposals": m.roi_generator.test_num_proposals,
        "train_pre_nms_top_k_per_level": m.roi_generator.pre_nms_top_k,
        "train_num_proposals": m.roi_generator.num_proposals,
        "rpn_batch_size_per_im": exp.task.train_data.parser.rpn_batch_size_per_im,
        "num_sampled_rois": m.roi_sampler.num_sampled_rois, "foreground_fraction": m.roi_sampler.foreground_fraction,
        "num_sampled_masks": m.mask_sampler.num_sampled_masks,
        "max_num_detections": m.detection_generator.max_num_detections,
        "detection_pre_nms_top_k_per_class": m.detection_generator.pre_nms_top_k,
        "pre_nms_score_threshold": m.detection_generator.pre_nms_score_threshold,
        "num_classes": m.num_classes, "detection_head": m.detection_head.as_dict(),
        "bn_trainable": m.backbone.resnet.bn_trainable,
    }


def run_infer(args, exp, task, tf):
    import numpy as np
    from official.vision.ops import mask_ops, preprocess_ops

    size = args.image_size
    model = task.build_model()
    image = preprocess_ops.normalize_image(tf.constant(harness.smooth_noise_image(np, size)))
    images = tf.expand_dims(tf.cast(image, tf.float32), 0)  # [1, S, S, 3]
    image_shape = tf.constant([[size, size]], tf.float32)  # [1, 2]
    forward = tf.function(lambda x, shape: model(x, image_shape=shape, training=False))

    def run():
        outputs = forward(images, image_shape)
        num = int(outputs["num_detections"].numpy()[0])
        boxes = outputs["detection_boxes"][0, :num].numpy()  # [n, 4] y1, x1, y2, x2
        xywh = np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], -1)
        pasted = mask_ops.paste_instance_masks(outputs["detection_masks"][0, :num].numpy(), xywh, size, size)
        return num, pasted.shape, list(outputs["rpn_boxes"].keys())

    first, runs, (num_detections, mask_shape, levels) = harness.time_calls(run, args.repeats)
    assert num_detections == exp.task.model.detection_generator.max_num_detections, num_detections
    return first, runs, dict(num_detections=num_detections, mask_output_shape=list(mask_shape),
                             paste_masks=True, pasted_masks_dtype="uint8 binary (mask_ops.paste_instance_masks)",
                             rpn_levels=levels)


def make_labels(args, exp, tf):
    """Batch of 2 (images [2, S, S, 3], labels) through MG's own training parser."""
    import numpy as np
    from official.vision.dataloaders import maskrcnn_input

    m, p = exp.task.model, exp.task.train_data.parser
    size = args.image_size
    parser = maskrcnn_input.Parser(
        output_size=m.input_size[:2], min_level=m.min_level, max_level=m.max_level,
        num_scales=m.anchor.num_scales, aspect_ratios=m.anchor.aspect_ratios, anchor_size=m.anchor.anchor_size,
        rpn_match_threshold=p.rpn_match_threshold, rpn_unmatched_threshold=p.rpn_unmatched_threshold,
        rpn_batch_size_per_im=p.rpn_batch_size_per_im, rpn_fg_fraction=p.rpn_fg_fraction,
        aug_rand_hflip=False, aug_scale_min=1.0, aug_scale_max=1.0,
        skip_crowd_during_training=p.skip_crowd_during_training, max_num_instances=p.max_num_instances,
        include_mask=True, mask_crop_size=p.mask_crop_size, dtype="float32")
    parse = parser.parse_fn(is_training=True)
    examples = []
    for b, instances in enumerate(harness.train_instances(size)):
        rgb = harness.smooth_noise_image(np, size, seed=b).astype(np.float32)
        masks = []
        for _, box, shape in instances:
            mask = harness.full_mask(np, size, box, shape)
            rgb[mask > 0] = 0.5 * rgb[mask > 0] + 100.0  # a visible object
            masks.append(mask)
        decoded = {
            "image": tf.constant(np.clip(rgb, 0, 255).astype(np.uint8)),
            "height": tf.constant(size), "width": tf.constant(size),
            "groundtruth_classes": tf.constant([cls for cls, _, _ in instances], tf.int64),
            "groundtruth_is_crowd": tf.zeros([len(instances)], tf.bool),
            "groundtruth_boxes": tf.constant([[v / size for v in box] for _, box, _ in instances], tf.float32),
            "groundtruth_instance_masks": tf.constant(np.stack(masks).astype(np.float32)),
            "groundtruth_area": tf.constant([float(mk.sum()) for mk in masks], tf.float32),
        }
        examples.append(parse(decoded))
    return tf.nest.map_structure(lambda *xs: tf.stack(xs), *examples)


def run_train(args, exp, task, tf):
    import numpy as np
    import tf_keras

    batch_size = 2
    model = task.build_model()
    for name in STEM_AND_RES2:
        model.backbone.get_layer(name).trainable = False
    images, labels = make_labels(args, exp, tf)
    optimizer = tf_keras.optimizers.SGD(learning_rate=BASE_LR * batch_size / REFERENCE_BATCH, momentum=0.9)
    step = tf.function(lambda x, y: task.train_step((x, y), model, optimizer))

    def run():
        return float(step(images, labels)[task.loss])

    first, runs, total_loss = harness.time_calls(run, args.repeats)
    assert np.isfinite(total_loss), total_loss
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return first, runs, dict(batch_size=batch_size, total_loss=round(total_loss, 4), trainable_params=trainable,
                             step="task.train_step in tf.function", rpn_targets_in_step=False,
                             gt_instances_per_image=[len(x) for x in harness.train_instances(args.image_size)])


def main():
    harness.claim_stdout()
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    from official.core import task_factory
    import official.vision  # noqa: F401  (registers the experiments and tasks)
    from importlib.metadata import version

    exp = experiment(args)
    task = task_factory.get_task(exp.task, logging_dir=None)
    first, runs, fields = (run_infer if args.case == "infer" else run_train)(args, exp, task, tf)
    harness.emit(harness.record(
        args.case, SIDE, "seconds", runs, first,
        versions={"tensorflow": tf.__version__, "tf-models-official": version("tf-models-official")},
        image_size=args.image_size, batch_size=fields.pop("batch_size", 1), experiment=EXPERIMENT,
        box_head=args.box_head, intra_threads=args.threads, counts=counts(exp), **fields))


if __name__ == "__main__":
    main()
