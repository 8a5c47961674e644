"""maskrcnn_tf side of the model cases: `infer` (batch 1, end to end incl. mask pasting), `train` (one
SGD step, batch 2) and `train_v2` (the same step, torchvision's v2 architecture with trainable BatchNorm).
One JSON line on stdout (benchmarks/cases/_harness.py), logs on stderr.

  /work/venv/bin/python benchmarks/cases/ours_model.py --case=infer [--image_size=1024] [--repeats=5]
      [--roi_align_backend=gather] [--jit_compile] [--paste_masks=false] [--count_flops=false]
      [--profile_flops]
  /work/venv/bin/python benchmarks/cases/ours_model.py --case=train [--repeats=3] [--max_instances=100]
  /work/venv/bin/python benchmarks/cases/ours_model.py --case=train_v2 [--repeats=3]

Decisions:
- Preset coco_r50_fpn_1x (--config), random weights (`model.backbone.weights=None`; speed does not depend on their
  values), num_classes 80, frozen BN, stem + res2 frozen (the preset). Counts: test proposals
  1000 pre-NMS per level / 1000 post-NMS, 100 detections; train 2000 / 1000, RPN 256 anchors/image,
  512 RoIs/image at 25% foreground (the preset; printed in the JSON so a changed preset shows).
- `train_v2`: torchvision's maskrcnn_resnet50_fpn_v2 trained from scratch (torchvision_model.py): preset
  torchvision_maskrcnn_r50_fpn_v2 (BatchNorm FPN and heads, two RPN convs, 4-conv + 1-FC box head,
  torchvision's anchors, RoIAlign, box-loss beta and counts: 2000 / 2000 train proposals, 256 anchors,
  512 RoIs at 25%) with model.backbone.norm=batch_norm and freeze_at=0: every BatchNorm layer (backbone,
  FPN, box and mask heads) trains with batch statistics, all stages trainable, random weights, 90 classes
  (91 logits, as torchvision's COCO head). Everything else as `train`.
- `infer`: the detection score threshold is 0 so that every run returns exactly 100 detections and the
  mask head always sees 100 RoIs (asserted), as on the peer side. One `tf.function` (optionally XLA)
  holds model(inputs, training=False) and ops.masks.paste_masks, which turns the 28x28 probabilities
  into [1, 100, H, W] image-size masks as torchvision returns them. The input is one already-decoded,
  normalised image (smooth noise) with image_info saying the whole padded image is valid.
- `train`: the optimizer built before the first step and `model.compile(optimizer=...)`, as
  maskrcnn_tf/training.py does, then `model.train_on_batch(batch)` under host_memory.HeapTrimmer (as
  train.py's fit runs), i.e. the real Keras train_step (forward, losses, gradients, SGD momentum 0.9
  update). Batch of 2 images with 3 instances each (harness.TRAIN_INSTANCES_1024), gt padded to
  data.max_instances (100, what the input pipeline delivers) and gt masks cropped to their boxes at
  data.gt_mask_size (112), the data contract of docs/design.md section 5.
- Threads: intra-op parallelism = --threads (2, as torch.set_num_threads on the peer side); inter-op
  as train.py sets it for `train` (distribute.configure_host_threads: 1 on this CPU-only host) and
  TF's default for `infer`, unless --inter_threads is given (0 = TF's default).
- FLOP count (`infer`, --count_flops, default on): one extra trace of the same function (no compute);
  every conv / matmul op of the graph is counted from its static shapes: conv 2*N*Ho*Wo*Cin*Cout*kh*kw,
  transposed conv (Conv2DBackpropInput) 2*N*Hi*Wi*Cin*Cout*kh*kw, matmul 2*rows*in*out, where N and
  rows include the RoI count (1000 box RoIs, 100 mask RoIs) because the heads fold RoIs into the batch.
  The graph, not the Keras layer calls, because the backbone's folded-BN path calls tf.nn.conv2d on
  folded kernels instead of its Keras Conv2D layers: the graph counts whatever the model really runs.
  Stage = the model layer whose name scope holds the op (backbone, fpn, rpn_head, box_head,
  mask_head), plus paste_masks (its two matmuls, 2*D*H*M*M + 2*D*H*M*W). Biases, ReLU, RoIAlign, NMS
  and other elementwise work are not counted (a few GFLOPs). --profile_flops adds TF's own graph
  count (tf.compat.v1.profiler float_operation) as a cross-check.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402

SIDE = "ours"
# case -> preset (--config overrides it); train_v2 also sets TRAIN_V2_OVERRIDES on it.
CONFIGS = {"infer": "coco_r50_fpn_1x", "train": "coco_r50_fpn_1x", "train_v2": "torchvision_maskrcnn_r50_fpn_v2"}
TRAIN_V2_OVERRIDES = {"model.backbone.norm": "batch_norm", "model.backbone.freeze_at": 0}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_args():
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default=None,
                        help="preset name (maskrcnn_tf.presets.PRESETS; default: the case's, CONFIGS)")
    parser.add_argument("--roi_align_backend", default=None, help="crop_and_resize | gather (default: preset's)")
    parser.add_argument("--jit_compile", type=_bool, nargs="?", const=True, default=False,
                        help="XLA-compile the inference function / train step")
    parser.add_argument("--paste_masks", type=_bool, nargs="?", const=True, default=True)
    parser.add_argument("--count_flops", type=_bool, nargs="?", const=True, default=True)
    parser.add_argument("--profile_flops", type=_bool, nargs="?", const=True, default=False,
                        help="also count FLOPs with tf.compat.v1.profiler (slow: re-traces the graph)")
    parser.add_argument("--max_instances", type=int, default=None, help="gt padding N (default: preset's)")
    parser.add_argument("--inter_threads", type=int, default=None,
                        help="inter-op threads (0 = TF default; default: train.py's rule for train, 0 for infer)")
    args = harness.parse_model_case_args(parser, cases=tuple(CONFIGS))
    args.config = args.config or CONFIGS[args.case]
    return args


def build_config(args, batch_size):
    from maskrcnn_tf import config as config_lib

    overrides = {
        "model.backbone.weights": None,
        "model.image_size": (args.image_size, args.image_size),
        "data.train_batch_size": batch_size,
        "train.jit_compile": args.jit_compile,
    }
    if args.case == "infer":
        overrides["model.detection.score_threshold"] = 0.0
    if args.case == "train_v2":
        overrides.update(TRAIN_V2_OVERRIDES)
    if args.roi_align_backend:
        overrides["model.roi.roi_align_backend"] = args.roi_align_backend
    if args.max_instances:
        overrides["data.max_instances"] = args.max_instances
    return config_lib.replace(config_lib.get_preset(args.config), **overrides)


def counts(cfg) -> dict:
    from maskrcnn_tf import device_defaults

    m = cfg.model
    return {
        "pre_nms_top_k_per_level_test": m.rpn.pre_nms_top_k_test, "post_nms_top_k_test": m.rpn.post_nms_top_k_test,
        "pre_nms_top_k_per_level_train": m.rpn.pre_nms_top_k_train,
        "post_nms_top_k_train": m.rpn.post_nms_top_k_train,
        "rpn_anchors_per_image": m.rpn.batch_size_per_image, "rois_per_image": m.roi.num_samples,
        "roi_foreground_fraction": m.roi.foreground_fraction, "max_detections": m.detection.max_detections,
        "score_threshold": m.detection.score_threshold, "num_classes": m.num_classes,
        "roi_align_backend": m.roi.roi_align_backend, "freeze_at": m.backbone.freeze_at,
        # The value build_model uses on this host ("auto" resolved for the device, device_defaults.py).
        "recompute_backbone": device_defaults.resolve(cfg).train.recompute_backbone,
    }


def norms(cfg) -> dict:
    m = cfg.model
    return {"backbone": m.backbone.norm, "fpn": m.fpn_norm, "box_head": m.heads.box_norm,
            "mask_head": m.heads.mask_norm}


def bn_mode(cfg, training: bool) -> str:
    """How the model's BatchNorm layers normalise in the timed calls (as torchvision_model.py says it)."""
    if not any(norm in ("batch_norm", "sync_batch_norm") for norm in norms(cfg).values()):
        return "frozen (backbone BN frozen, no other BN)"
    if not training:
        return "eval (moving statistics)"
    frozen = ", backbone BN frozen" if cfg.model.backbone.norm == "frozen" else ""
    return f"train (batch statistics{frozen})"


# ------------------------------------------------------------------------------------ FLOP count

# Graph ops that carry the multiply-adds, and the contracted length of each output element.
CONV_OPS = ("Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput")
MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
PASTE_SCOPE = "paste_masks"


def _op_flops(op) -> int:
    """2 x (output elements) x (multiply-adds per output element) of one conv / matmul op, from static
    shapes; raises ValueError when a shape is unknown."""

    def dims(shape):
        values = shape.as_list()
        if values is None or any(v is None for v in values):
            raise ValueError(f"{op.type} {op.name}: shape {shape} not static")
        return values

    def prod(values):
        total = 1
        for v in values:
            total *= v
        return total

    if op.type == "Conv2DBackpropInput":  # transposed conv: inputs (sizes, filter, out_backprop)
        kh, kw, c_out, _ = dims(op.inputs[1].shape)  # filter [kh, kw, C_out, C_in] of the transposed conv
        return 2 * prod(dims(op.inputs[2].shape)) * kh * kw * c_out  # each input pixel x its kh*kw*C_out patch
    if op.type in CONV_OPS:
        kh, kw, c_in = dims(op.inputs[1].shape)[:3]  # filter [kh, kw, C_in, C_out(/multiplier)]
        per_output = kh * kw * (1 if op.type == "DepthwiseConv2dNative" else c_in)
        return 2 * prod(dims(op.outputs[0].shape)) * per_output
    a = dims(op.inputs[0].shape)
    transposed = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
    k = a[-2] if transposed else a[-1]
    return 2 * prod(dims(op.outputs[0].shape)) * k


def _stage_of(op_name: str, stage_by_layer: dict) -> str:
    # Keras 3 calls layers inside tf.name_scope(layer.name), uniquified with "_<n>" per trace.
    for part in op_name.split("/")[:-1]:
        base = part.rsplit("_", 1)[0] if part.rsplit("_", 1)[-1].isdigit() else part
        for name in (part, base):
            if name in stage_by_layer:
                return stage_by_layer[name]
    return "other"


def count_flops(model, fn, inputs) -> dict:
    """FLOPs of one call of `fn(inputs)` per stage, from the static shapes of the traced graph's
    conv and matmul ops (no compute, no profiler). Returns {stage: flops, "uncounted_ops": [...]}.

    Stages: the model layer whose name scope holds the op (backbone, fpn, rpn_head, box_head,
    mask_head), "paste_masks" (fn's name scope of that name), "other". Ops inside nested functions
    (while loops of NMS) are listed in "uncounted_ops" when they could hold convs/matmuls.
    """
    import tensorflow as tf

    stage_by_layer = {model.backbone.name: "backbone", model.fpn.name: "fpn", model.rpn_head.name: "rpn_head",
                      model.box_head.name: "box_head", PASTE_SCOPE: PASTE_SCOPE}
    if model.mask_head is not None:
        stage_by_layer[model.mask_head.name] = "mask_head"
    totals = {name: 0 for name in ("backbone", "fpn", "rpn_head", "box_head", "mask_head", PASTE_SCOPE, "other")}
    uncounted = set()
    graph = tf.function(fn).get_concrete_function(inputs).graph  # tracing only: static shapes
    for op in graph.get_operations():
        if op.type in CONV_OPS + MATMUL_OPS:
            totals[_stage_of(op.name, stage_by_layer)] += _op_flops(op)
        elif op.type in ("While", "StatelessWhile", "If", "StatelessIf", "PartitionedCall",
                         "StatefulPartitionedCall"):
            uncounted.add(op.type)
    totals = {k: v for k, v in totals.items() if v or k != "other"}
    totals["uncounted_ops"] = sorted(uncounted)
    return totals


def profiler_flops(fn, inputs) -> float:
    import tensorflow as tf

    graph = tf.function(fn).get_concrete_function(inputs).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)


# ------------------------------------------------------------------------------------------ cases


def run_infer(args):
    import numpy as np
    import tensorflow as tf

    from maskrcnn_tf.model import build_model
    from maskrcnn_tf.ops.masks import paste_masks

    cfg = build_config(args, batch_size=1)
    size = args.image_size
    model = build_model(cfg)
    mean, std = np.array(cfg.model.pixel_mean, np.float32), np.array(cfg.model.pixel_std, np.float32)
    rgb = harness.smooth_noise_image(np, size).astype(np.float32)
    image_info = np.array([[[size, size], [size, size], [1, 1], [0, 0]]], np.float32)  # [1, 4, 2]
    inputs = {"images": tf.constant(((rgb - mean) / std)[None]), "image_info": tf.constant(image_info)}

    def forward(x):
        outputs = model(x, training=False)
        if args.paste_masks:
            with tf.name_scope(PASTE_SCOPE):  # names its ops for the FLOP count
                outputs["pasted_masks"] = paste_masks(outputs["detection_masks"], outputs["detection_boxes"],
                                                      (size, size))  # [1, D, H, W]
        return outputs

    step = tf.function(forward, jit_compile=args.jit_compile)

    def run():
        outputs = step(inputs)
        return outputs, int(outputs["num_detections"].numpy()[0])

    first, runs, (outputs, num_detections) = harness.time_calls(run, args.repeats)
    max_detections = cfg.model.detection.max_detections
    assert num_detections == max_detections, f"{num_detections} detections, expected {max_detections}"
    mask_shape = list(outputs["pasted_masks" if args.paste_masks else "detection_masks"].shape)
    del outputs
    fields = {}
    if args.count_flops:
        stage_flops = count_flops(model, forward, inputs)
        fields["flops_uncounted_control_flow"] = stage_flops.pop("uncounted_ops")
        fields["gflops"] = round(sum(stage_flops.values()) / 1e9, 2)
        fields["gflops_by_stage"] = {k: round(v / 1e9, 2) for k, v in stage_flops.items()}
        fields["effective_gflop_per_s"] = round(fields["gflops"] / float(np.median(runs)), 2)
    if args.profile_flops:
        fields["gflops_tf_profiler"] = round(profiler_flops(forward, inputs) / 1e9, 2)
    return cfg, first, runs, dict(
        num_detections=num_detections, mask_output_shape=mask_shape, paste_masks=args.paste_masks, **fields)


def run_train(args):
    import cv2
    import numpy as np

    from maskrcnn_tf.host_memory import HeapTrimmer
    from maskrcnn_tf.model import build_model
    from maskrcnn_tf.optimizer import build_optimizer

    batch_size = 2
    cfg = build_config(args, batch_size=batch_size)
    size, n_max, mc = args.image_size, cfg.data.max_instances, cfg.data.gt_mask_size
    mean, std = np.array(cfg.model.pixel_mean, np.float32), np.array(cfg.model.pixel_std, np.float32)
    batch = {
        "images": np.zeros((batch_size, size, size, 3), np.float32),
        "image_info": np.tile(np.array([[size, size], [size, size], [1, 1], [0, 0]], np.float32),
                              [batch_size, 1, 1]),  # [B, 4, 2]
        "gt_boxes": -np.ones((batch_size, n_max, 4), np.float32),
        "gt_classes": -np.ones((batch_size, n_max), np.int32),
        "gt_masks": np.zeros((batch_size, n_max, mc, mc), np.float32),
        "has_masks": np.ones([batch_size], np.int32),
    }
    for b, instances in enumerate(harness.train_instances(size)):
        rgb = harness.smooth_noise_image(np, size, seed=b).astype(np.float32)
        for i, (cls, box, shape) in enumerate(instances):
            mask = harness.full_mask(np, size, box, shape)
            rgb[mask > 0] = 0.5 * rgb[mask > 0] + 100.0  # a visible object
            y1, x1, y2, x2 = (int(round(v)) for v in box)
            batch["gt_boxes"][b, i] = box
            batch["gt_classes"][b, i] = cls
            crop = mask[y1:y2, x1:x2].astype(np.float32)
            batch["gt_masks"][b, i] = cv2.resize(crop, (mc, mc), interpolation=cv2.INTER_LINEAR)
        batch["images"][b] = (rgb - mean) / std
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    # As maskrcnn_tf/training.py does: slots built before the first step. Otherwise tf.function traces the
    # step twice (once creating the SGD momenta) and keeps both graphs: measured 3992 vs 3487 MB peak RSS
    # and a first call of 54 s vs 23 s.
    optimizer.build(model.trainable_variables)
    model.compile(optimizer=optimizer, jit_compile=args.jit_compile)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)

    def run():
        return model.train_on_batch(batch, return_dict=True)

    with HeapTrimmer():  # as train.py runs model.fit (maskrcnn_tf/host_memory.py)
        first, runs, losses = harness.time_calls(run, args.repeats)
    total_loss = float(losses["total_loss"])
    assert np.isfinite(total_loss), losses
    return cfg, first, runs, dict(batch_size=batch_size, total_loss=round(total_loss, 4),
                                  trainable_params=trainable, max_instances=n_max,
                                  gt_instances_per_image=[len(x) for x in harness.train_instances(size)])


def main():
    harness.claim_stdout()
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from maskrcnn_tf import host_allocator

    allocator = host_allocator.configure()  # before TF allocates, as every program of ours does
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    from maskrcnn_tf.distribute import AUTO_INTER_OP_THREADS, configure_host_threads

    if args.inter_threads is None:
        args.inter_threads = AUTO_INTER_OP_THREADS if args.case != "infer" else 0
    configure_host_threads(args.inter_threads)
    cfg, first, runs, fields = (run_infer if args.case == "infer" else run_train)(args)
    from maskrcnn_tf.weights import torchvision_mapping

    harness.emit(harness.record(
        args.case, SIDE, "seconds", runs, first,
        versions={"tensorflow": tf.__version__, "keras": keras.__version__},
        image_size=args.image_size, batch_size=fields.pop("batch_size", 1), config=args.config,
        architecture=torchvision_mapping.model_architecture(cfg.model) or "other", norms=norms(cfg),
        bn_mode=bn_mode(cfg, training=args.case != "infer"),
        jit_compile=args.jit_compile, intra_threads=args.threads,
        inter_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        counts=counts(cfg), host_allocator=allocator, **fields))


if __name__ == "__main__":
    main()
