"""Training input pipeline throughput: batches/s and images/s of pipeline.build_dataset.

  python benchmarks/bench_data_pipeline.py [--num_images=64] [--batch_size=2] [--num_batches=40]
      [--image_size=1024] [--workdir=/tmp/bench]

Writes --num_images COCO-like records (640x480 JPEG, smooth background with noise, 5..9 filled
polygons each with its PNG mask, i.e. ~7 instances per image) into 4 shards with schema.build_example,
then times the training pipeline of the coco_r50_fpn_1x preset (1024x1024 input, N = 100, 112x112
mask crops) after a warm-up, for three variants: the preset (flip only), with scale jitter
(0.8, 1.25), and without masks (model.include_mask False). Prints one JSON line per variant plus the
time an epoch of COCO train2017 would take at that rate. Not a test: numbers depend on the machine
and its load (the load average is printed with them).
"""
import json
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
import tensorflow as tf
from absl import app, flags

try:
    from maskrcnn_tf import config as config_lib
    from maskrcnn_tf.data import pipeline, schema
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from maskrcnn_tf import config as config_lib
    from maskrcnn_tf.data import pipeline, schema

COCO_TRAIN2017_IMAGES = 118287
COCO_HEIGHT, COCO_WIDTH = 480, 640  # the most common COCO image size
NUM_SHAPES = (5, 9)  # drawn per image: ~7 on average
NUM_SHARDS = 4
JPEG_QUALITY = 90
WARMUP_BATCHES = 5

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 64, "Generated records (the training pipeline repeats them).")
flags.DEFINE_integer("batch_size", 2, "Global training batch.")
flags.DEFINE_integer("num_batches", 40, "Timed batches per variant (after the warm-up).")
flags.DEFINE_integer("image_size", 1024, "Square model input side.")
flags.DEFINE_string("workdir", None, "Scratch folder (default: a temp dir, removed afterwards).")


def _synthetic_record(rng: np.random.Generator, index: int) -> tf.train.Example:
    """A COCO-like record: photo-ish JPEG (gradient + noise) with random polygons and their masks."""
    h, w = COCO_HEIGHT, COCO_WIDTH
    gradient = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 100, 3)
    image = np.clip(gradient + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    masks, boxes = [], []
    for _ in range(rng.integers(NUM_SHAPES[0], NUM_SHAPES[1] + 1)):
        centre = rng.uniform([40, 40], [w - 40, h - 40])
        radius = rng.uniform(15, 150)
        angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 9)))
        points = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)
        points = np.clip(points, 0, [w - 1, h - 1]).astype(np.int32)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [points], 1)
        if mask.sum() == 0:
            continue
        image[mask > 0] = rng.integers(0, 255, 3)
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
        masks.append(schema.encode_png_mask(mask))
    encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
    n = len(masks)
    return schema.build_example(encoded=encoded, image_format="jpeg", height=h, width=w,
                                filename=f"synthetic_{index:06d}.jpg", source_id=str(index),
                                boxes_norm_xyxy=np.array(boxes).reshape(n, 4), labels=rng.integers(1, 81, n),
                                texts=["shape"] * n, is_crowd=[0] * n, areas=[1.0] * n, png_masks=masks)


def _write_records(workdir: str, num_images: int) -> str:
    rng = np.random.default_rng(0)
    writers = [tf.io.TFRecordWriter(os.path.join(workdir, f"train-{i:05d}-of-{NUM_SHARDS:05d}.tfrecord"))
               for i in range(NUM_SHARDS)]
    num_instances = 0
    for index in range(num_images):
        record = _synthetic_record(rng, index)
        num_instances += len(record.features.feature[schema.LABEL].int64_list.value)
        writers[index % NUM_SHARDS].write(record.SerializeToString())
    for writer in writers:
        writer.close()
    print(json.dumps({"bench": "generate", "images": num_images,
                      "instances_per_image": round(num_instances / num_images, 2)}), flush=True)
    return os.path.join(workdir, "train-*")


def _time_variant(name: str, pattern: str, config: config_lib.Config) -> None:
    dataset = pipeline.build_dataset(pattern, config, training=True)
    iterator = iter(dataset)
    for _ in range(WARMUP_BATCHES):  # tracing, thread start-up, AUTOTUNE's first decisions
        next(iterator)
    start = time.monotonic()
    for _ in range(FLAGS.num_batches):
        next(iterator)
    seconds = time.monotonic() - start
    batches_per_s = FLAGS.num_batches / seconds
    images_per_s = batches_per_s * config.data.train_batch_size
    print(json.dumps({
        "bench": "train_pipeline", "variant": name, "image_size": FLAGS.image_size,
        "batch_size": config.data.train_batch_size, "batches": FLAGS.num_batches,
        "batches_per_s": round(batches_per_s, 2), "images_per_s": round(images_per_s, 1),
        "train2017_epoch_minutes": round(COCO_TRAIN2017_IMAGES / images_per_s / 60, 1),
        "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)


def main(argv):
    del argv
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_pipeline_")
    try:
        pattern = _write_records(workdir, FLAGS.num_images)
        base = config_lib.replace(config_lib.coco_r50_fpn_1x(), **{
            "model.image_size": (FLAGS.image_size, FLAGS.image_size), "data.train_batch_size": FLAGS.batch_size,
            "data.shuffle_buffer": FLAGS.num_images})
        _time_variant("preset_flip", pattern, base)
        _time_variant("scale_jitter_0.8_1.25", pattern, config_lib.replace(base, **{"data.scale_jitter": (0.8, 1.25)}))
        _time_variant("no_masks", pattern, config_lib.replace(base, **{"model.include_mask": False}))
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
