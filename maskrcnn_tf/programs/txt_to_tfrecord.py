"""The MindSpore original's text list -> box-only TFRecords (logic: maskrcnn_tf/data/txt_converter.py).

  python data_prep/txt_to_tfrecord.py --image_dir=my_data --annotation_file=my_data/train.txt \
      --output_prefix=records/train [--class_names=my_data/names.txt] [--num_shards=4]

Each line: `relative/path.jpg x1,y1,x2,y2,cls x1,y1,x2,y2,cls ...` (pixels; cls an integer id; line i
of names.txt names class i; the path may contain spaces). Lines with paths escaping --image_dir or bad
fields are skipped and listed with their line numbers in {output_prefix}_summary.json. Records have no
masks: train.py skips their mask loss, so a model trained only on them has an untrained mask head; train
a box-only model with --params_override=model.include_mask=false.
{output_prefix}_annotations.json is the records' ground truth in COCO format (boxes only, image ids = line
numbers, file names as listed): pass it to eval.py as --val_json.
"""
import json
import sys

from absl import flags

from maskrcnn_tf.data import conversion_report, txt_converter
from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("image_dir", None, "Folder the list's paths are relative to.")
flags.DEFINE_string("annotation_file", None, "The text list.")
flags.DEFINE_string("output_prefix", None, "Output path prefix, e.g. records/train.")
flags.DEFINE_string("class_names", None, "Optional names file: line i names class id i.")
flags.DEFINE_integer("num_shards", 1, "Number of TFRecord shards.", lower_bound=1)
flags.DEFINE_integer("num_workers", 1, "Worker processes (each writes whole shards).", lower_bound=1)
flags.DEFINE_boolean("skip_empty", False, "Leave out images without any (valid) box.")
flags.mark_flags_as_required(["image_dir", "annotation_file", "output_prefix"])


def app_main(argv):
    del argv
    try:
        summary = txt_converter.convert_txt(
            FLAGS.image_dir, FLAGS.annotation_file, FLAGS.output_prefix, FLAGS.num_shards,
            class_names_file=FLAGS.class_names, num_workers=FLAGS.num_workers,
            skip_empty=FLAGS.skip_empty)
    except (conversion_report.ConversionError, OSError) as e:  # OSError: unwritable output, full disk
        sys.exit(f"error: {e}")
    brief = {k: v for k, v in summary.items() if k not in ("shards", "examples")}
    print(json.dumps(brief, indent=1))


def main() -> None:
    """Console script `maskrcnn-txt-to-tfrecord`; also `python data_prep/txt_to_tfrecord.py` (the root shim)."""
    launch.run(app_main, __name__)


if __name__ == "__main__":
    main()
