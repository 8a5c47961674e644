"""Model speed and memory: inference (batch 1) and one training step (batch 2) of a preset, per RoIAlign
backend, with and without XLA. One JSON line per case.

  python benchmarks/bench_model.py [--config=coco_r50_fpn_1x] [--image_size=1024] [--repeats=3]
      [--cases=infer:crop_and_resize,infer:gather,infer:gather:jit,train:crop_and_resize,train:gather,train:gather:jit]

Each case runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own. Random
weights (weights=None; speed does not depend on their values), a synthetic batch with 2 instances per
image. The first call (tracing / XLA compilation) is reported separately as `first_s`; `median_s` and
`min_s` are over --repeats further calls. crop_and_resize has no XLA kernel, so it has no jit case.
Not a test: numbers depend on the machine and its load (the 1-minute load average is printed too).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CASES = ("infer:crop_and_resize,infer:gather,infer:gather:jit,"
                 "train:crop_and_resize,train:gather,train:gather:jit")

flags.DEFINE_string("config", "coco_r50_fpn_1x", "preset name")
flags.DEFINE_integer("image_size", 1024, "square input size")
flags.DEFINE_integer("repeats", 3, "timed calls after the first")
flags.DEFINE_string("cases", DEFAULT_CASES, "comma-separated mode:backend[:jit]")
flags.DEFINE_string("run_case", None, "internal: run one case in this process and print its JSON")
FLAGS = flags.FLAGS


def _run_case(case: str) -> dict:
    sys.path.insert(0, ROOT)
    import tensorflow as tf

    from maskrcnn_tf import config as config_lib
    from maskrcnn_tf.model import build_model
    from maskrcnn_tf.optimizer import build_optimizer
    from tests.e2e.synthetic import make_batch

    mode, backend, *rest = case.split(":")
    jit = rest == ["jit"]
    batch_size = 1 if mode == "infer" else 2
    size = FLAGS.image_size
    cfg = config_lib.replace(config_lib.get_preset(FLAGS.config), **{
        "model.backbone.weights": None, "model.image_size": (size, size),
        "model.roi.roi_align_backend": backend, "data.train_batch_size": batch_size})
    model = build_model(cfg)
    s = size / 1024.0
    instances = [[(1, [100 * s, 200 * s, 400 * s, 600 * s]), (2, [500 * s, 100 * s, 900 * s, 300 * s])]]
    data, _ = make_batch(cfg, instances * batch_size)
    if mode == "infer":
        inputs = {"images": tf.constant(data["images"]), "image_info": tf.constant(data["image_info"])}
        step = tf.function(lambda x: model(x, training=False), jit_compile=jit)
        run = lambda: {k: v.numpy() for k, v in step(inputs).items()}  # noqa: E731
    else:
        model.compile(optimizer=build_optimizer(cfg, model), jit_compile=jit)
        run = lambda: model.train_on_batch(data, return_dict=True)  # noqa: E731
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "case": case, "mode": mode, "backend": backend, "jit": jit, "config": FLAGS.config,
        "image_size": size, "batch_size": batch_size, "first_s": round(first, 3),
        "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
        "load_avg_1m": os.getloadavg()[0], "tensorflow": tf.__version__,
    }


def main(argv):
    del argv
    if FLAGS.run_case:
        print(json.dumps(_run_case(FLAGS.run_case)), flush=True)
        return
    for case in FLAGS.cases.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), f"--run_case={case}", f"--config={FLAGS.config}",
               f"--image_size={FLAGS.image_size}", f"--repeats={FLAGS.repeats}"]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            print(json.dumps({"case": case, "error": result.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
            print(lines[-1], flush=True)


if __name__ == "__main__":
    app.run(main)
