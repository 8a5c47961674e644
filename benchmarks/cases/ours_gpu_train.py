"""maskrcnn_tf training throughput on NVIDIA GPUs: images/s at batch 2 per GPU, 1024 x 1024, float32 and
mixed_float16 (or mixed_bfloat16 on request), in one process. One JSON line on stdout
(benchmarks/cases/_harness.py), logs on stderr.

  /work/venv/bin/python benchmarks/cases/ours_gpu_train.py --case=gpu_train [--image_size=1024]
      [--repeats=50] [--warmup=10] [--batch_per_gpu=2] [--precisions=float32,mixed_float16]
  python benchmarks/compare.py --cases=gpu_train          # the same, through the side-by-side driver

The figure to beat is NVIDIA's TF2 Mask R-CNN (DeepLearningExamples): 28.6 images/s training on one
A100 80GB with AMP, batch 2 per GPU ("reference" in the JSON line). Without a GPU the script refuses
in one line on stderr ("error: no GPU ...") with exit status 1, which compare.py reports as an error.

Decisions:
- The training path of train.py: training._build (model and optimizer under the strategy's scope,
  LossScaleOptimizer for mixed_float16, slots built before the first step) and Keras fit, under
  MirroredStrategy over every visible GPU (global batch = batch_per_gpu x GPUs). The CPU-only
  techniques resolve to their GPU settings (device_defaults.py): no recompute, no banded gradients,
  TF's own RoIAlign gradient, no heap trimmer.
- Preset coco_r50_fpn_1x with random weights (speed does not depend on their values), 80 classes, the
  data contract's padding (100 gt per image, 112 x 112 masks) and 3 instances per image (harness).
  The batch is a constant dataset repeated, so the input pipeline costs nothing: this measures the
  model, as NVIDIA's figure does (its loader is DALI on the GPU).
- Timing: the wall time between consecutive batch ends (each waits for the step's loss, so GPU work
  is finished), after `--warmup` steps (graph build, autotuning); value = global batch / median step.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402

SIDE = "ours"
CASE = "gpu_train"
CONFIG = "coco_r50_fpn_1x"
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
REFERENCE = {"images_per_second": 28.6, "what": "NVIDIA DeepLearningExamples TF2 Mask R-CNN, 1x A100 80GB, AMP, "
             "batch 2 per GPU"}


def parse_args():
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (tracing, autotuning)")
    parser.add_argument("--batch_per_gpu", type=int, default=2)
    parser.add_argument("--precisions", default="float32,mixed_float16", help="comma-separated subset of "
                        + ",".join(PRECISIONS))
    args = parser.parse_args()
    if args.case != CASE:
        parser.error(f"--case must be {CASE}")
    args.repeats = args.repeats or 50
    args.precision_list = [p for p in args.precisions.split(",") if p]
    unknown = set(args.precision_list) - set(PRECISIONS)
    if unknown or not args.precision_list:
        parser.error(f"--precisions: expected a subset of {','.join(PRECISIONS)}, got {args.precisions!r}")
    return args


def train_batch(np, cfg, size: int, batch_size: int) -> dict:
    """The train case's batch (harness.train_instances, padded as the pipeline pads), tiled to batch_size."""
    import cv2

    n_max, mc = cfg.data.max_instances, cfg.data.gt_mask_size
    mean, std = np.array(cfg.model.pixel_mean, np.float32), np.array(cfg.model.pixel_std, np.float32)
    instances = harness.train_instances(size)
    batch = {"images": np.zeros((batch_size, size, size, 3), np.float32),
             "image_info": np.tile(np.array([[size, size], [size, size], [1, 1], [0, 0]], np.float32),
                                   [batch_size, 1, 1]),  # [B, 4, 2]
             "gt_boxes": -np.ones((batch_size, n_max, 4), np.float32),
             "gt_classes": -np.ones((batch_size, n_max), np.int32),
             "gt_masks": np.zeros((batch_size, n_max, mc, mc), np.float32),
             "has_masks": np.ones([batch_size], np.int32)}
    for b in range(batch_size):
        rgb = harness.smooth_noise_image(np, size, seed=b % len(instances)).astype(np.float32)
        for i, (cls, box, shape) in enumerate(instances[b % len(instances)]):
            mask = harness.full_mask(np, size, box, shape)
            rgb[mask > 0] = 0.5 * rgb[mask > 0] + 100.0  # a visible object
            y1, x1, y2, x2 = (int(round(v)) for v in box)
            batch["gt_boxes"][b, i], batch["gt_classes"][b, i] = box, cls
            batch["gt_masks"][b, i] = cv2.resize(mask[y1:y2, x1:x2].astype(np.float32), (mc, mc),
                                                 interpolation=cv2.INTER_LINEAR)
        batch["images"][b] = (rgb - mean) / std
    return batch


def measure(args, precision: str, strategy) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from maskrcnn_tf import config as config_lib
    from maskrcnn_tf import device_defaults, training

    global_batch = args.batch_per_gpu * strategy.num_replicas_in_sync
    cfg = config_lib.replace(config_lib.get_preset(CONFIG), **{
        "model.backbone.weights": None, "model.image_size": (args.image_size, args.image_size),
        "data.train_batch_size": global_batch, "train.precision": precision})
    model, optimizer, _ = training._build(cfg, strategy)
    batch = train_batch(np, cfg, args.image_size, global_batch)
    dataset = tf.data.Dataset.from_tensors(batch).repeat()  # global batches; the strategy splits them
    ends = []

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            float(np.asarray(logs["total_loss"]).reshape(-1)[0])  # waits for the step
            ends.append(time.perf_counter())

    steps = args.warmup + args.repeats + 1
    model.fit(strategy.experimental_distribute_dataset(dataset), steps_per_epoch=steps, epochs=1, verbose=0,
              callbacks=[StepTimes()])
    runs = [b - a for a, b in zip(ends[args.warmup:], ends[args.warmup + 1:])]
    median = statistics.median(runs)
    switches = device_defaults.resolve(cfg).train
    keras.mixed_precision.set_global_policy("float32")
    return {"images_per_second": round(global_batch / median, 2), "median_step_s": round(median, 4),
            "runs": [round(r, 4) for r in runs], "global_batch": global_batch,
            "skipped_steps": int(optimizer.skipped_steps.numpy()) if hasattr(optimizer, "skipped_steps") else 0,
            "cpu_techniques": {name: getattr(switches, name) for name in
                               (*config_lib.DEVICE_SWITCHES, "roi_align_gradient")}}


def main():
    harness.claim_stdout()
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        sys.exit("error: no GPU: TensorFlow sees no GPU on this machine (this case measures GPU training; "
                 "the CPU cases are infer and train)")
    for gpu in gpus:  # several precisions in one process: take memory as needed, not all of it up front
        tf.config.experimental.set_memory_growth(gpu, True)
    strategy = tf.distribute.MirroredStrategy()
    results = {}
    for precision in args.precision_list:
        harness.log(f"{precision}: batch {args.batch_per_gpu} x {strategy.num_replicas_in_sync} GPU(s), "
                    f"{args.warmup} + {args.repeats} steps")
        results[precision] = measure(args, precision, strategy)
        harness.log(f"{precision}: {results[precision]['images_per_second']} images/s")
    shown = results[args.precision_list[-1]]  # mixed_float16 by default: what NVIDIA's figure uses
    harness.emit({
        "case": CASE, "side": SIDE, "metric": "images_per_second", "value": shown["images_per_second"],
        "value_precision": args.precision_list[-1], "by_precision": results, "reference": REFERENCE,
        "gpus": [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus],
        "batch_per_gpu": args.batch_per_gpu, "image_size": args.image_size, "config": CONFIG,
        "peak_rss_mb": harness.peak_rss_mb(), "load_avg_1m": harness.load_avg_1m(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}})


if __name__ == "__main__":
    main()
