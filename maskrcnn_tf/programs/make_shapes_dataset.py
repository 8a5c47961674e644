"""Draws the synthetic shapes dataset in COCO format (logic: maskrcnn_tf/data/shapes.py).

  python data_prep/make_shapes_dataset.py --output_dir=shapes --num_train=200 --num_val=50 \
      --image_size=256 --seed=0

Writes shapes/{train,val}/*.jpg and shapes/annotations/instances_{train,val}.json (categories 1 square,
2 circle, 3 triangle; polygon masks that pycocotools rasterises exactly). Convert it with
data_prep/coco_to_tfrecord.py.
"""
import json
import sys

from absl import flags

from maskrcnn_tf.data import shapes
from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Folder to write {train,val}/ and annotations/ into.")
flags.DEFINE_integer("num_train", 200, "Training images.", lower_bound=0)
flags.DEFINE_integer("num_val", 50, "Validation images.", lower_bound=0)
flags.DEFINE_integer("image_size", 256, "Square image side in pixels.", lower_bound=16)
flags.DEFINE_integer("seed", 0, "Random seed (image i of a split depends only on seed, split, i).")
flags.DEFINE_integer("max_shapes", 4, "Shapes drawn per image: 1..max_shapes.", lower_bound=1)
flags.DEFINE_enum("image_format", "jpg", ["jpg", "png"], "Image file format.")
flags.mark_flags_as_required(["output_dir"])


def app_main(argv):
    del argv
    try:
        paths = shapes.make_shapes_dataset(FLAGS.output_dir, FLAGS.num_train, FLAGS.num_val, FLAGS.image_size,
                                           FLAGS.seed, num_shapes=(1, FLAGS.max_shapes),
                                           image_format=FLAGS.image_format)
    except (ValueError, OSError) as e:  # e.g. --output_dir is a file or not writable
        sys.exit(f"error: {e}")
    print(json.dumps(paths, indent=1))


def main() -> None:
    """Console script `maskrcnn-make-shapes`; also `python data_prep/make_shapes_dataset.py` (the root shim)."""
    launch.run(app_main, __name__)


if __name__ == "__main__":
    main()
