"""Draw and save the detections of a training run or a SavedModel on image files.

  python predict.py --model_dir=runs/coco --image=a.jpg --image=b.png --output_dir=out [--score_threshold=0.5]
  python predict.py --saved_model=exports/coco/1 --image=a.jpg --output_dir=out

Writes per image OUT/<name>.png (masks, boxes, class names and scores drawn) and OUT/<name>.json (boxes as
COCO [x, y, w, h] original pixels, dataset category id and name, score, mask as compressed COCO RLE; see
maskrcnn_tf/predictor.py). Unreadable images are reported on stderr and skipped; the exit status is 1
only when no image succeeded (or the model cannot be loaded: one-line "error: ..." on stderr).
"""
import sys

from absl import app, flags

from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Model directory written by train.py (config.json, checkpoints/).")
flags.DEFINE_string("checkpoint", None, "With --model_dir: checkpoint path prefix; default the latest.")
flags.DEFINE_string("saved_model", None, "SavedModel directory written by export.py (instead of --model_dir).")
flags.DEFINE_multi_string("image", None, "Image file (JPEG, PNG, GIF, BMP); repeat for several.")
flags.DEFINE_string("output_dir", None, "Where the PNG and JSON files go (created).")
flags.DEFINE_float("score_threshold", 0.5, "Detections scoring below this are neither drawn nor written.",
                   lower_bound=0.0, upper_bound=1.0)
flags.mark_flags_as_required(["image", "output_dir"])
flags.register_validator("model_dir", lambda _: bool(FLAGS.model_dir) != bool(FLAGS.saved_model),
                         message="give exactly one of --model_dir and --saved_model")


def run() -> int:
    """Returns the number of images written."""
    # Late imports: flag errors and --help stay fast, TensorFlow loads only for real work.
    from maskrcnn_tf.predictor import Predictor, predict_files

    if FLAGS.saved_model:
        predictor = Predictor.from_saved_model(FLAGS.saved_model)
    else:
        predictor = Predictor.from_model_dir(FLAGS.model_dir, FLAGS.checkpoint)
    written = predict_files(predictor, FLAGS.image, FLAGS.output_dir, score_threshold=FLAGS.score_threshold)
    for path in written:
        print(f"predict: wrote {path}", flush=True)
    num_images = len(written) // 2  # one PNG and one JSON per image
    print(f"predict: {num_images} of {len(FLAGS.image)} images done", flush=True)
    return num_images


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
