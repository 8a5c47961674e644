"""COCO converter throughput: images/s with 1 and 2 workers on generated COCO-like images.

  python benchmarks/bench_data_convert.py [--num_images=500] [--image_size=640] [--workdir=/tmp/bench]

Generates --num_images JPEG images (shapes generator, 5..9 shapes each, so ~7 polygon instances after
occlusion drops; 640x640 is close to COCO's 640x480 average), converts them with masks into 8 shards
with 1 and 2 workers, and prints one JSON line per run plus the extrapolation to COCO train2017.
Not a test: numbers depend on the machine and its load.
"""
import json
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

try:
    from maskrcnn_tf.data import coco_converter, shapes
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from maskrcnn_tf.data import coco_converter, shapes

COCO_TRAIN2017_IMAGES = 118287
NUM_SHAPES = (5, 9)
NUM_SHARDS = 8

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 500, "Generated images.")
flags.DEFINE_integer("image_size", 640, "Generated image side.")
flags.DEFINE_string("workdir", None, "Scratch folder (default: a temp dir, removed afterwards).")
flags.DEFINE_list("workers", ["1", "2"], "Worker counts to measure.")


def main(argv):
    del argv
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    try:
        start = time.monotonic()
        paths = shapes.make_shapes_dataset(os.path.join(workdir, "data"), FLAGS.num_images, 0, FLAGS.image_size,
                                           seed=0, num_shapes=NUM_SHAPES)
        num_instances = len(json.load(open(paths["train_annotations"]))["annotations"])
        print(json.dumps({"bench": "generate", "images": FLAGS.num_images, "instances": num_instances,
                          "instances_per_image": round(num_instances / FLAGS.num_images, 2),
                          "seconds": round(time.monotonic() - start, 2)}), flush=True)
        for workers in map(int, FLAGS.workers):
            prefix = os.path.join(workdir, f"out_w{workers}", "train")
            start = time.monotonic()
            summary = coco_converter.convert_coco(paths["train_images"], paths["train_annotations"], prefix,
                                                  NUM_SHARDS, num_workers=workers, progress=False)
            seconds = time.monotonic() - start
            rate = summary["images_written"] / seconds
            print(json.dumps({
                "bench": "coco_convert", "workers": workers, "images": summary["images_written"],
                "instances": summary["instances_written"], "image_size": FLAGS.image_size,
                "seconds": round(seconds, 2), "images_per_s": round(rate, 1),
                "train2017_minutes_extrapolated": round(COCO_TRAIN2017_IMAGES / rate / 60, 1),
                "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
