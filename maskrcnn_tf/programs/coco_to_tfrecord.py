"""COCO instances JSON + images -> sharded TFRecords, label map and summary (logic: coco_converter.py).

  python data_prep/coco_to_tfrecord.py --image_dir=coco/train2017 \
      --annotation_file=coco/annotations/instances_train2017.json --output_prefix=records/train \
      --num_shards=32 --num_workers=2

A missing or unreadable annotation file, an unwritable output or no image written at all exits with a
one-line message (status 1); bad images and annotations are skipped, counted by reason in
{output_prefix}_summary.json, and the run goes on (a warning when many images are missing).
"""
import json
import sys

from absl import flags

from maskrcnn_tf.data import coco_converter
from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("image_dir", None, "Folder the JSON's file_name entries are relative to.")
flags.DEFINE_string("annotation_file", None, "COCO instances JSON.")
flags.DEFINE_string("output_prefix", None, "Output path prefix, e.g. records/train.")
flags.DEFINE_integer("num_shards", 32, "Number of TFRecord shards.", lower_bound=1)
flags.DEFINE_integer("num_workers", 1, "Worker processes (each writes whole shards).", lower_bound=1)
flags.DEFINE_boolean("include_masks", True, "Write one PNG mask per instance.")
flags.DEFINE_boolean("skip_empty", False, "Leave out images without any (valid) instance.")
flags.DEFINE_integer("max_images", None, "Convert only the first N images of the JSON.", lower_bound=0)
flags.mark_flags_as_required(["image_dir", "annotation_file", "output_prefix"])


def app_main(argv):
    del argv
    try:
        summary = coco_converter.convert_coco(
            FLAGS.image_dir, FLAGS.annotation_file, FLAGS.output_prefix, FLAGS.num_shards,
            num_workers=FLAGS.num_workers, include_masks=FLAGS.include_masks,
            skip_empty=FLAGS.skip_empty, max_images=FLAGS.max_images)
    except (coco_converter.ConversionError, OSError) as e:  # OSError: unwritable output, full disk
        sys.exit(f"error: {e}")
    brief = {k: v for k, v in summary.items() if k not in ("shards", "examples")}
    print(json.dumps(brief, indent=1))


def main() -> None:
    """Console script `maskrcnn-coco-to-tfrecord`; also `python data_prep/coco_to_tfrecord.py` (the root shim)."""
    launch.run(app_main, __name__)


if __name__ == "__main__":
    main()
