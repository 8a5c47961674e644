"""Device check: what an 8-GPU or TPU run relies on, tried on the machine at hand in a few minutes.

  python benchmarks/device_check.py                    # every check; on one GPU it makes two logical GPUs
  python benchmarks/device_check.py --checks=devices,mirrored_jit,overflow

One JSON line per check on stdout: {"check", "status": "pass" | "fail" | "skip", "seconds", ...}; the
exit status is 1 when any check failed. Checks:

  devices        what TensorFlow sees, and the two replicas the next checks use: two logical GPUs made
                 from the first GPU, or two logical CPUs on a host without one
  mirrored_jit   MirroredStrategy + jit_compile trains 3 steps of the tiny model (XLA per replica: its
                 forward and backward pass are XLA functions, the gradient sum is not in them)
  overflow       mixed_float16, an inf only in replica 1's image: both replicas skip the step (weights
                 unchanged), the loss scale halves, the step counts
  nms_precision  GPU only: batched_nms on 80 classes' offset boxes, mask targets and mask pasting on the
                 GPU with TF32 on and off equal the CPU's results (the data-moving ops are exact)
  throughput     GPU only: benchmarks/cases/ours_gpu_train.py with mixed_float16 and mixed_bfloat16
                 (a subprocess that sees every GPU; its JSON record is embedded)

On a host without a GPU the GPU-only checks print status "skip" with the reason, and the rest run on
CPU replicas. A TPU is not split: run the same checks there with --strategy=tpu in train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
CHECKS = ("devices", "mirrored_jit", "overflow", "nms_precision", "throughput")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS))
    parser.add_argument("--logical_gpu_memory_mb", type=int, default=16384,
                        help="memory of each of the two logical GPUs made from the first GPU")
    parser.add_argument("--throughput_repeats", type=int, default=20, help="timed steps per precision")
    args = parser.parse_args(argv)
    args.check_list = [c for c in args.checks.split(",") if c]
    unknown = set(args.check_list) - set(CHECKS)
    if unknown or not args.check_list:
        parser.error(f"--checks: expected a subset of {','.join(CHECKS)}, got {args.checks!r}")
    return args


def emit(check: str, status: str, start: float, **details) -> bool:
    print(json.dumps({"check": check, "status": status, "seconds": round(time.monotonic() - start, 1), **details}),
          flush=True)
    return status != "fail"


def split_devices(tf, logical_gpu_memory_mb: int) -> str:
    """Two logical devices of the first GPU, or of the CPU without one; returns their type."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        config = tf.config.LogicalDeviceConfiguration(memory_limit=logical_gpu_memory_mb)
        tf.config.set_logical_device_configuration(gpus[0], [config, config])
        return "GPU"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return "CPU"


def tiny_config(**overrides):
    from tests.e2e.synthetic import tiny_test_config

    return tiny_test_config(**{"data.train_batch_size": 2, "train.seed": 0, **overrides})


def replica_batches(tf, strategy, data):
    """Replica r gets image r of the numpy batch `data` (2 images)."""
    def value_fn(context):
        r = context.replica_id_in_sync_group
        return {k: tf.constant(v[r:r + 1]) for k, v in data.items()}
    return strategy.experimental_distribute_values_from_function(value_fn)


def xla_ops(concrete_function) -> set:
    """Op types inside the functions of a concrete function's library that are marked for XLA."""
    library = concrete_function.graph.as_graph_def().library
    return {node.op for f in library.function if f.attr["_XlaMustCompile"].b for node in f.node_def}


def check_mirrored_jit(tf, np, strategy) -> dict:
    from maskrcnn_tf.model import LOSS_NAMES
    from maskrcnn_tf.training import _build
    from tests.e2e.synthetic import TWO_IMAGES, make_batch

    cfg = tiny_config(**{"model.roi.roi_align_backend": "gather", "train.jit_compile": True})
    model, optimizer, _ = _build(cfg, strategy)
    data, _ = make_batch(cfg, TWO_IMAGES)
    batch = replica_batches(tf, strategy, data)
    step = tf.function(lambda b: strategy.run(model.train_step, args=(b,)))
    before = [v.numpy().copy() for v in model.trainable_variables]
    for _ in range(3):
        losses = step(batch)
    total = [float(v) for v in strategy.experimental_local_results(losses["total_loss"])]
    ops = xla_ops(step.get_concrete_function(batch))
    changed = sum(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    local = strategy.experimental_local_results
    finite = all(np.isfinite(float(v)) for name in LOSS_NAMES for v in local(losses[name]))
    ok = (model.replica_jit_compile and int(optimizer.iterations.numpy()) == 3 and finite
          and changed > len(before) // 2
          and {"Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput"} <= ops
          and not any(op.startswith(("Collective", "Nccl")) for op in ops))
    return {"status": "pass" if ok else "fail", "steps": int(optimizer.iterations.numpy()),
            "total_loss_per_replica": total, "variables_changed": f"{changed}/{len(before)}",
            "xla_forward_and_backward": {"Conv2D", "Conv2DBackpropFilter"} <= ops,
            "collectives_inside_xla": sorted(op for op in ops if op.startswith(("Collective", "Nccl")))}


def check_overflow(tf, np, keras, strategy) -> dict:
    from maskrcnn_tf.training import _build
    from tests.e2e.synthetic import TWO_IMAGES, make_batch

    cfg = tiny_config(**{"train.precision": "mixed_float16", "train.initial_loss_scale": 1024.0})
    model, optimizer, _ = _build(cfg, strategy)
    data, _ = make_batch(cfg, TWO_IMAGES)
    data["images"][1, 5, 5, 0] = np.inf  # replica 1's image only
    before = [[np.array(x) for x in strategy.experimental_local_results(v.value)] for v in model.trainable_variables]
    tf.function(lambda b: strategy.run(model.train_step, args=(b,)))(replica_batches(tf, strategy, data))
    moved = [f"{v.path} (replica {r})" for b, v in zip(before, model.trainable_variables)
             for r, (old, new) in enumerate(zip(b, strategy.experimental_local_results(v.value)))
             if not np.array_equal(old, np.array(new))]
    scale = float(optimizer.dynamic_scale.numpy())
    keras.mixed_precision.set_global_policy("float32")
    ok = not moved and scale == 512.0 and int(optimizer.skipped_steps.numpy()) == 1
    return {"status": "pass" if ok else "fail", "weights_moved": moved[:5], "loss_scale": scale,
            "skipped_steps": int(optimizer.skipped_steps.numpy()), "iterations": int(optimizer.iterations.numpy())}


def data_moving_ops(tf, np):
    """(name, fn) of batched_nms on 80 classes' offset boxes, mask_targets and paste_masks on seeded
    inputs; each fn returns numpy outputs."""
    from maskrcnn_tf.ops import masks, nms

    rng = np.random.default_rng(0)
    num_classes, per_class = 80, 64
    corners = rng.uniform(0, 1000, (1, num_classes * per_class, 2))
    sizes = rng.uniform(8, 200, (1, num_classes * per_class, 2))
    boxes = np.concatenate([corners, corners + sizes], -1)
    offsets = np.repeat(np.arange(num_classes), per_class)[None, :, None] * 1025.0  # class-aware NMS offset
    shifted = tf.constant((boxes + offsets).astype(np.float32))
    scores = tf.constant(rng.uniform(0, 1, (1, num_classes * per_class)).astype(np.float32))
    gt_masks = tf.constant(rng.uniform(0, 1, (1, 4, 28, 28)).astype(np.float32))
    gt_boxes = tf.constant(np.array([[[10, 10, 300, 200], [50, 60, 90, 700], [0, 0, 1000, 1000],
                                      [400, 400, 420, 800]]], np.float32))
    rois = tf.constant((gt_boxes.numpy()[:, [0, 1, 2, 3, 0, 1]] + rng.uniform(-20, 20, (1, 6, 4))).astype(np.float32))
    matched = tf.constant([[0, 1, 2, 3, 0, 1]], tf.int32)
    probabilities = tf.constant(rng.uniform(0, 1, (1, 6, 28, 28)).astype(np.float32))
    return [
        ("batched_nms", lambda: nms.batched_nms(shifted, scores, 300, 0.5)[0].numpy()),
        ("mask_targets", lambda: masks.mask_targets(gt_masks, gt_boxes, rois, matched).numpy()),
        ("paste_masks", lambda: masks.paste_masks(probabilities, rois, (512, 768)).numpy()),
    ]


def check_nms_precision(tf, np) -> dict:
    if not tf.config.list_logical_devices("GPU"):
        return {"status": "skip", "reason": "no GPU: TF32 exists only on GPU matmuls (CPU float32 is exact)"}
    results = {}
    for name, fn in data_moving_ops(tf, np):
        with tf.device("/CPU:0"):
            expected = fn()
        for tf32 in (True, False):
            tf.config.experimental.enable_tensor_float_32_execution(tf32)
            with tf.device("/GPU:0"):
                got = fn()
            results[f"{name} tf32={tf32}"] = float(np.abs(got.astype(np.float64) - expected).max())
    tf.config.experimental.enable_tensor_float_32_execution(True)  # TF's default
    # NMS returns indices (any difference is a different selection); masks are probabilities (1e-5).
    ok = all(d == 0 if k.startswith("batched_nms") else d <= 1e-5 for k, d in results.items())
    return {"status": "pass" if ok else "fail", "max_abs_difference_vs_cpu": results}


def check_throughput(tf, repeats: int) -> dict:
    if not tf.config.list_physical_devices("GPU"):
        return {"status": "skip", "reason": "no GPU: ours_gpu_train.py measures GPU training only"}
    script = os.path.join(REPO_ROOT, "benchmarks", "cases", "ours_gpu_train.py")
    proc = subprocess.run([sys.executable, script, "--case=gpu_train", "--precisions=mixed_float16,mixed_bfloat16",
                           f"--repeats={repeats}", "--warmup=5"], capture_output=True, text=True, timeout=480)
    if proc.returncode != 0:
        return {"status": "fail", "stderr_tail": proc.stderr[-2000:]}
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    by_precision = {p: r["images_per_second"] for p, r in record["by_precision"].items()}
    return {"status": "pass", "images_per_second": by_precision, "record": record}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    start = time.monotonic()
    kind = split_devices(tf, args.logical_gpu_memory_mb)  # before TensorFlow initialises its devices
    devices = [d.name for d in tf.config.list_logical_devices(kind)][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    ok = True
    if "devices" in args.check_list:
        ok &= emit("devices", "pass" if strategy.num_replicas_in_sync == 2 else "fail", start,
                   physical={t: len(tf.config.list_physical_devices(t)) for t in ("CPU", "GPU", "TPU")},
                   replicas=devices, tensorflow=tf.__version__, keras=keras.__version__)
    checks = {"mirrored_jit": lambda: check_mirrored_jit(tf, np, strategy),
              "overflow": lambda: check_overflow(tf, np, keras, strategy),
              "nms_precision": lambda: check_nms_precision(tf, np),
              "throughput": lambda: check_throughput(tf, args.throughput_repeats)}
    for name in CHECKS[1:]:
        if name not in args.check_list:
            continue
        start = time.monotonic()
        try:
            result = checks[name]()
        except Exception as e:  # a check that crashes is a failed check; the others still run
            result = {"status": "fail", "error": f"{type(e).__name__}: {str(e)[:500]}",
                      "traceback_tail": traceback.format_exc()[-1500:]}
        ok &= emit(name, result.pop("status"), start, **result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
