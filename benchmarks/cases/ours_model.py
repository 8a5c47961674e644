"""maskrcnn_tf side of the model cases: `infer` (batch 1, end to end incl. mask pasting) and `train` (one
SGD step, batch 2). One JSON line on stdout (benchmarks/cases/_harness.py), logs on stderr.

  /work/venv/bin/python benchmarks/cases/ours_model.py --case=infer [--image_size=1024] [--repeats=5]
      [--roi_align_backend=gather] [--jit_compile] [--paste_masks=false] [--count_flops=false]
      [--profile_flops]
  /work/venv/bin/python benchmarks/cases/ours_model.py --case=train [--repeats=3] [--max_instances=100]

Decisions:
- Preset coco_r50_fpn_1x (--config), random weights (`model.backbone.weights=None`; speed does not depend on their
  values), num_classes 80, frozen BN, stem + res2 frozen (the preset). Counts: test proposals
  1000 pre-NMS per level / 1000 post-NMS, 100 detections; train 2000 / 1000, RPN 256 anchors/image,
  512 RoIs/image at 25% foreground (the preset; printed in the JSON so a changed preset shows).
- `infer`: the detection score threshold is 0 so that every run returns exactly 100 detections and the
  mask head always sees 100 RoIs (asserted), as on the peer side. One `tf.function` (optionally XLA)
  holds model(inputs, training=False) and ops.masks.paste_masks, which turns the 28x28 probabilities
  into [1, 100, H, W] image-size masks as torchvision returns them. The input is one already-decoded,
  normalised image (smooth noise) with image_info saying the whole padded image is valid.
- `train`: `model.compile(optimizer=build_optimizer(cfg, model))` and `model.train_on_batch(batch)`,
  i.e. the real Keras train_step (forward, losses, gradients, SGD momentum 0.9 update). Batch of 2
  images with 3 instances each (harness.TRAIN_INSTANCES_1024), gt padded to data.max_instances (100,
  what the input pipeline delivers) and gt masks cropped to their boxes at data.gt_mask_size (112), the
  data contract of DESIGN.md section 4.
- Threads: intra-op parallelism = --threads (2, as torch.set_num_threads on the peer side); inter-op
  left at TF's default unless --inter_threads is given.
- FLOP count (`infer`, --count_flops, default on): every Conv2D / Conv2DTranspose / Dense of the model
  is wrapped for one extra trace of the same function, recording the static shapes each call sees:
  conv 2*N*Ho*Wo*Cin*Cout*kh*kw, transposed conv 2*N*Hi*Wi*Cin*Cout*kh*kw, dense 2*rows*in*out, where
  N and rows include the RoI count (1000 box RoIs, 100 mask RoIs) because the heads fold RoIs into the
  batch. Stages: the layer that owns the op (backbone, fpn, rpn_head, box_head, mask_head), plus
  paste_masks' two matmuls (2*D*H*M*M + 2*D*H*M*W). Biases, BatchNorm, ReLU, RoIAlign, NMS and
  other elementwise work are not counted (a few GFLOPs at most). --profile_flops adds TF's own graph
  count (tf.compat.v1.profiler float_operation) as a cross-check.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402

SIDE = "ours"
CONFIG = "coco_r50_fpn_1x"
DEFAULT_REPEATS = {"infer": 5, "train": 3}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_args():
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG, help="preset name (maskrcnn_tf.config.PRESETS)")
    parser.add_argument("--roi_align_backend", default=None, help="crop_and_resize | gather (default: preset's)")
    parser.add_argument("--jit_compile", type=_bool, nargs="?", const=True, default=False,
                        help="XLA-compile the inference function / train step")
    parser.add_argument("--paste_masks", type=_bool, nargs="?", const=True, default=True)
    parser.add_argument("--count_flops", type=_bool, nargs="?", const=True, default=True)
    parser.add_argument("--profile_flops", type=_bool, nargs="?", const=True, default=False,
                        help="also count FLOPs with tf.compat.v1.profiler (slow: re-traces the graph)")
    parser.add_argument("--max_instances", type=int, default=None, help="gt padding N (default: preset's)")
    parser.add_argument("--inter_threads", type=int, default=0, help="inter-op threads (0 = TF default)")
    args = parser.parse_args()
    if args.case not in DEFAULT_REPEATS:
        parser.error(f"--case must be one of {sorted(DEFAULT_REPEATS)}")
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS[args.case]
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
    if args.roi_align_backend:
        overrides["model.roi.roi_align_backend"] = args.roi_align_backend
    if args.max_instances:
        overrides["data.max_instances"] = args.max_instances
    return config_lib.replace(config_lib.get_preset(args.config), **overrides)


def counts(cfg) -> dict:
    m = cfg.model
    return {
        "pre_nms_top_k_per_level_test": m.rpn.pre_nms_top_k_test, "post_nms_top_k_test": m.rpn.post_nms_top_k_test,
        "pre_nms_top_k_per_level_train": m.rpn.pre_nms_top_k_train,
        "post_nms_top_k_train": m.rpn.post_nms_top_k_train,
        "rpn_anchors_per_image": m.rpn.batch_size_per_image, "rois_per_image": m.roi.num_samples,
        "roi_foreground_fraction": m.roi.foreground_fraction, "max_detections": m.detection.max_detections,
        "score_threshold": m.detection.score_threshold, "num_classes": m.num_classes,
        "roi_align_backend": m.roi.roi_align_backend, "freeze_at": m.backbone.freeze_at,
    }


# ------------------------------------------------------------------------------------ FLOP count


def _layer_flops(layer, input_shape, output_shape) -> int:
    import keras

    def prod(values):
        total = 1
        for v in values:
            total *= int(v)
        return total

    if isinstance(layer, keras.layers.Dense):
        return 2 * prod(input_shape[:-1]) * int(input_shape[-1]) * layer.units
    kh, kw = layer.kernel_size
    groups = getattr(layer, "groups", 1) or 1
    if isinstance(layer, keras.layers.Conv2DTranspose):
        # Each input pixel scatters a kh x kw x Cout patch.
        return 2 * prod(input_shape[:-1]) * int(input_shape[-1]) * layer.filters * kh * kw
    # Conv2D: each output pixel is a kh x kw x Cin/groups dot product per output channel.
    return 2 * prod(output_shape[:-1]) * int(input_shape[-1]) // groups * layer.filters * kh * kw


def count_flops(model, fn, inputs, paste_shape) -> dict:
    """FLOPs of one call of `fn(inputs)` per stage, from the static shapes seen by each layer call.

    paste_shape: (D, H, W, M) when fn pastes masks, else None. Returns {stage: flops}.
    """
    import keras
    import tensorflow as tf

    stages = {"backbone": model.backbone, "fpn": model.fpn, "rpn_head": model.rpn_head,
              "box_head": model.box_head, "mask_head": model.mask_head}
    totals = {name: 0 for name in stages}
    wrapped = []
    for stage, parent in stages.items():
        for layer in parent._flatten_layers(include_self=False, recursive=True):
            if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose, keras.layers.Dense)):
                continue

            def counting_call(x, *a, _layer=layer, _call=layer.call, _stage=stage, **k):
                y = _call(x, *a, **k)
                totals[_stage] += _layer_flops(_layer, tuple(x.shape), tuple(y.shape))
                return y

            layer.call = counting_call
            wrapped.append(layer)
    try:
        tf.function(fn).get_concrete_function(inputs)  # tracing only: static shapes, no compute
    finally:
        for layer in wrapped:
            del layer.call  # back to the class method
    if paste_shape:
        d, h, w, m = paste_shape
        totals["paste_masks"] = 2 * d * h * m * m + 2 * d * h * m * w  # rows, then columns (ops.masks)
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
        paste_shape = (max_detections, size, size, cfg.model.heads.mask_size) if args.paste_masks else None
        stage_flops = count_flops(model, forward, inputs, paste_shape)
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
    model.compile(optimizer=build_optimizer(cfg, model), jit_compile=args.jit_compile)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)

    def run():
        return model.train_on_batch(batch, return_dict=True)

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
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    cfg, first, runs, fields = (run_infer if args.case == "infer" else run_train)(args)
    harness.emit(harness.record(
        args.case, SIDE, "seconds", runs, first,
        versions={"tensorflow": tf.__version__, "keras": keras.__version__},
        image_size=args.image_size, batch_size=fields.pop("batch_size", 1), config=args.config,
        jit_compile=args.jit_compile, intra_threads=args.threads,
        inter_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        counts=counts(cfg), **fields))


if __name__ == "__main__":
    main()
