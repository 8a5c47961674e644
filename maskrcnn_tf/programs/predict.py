"""Draw and save the detections of a training run or a SavedModel on image files.

  python predict.py --model_dir=runs/coco --image=a.jpg --image=b.png --output_dir=out [--score_threshold=0.5]
  python predict.py --saved_model=exports/coco/1 --image=photos/ --output_dir=out --format=coco_json

--image takes files or folders (a folder's JPEG, PNG, GIF, BMP and WebP files, sorted by name).
--format:
  png_json (default)  per image OUT/<name>.png (masks, boxes, class names and scores drawn) and
                      OUT/<name>.json (boxes as COCO [x, y, w, h] original pixels, dataset category id and
                      name, score, mask as compressed COCO RLE; see maskrcnn_tf/predictor.py)
  polygons            the same, each mask a GeoJSON-style MultiPolygon along pixel edges (outer rings and
                      holes, image pixels; maskrcnn_tf/polygons.py), simplified by --polygon_tolerance
  coco_json           OUT/results.json, COCO results (image_id, category_id, bbox, score, RLE
                      segmentation) that pycocotools' COCO.loadRes reads, and OUT/images.json, the COCO
                      images and categories they refer to; image ids from --image_ids_from (a COCO
                      annotation file, matched by file name) or 1..N in input order
Unreadable images are reported on stderr and skipped; the exit status is 1 only when no image succeeded
(or the model cannot be loaded, or an image is missing from --image_ids_from: one-line "error: ..." on
stderr).
"""
import os
import sys

from absl import app, flags

from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Model directory written by train.py (config.json, checkpoints/).")
flags.DEFINE_string("checkpoint", None, "With --model_dir: checkpoint path prefix; default the latest.")
flags.DEFINE_string("saved_model", None, "SavedModel directory written by export.py (instead of --model_dir).")
flags.DEFINE_multi_string("image", None, "Image file (JPEG, PNG, GIF, BMP, WebP) or folder of them; repeat for "
                          "several.")
flags.DEFINE_string("output_dir", None, "Where the PNG and JSON files go (created).")
flags.DEFINE_float("score_threshold", 0.5, "Detections scoring below this are neither drawn nor written.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("format", "png_json", ["png_json", "polygons", "coco_json"], "What to write (module docstring).")
flags.DEFINE_float("polygon_tolerance", 0.0, "--format=polygons: simplification in pixels; 0 = exact pixel edges.",
                   lower_bound=0.0)
flags.DEFINE_string("image_ids_from", None, "--format=coco_json: a COCO annotation JSON whose images' ids the "
                    "results use, matched by file name (default: 1..N in input order).")
flags.mark_flags_as_required(["image", "output_dir"])
flags.register_validator("model_dir", lambda _: bool(FLAGS.model_dir) != bool(FLAGS.saved_model),
                         message="give exactly one of --model_dir and --saved_model")


def run() -> int:
    """Returns the number of images written."""
    # Late imports: flag errors and --help stay fast, TensorFlow loads only for real work.
    from maskrcnn_tf.predictor import Predictor, predict_files

    images = expand_images(FLAGS.image)  # before loading the model: a bad list fails in a second
    image_ids = read_image_ids(FLAGS.image_ids_from, images) if FLAGS.image_ids_from else None
    if FLAGS.saved_model:
        predictor = Predictor.from_saved_model(FLAGS.saved_model)
    else:
        predictor = Predictor.from_model_dir(FLAGS.model_dir, FLAGS.checkpoint)
    written, num_images = predict_files(predictor, images, FLAGS.output_dir, score_threshold=FLAGS.score_threshold,
                                        output_format=FLAGS.format, polygon_tolerance=FLAGS.polygon_tolerance,
                                        image_ids=image_ids)
    for path in written:
        print(f"predict: wrote {path}", flush=True)
    print(f"predict: {num_images} of {len(images)} images done", flush=True)
    return num_images


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def expand_images(paths):
    """Files as given; a folder becomes its image files (IMAGE_SUFFIXES, any case), sorted by name.
    ValueError for a folder without any."""
    import tensorflow as tf

    images = []
    for path in paths:
        if not tf.io.gfile.isdir(path):
            images.append(path)
            continue
        found = sorted(name for name in tf.io.gfile.listdir(path) if name.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise ValueError(f"--image={path}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
        images += [os.path.join(path, name) for name in found]
    return images


def read_image_ids(annotation_file, images):
    """{file basename: image id} from a COCO JSON's "images"; ValueError naming the first image it lacks."""
    import json

    import tensorflow as tf

    with tf.io.gfile.GFile(annotation_file) as f:
        ids = {os.path.basename(im["file_name"]): int(im["id"]) for im in json.load(f).get("images", [])}
    missing = [path for path in images if os.path.basename(path) not in ids]
    if missing:
        raise ValueError(f"--image_ids_from={annotation_file}: {os.path.basename(missing[0])} is not among its "
                         f"images ({len(missing)} of {len(images)} images missing)")
    return ids


def app_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    try:
        num_images = run()
    except (ValueError, OSError, tf.errors.OpError) as e:
        launch.exit_with_error(e)
    if num_images == 0:
        print("error: no image could be processed", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Console script `maskrcnn-predict`; also `python predict.py` (the root shim)."""
    launch.run(app_main, __name__, configure_allocator=True)


if __name__ == "__main__":
    main()
