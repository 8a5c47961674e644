"""Export a training run as a SavedModel for TF Serving (signatures: maskrcnn_tf/export.py docstring).

  python export.py --model_dir=runs/coco --export_dir=exports/coco/1 [--checkpoint=PATH] [--no_pasted_masks]

The model is built from MODEL_DIR/config.json and the given checkpoint, or the latest one. TF Serving
expects a numbered version folder under the model's base path (exports/coco/1 above). Wrong inputs (no
config, no checkpoint, a checkpoint of another configuration) end with a one-line "error: ..." on stderr
and exit status 1.
"""
import time

from absl import app, flags, logging

from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Model directory written by train.py (config.json, checkpoints/).")
flags.DEFINE_string("checkpoint", None, "Checkpoint path prefix (e.g. MODEL_DIR/checkpoints/ckpt-1000); "
                    "default: the latest checkpoint of model_dir.")
flags.DEFINE_string("export_dir", None, "Where the SavedModel is written (created).")
flags.DEFINE_bool("no_pasted_masks", False, "Leave out detection_masks_pasted (uint8 [B, D, H, W] at the "
                  "original image size; large for big photos): clients paste the 28x28 masks themselves.")
flags.mark_flags_as_required(["model_dir", "export_dir"])


def run() -> None:
    # Late imports: flag errors and --help stay fast, TensorFlow loads only for real work.
    from maskrcnn_tf import run_dir
    from maskrcnn_tf.export import export_saved_model

    cfg, model = run_dir.restore_model(FLAGS.model_dir, FLAGS.checkpoint)
    checkpoint = FLAGS.checkpoint or run_dir.latest_checkpoint(FLAGS.model_dir)
    start = time.perf_counter()
    export_saved_model(model, cfg, FLAGS.export_dir, include_pasted_masks=not FLAGS.no_pasted_masks)
    print(f"export: {checkpoint} -> {FLAGS.export_dir} ({time.perf_counter() - start:.1f} s); signatures "
          "serving_default (encoded images), image_tensor (uint8 images), metadata", flush=True)


def app_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    # SavedModel writing logs every captured variable at INFO through absl; keep the console readable.
    logging.set_verbosity(logging.WARNING)
    try:
        run()
    except (ValueError, OSError, tf.errors.OpError) as e:
        launch.exit_with_error(e)


def main() -> None:
    """Console script `maskrcnn-export`; also `python export.py` (the root shim)."""
    launch.run(app_main, __name__, configure_allocator=True)


if __name__ == "__main__":
    main()
