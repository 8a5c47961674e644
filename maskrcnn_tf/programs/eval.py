"""COCO evaluation of a training run: prints pycocotools' bbox and segm tables, writes the JSON files.

  python eval.py --model_dir=runs/coco --eval_file_pattern='records/val-*' \
      --val_json=coco/annotations/instances_val2017.json [--checkpoint=runs/coco/checkpoints/ckpt-90000]

The model is built from MODEL_DIR/config.json (written by train.py, label map included) and the given
checkpoint, or the latest one. Results go to MODEL_DIR/eval/ (or --output_dir): detections.json (COCO
results) and metrics.json.

Each pycocotools table is followed by a per-category AP@[.5:.95] table (detectron2's layout, 3 pairs of
columns of (category, AP)); metrics.json has it under "per_category". A category without ground truth in
the evaluated images is printed "n/a (no ground truth)" and written as null.

Records are matched to the val JSON's images by image id AND file name before the model is built. Exports
that renumber images (Roboflow, CVAT, Label Studio; TXT records are numbered by line) need
--match_by=file_name: each record then takes the id of the JSON image of its file name, and detections are
written with the JSON's ids. A val JSON without masks (e.g. the {output_prefix}_annotations.json that
txt_to_tfrecord.py writes) is evaluated on bbox only.

Wrong inputs (no checkpoint, a checkpoint of another configuration, a missing val JSON, records that are
not the val JSON's images, no matching records) end with a one-line "error: ..." on stderr and exit
status 1, before any inference.
"""
import os

from absl import app, flags

from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Model directory written by train.py (config.json, checkpoints/).")
flags.DEFINE_string("checkpoint", None, "Checkpoint path prefix (e.g. MODEL_DIR/checkpoints/ckpt-1000); "
                    "default: the latest checkpoint of model_dir.")
flags.DEFINE_string("eval_file_pattern", None, "Glob of the evaluation TFRecords, e.g. 'records/val-*'.")
flags.DEFINE_string("val_json", None, "COCO instances JSON of those images (instances_val2017.json).")
flags.DEFINE_string("output_dir", None, "Where detections.json and metrics.json go; default MODEL_DIR/eval.")
flags.DEFINE_integer("max_images", None, "Evaluate only the first N records.", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Evaluation batch size (default: data.eval_batch_size of the run).",
                     lower_bound=1)
flags.DEFINE_enum("match_by", "id_and_file_name", ["id_and_file_name", "file_name"],
                  "How records are matched to the val JSON's images: id_and_file_name (both must agree) or "
                  "file_name (records take the JSON's id of their file name: for exports that renumber images).")
flags.mark_flags_as_required(["model_dir", "eval_file_pattern", "val_json"])


def run() -> None:
    # Late imports: flag errors and --help stay fast, TensorFlow loads only for real work.
    from maskrcnn_tf import config as config_lib
    from maskrcnn_tf import run_dir
    from maskrcnn_tf.evaluation.run import check_inputs, evaluate_model

    # Cheap checks first: the val json and the records (ids and file names), before building a model.
    import tensorflow as tf

    if not tf.io.gfile.exists(FLAGS.val_json) or tf.io.gfile.isdir(FLAGS.val_json):  # gfile: may be gs://...
        raise ValueError(f"val json {FLAGS.val_json!r} not found")
    inputs = check_inputs(FLAGS.eval_file_pattern, FLAGS.val_json, FLAGS.match_by)
    cfg, model = run_dir.restore_model(FLAGS.model_dir, FLAGS.checkpoint)
    if FLAGS.batch_size:
        cfg = config_lib.replace(cfg, **{"data.eval_batch_size": FLAGS.batch_size})
    checkpoint = FLAGS.checkpoint or run_dir.latest_checkpoint(FLAGS.model_dir)
    print(f"eval: model {FLAGS.model_dir}, checkpoint {checkpoint}", flush=True)
    output_dir = FLAGS.output_dir or os.path.join(FLAGS.model_dir, run_dir.EVAL_DIR)
    evaluate_model(model, cfg, FLAGS.eval_file_pattern, FLAGS.val_json, output_dir=output_dir,
                   max_images=FLAGS.max_images, match_by=FLAGS.match_by, inputs=inputs)


def app_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    try:
        run()
    except (ValueError, OSError, tf.errors.OpError) as e:  # OpError: a record the pipeline cannot decode
        launch.exit_with_error(e)


def main() -> None:
    """Console script `maskrcnn-eval`; also `python eval.py` (the root shim)."""
    launch.run(app_main, __name__, configure_allocator=True)


if __name__ == "__main__":
    main()
