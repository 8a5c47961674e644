"""Trains Mask R-CNN; with no flags at all (or --demo), runs the built-in shapes demo end to end.

  python train.py                                     # demo: data, training, COCO eval, export, pictures
  python train.py --demo --model_dir=my_demo          # the same demo into another directory
  python train.py --train_file_pattern='records/train-*' --model_dir=runs/r50 --strategy=mirrored \
      --eval_file_pattern='records/val-*' --val_json=coco/annotations/instances_val2017.json

Re-running the same command resumes from the latest checkpoint in --model_dir (also after kill -9).
SIGINT (Ctrl-C) or SIGTERM (preemption) during training saves a checkpoint after the step in flight and
exits with status 128 + signal number; a second one exits at once.
Settings: --config (preset) plus the override flags below, and --params_override=field=value (dotted
config field names, JSON values, repeatable) for anything else; the resolved config is written to
MODEL_DIR/config.json and read back by eval.py, export.py and predict.py.
Environment: TF_CONFIG for --strategy=multi_worker_mirrored; MASKRCNN_TF_CPU_DEVICES=N splits the CPU
into N logical devices (so --strategy=mirrored can be tried on a machine without GPUs).
MASKRCNN_TF_HOST_ALLOCATOR=auto|on|off: freed host memory kept for reuse (maskrcnn_tf/host_allocator.py;
all programs; auto = on CPU-only hosts).

Errors in flags, data or model dir end the program with a one-line `error: ...` message (status 1).
"""
import glob
import logging as pylogging
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags
from absl import logging as absl_logging

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets
from maskrcnn_tf import distribute, host_allocator, stop_signals
from maskrcnn_tf.data.sharded_writer import LABEL_MAP_SUFFIX
from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("train_file_pattern", None, "Glob of training TFRecords (data_prep converters). "
                    "Required, except for the demo (no flags at all, or --demo).")
flags.DEFINE_boolean("demo", False, "Run the built-in shapes demo (also what a command line without any "
                     "flag does); --model_dir and --config may be given, no dataset flag.")
flags.DEFINE_string("model_dir", None, "Run directory: config, checkpoints, loss.log, TensorBoard logs. "
                    "Required for training; the demo defaults to ./maskrcnn_demo.")
flags.DEFINE_string("config", None, f"Preset: {' | '.join(presets.PRESETS)} (default coco_r50_fpn_1x; "
                    "the demo uses tiny).")
flags.DEFINE_integer("batch_size", None, "Global batch size (all replicas).", lower_bound=1)
flags.DEFINE_float("num_epochs", None, "Training length in passes over the training records.", lower_bound=0)
flags.DEFINE_integer("train_steps", None, "Training length in global steps.", lower_bound=1)
flags.DEFINE_float("learning_rate", None, "Peak learning rate at the global batch (default: the preset's "
                   "reference rate scaled linearly to the batch).", lower_bound=0)
flags.DEFINE_string("image_size", None, "Model input HxW, each a multiple of 64, e.g. 512x512.")
flags.DEFINE_integer("num_classes", None, "Foreground classes (default: from the label map).", lower_bound=1)
flags.DEFINE_string("label_map", None, "Label map JSON (default: {output_prefix}_label_map.json next to "
                    "the training records).")
flags.DEFINE_enum("strategy", "one_device", list(distribute.STRATEGIES), "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU name or grpc:// address for --strategy=tpu (empty = local TPU VM).")
flags.DEFINE_string("pretrained", None, "Backbone weights: none | imagenet | PATH (default: the preset's). PATH: "
                    "a Keras .h5, torchvision's ImageNet resnet50-*.pth or detectron2's MSRA R-50.pkl / R-101.pkl "
                    "(a preset stride or BN eps unlike the file's is named in one line; pixel mean/std must be the "
                    "file's too: weights/imagenet_backbones.py).")
flags.DEFINE_string("init_checkpoint", None, "Fine-tune from another run's checkpoint (ckpt prefix, "
                    "checkpoints dir or model dir): variables of equal shape are restored, the others "
                    "(class-specific layers) keep their fresh initialisation. The model settings come from "
                    "that run's config.json (the preset gives the training recipe); no ImageNet weights are "
                    "loaded unless --pretrained says so.")
flags.DEFINE_boolean("force_conventions", False, "With --init_checkpoint: allow overrides of the settings the "
                     "restored weights were trained under (backbone, stride placement, BN epsilon, pixel "
                     "statistics, anchors, RoIAlign alignment), which otherwise stop the run.")
flags.DEFINE_enum("precision", None, list(config_lib.PRECISIONS), "Compute precision (default: the preset's).")
flags.DEFINE_boolean("jit_compile", None, "XLA-compile the train step (needs the gather RoIAlign backend: "
                     "--params_override=model.roi.roi_align_backend=gather).")
flags.DEFINE_integer("steps_per_loop", None, "Train steps per call of the compiled train function (fewer host "
                     "round trips, e.g. on TPUs); logging, checkpoint and total steps must be multiples of it.",
                     lower_bound=1)
flags.DEFINE_integer("inter_op_threads", distribute.AUTO_INTER_OP_THREADS,
                     "TF inter-op threads: -1 = 1 on a host whose only device is one CPU (less memory), else "
                     "TF's default; 0 = TF's default; n = n.", lower_bound=distribute.AUTO_INTER_OP_THREADS)
flags.DEFINE_string("eval_file_pattern", None, "Glob of evaluation TFRecords.")
flags.DEFINE_string("val_json", None, "COCO instances JSON of the evaluation images.")
flags.DEFINE_integer("eval_every_epochs", None, "COCO evaluation every N epochs (and at the end) when "
                     "--eval_file_pattern and --val_json are given; 0 = only at the end. Default 1, and 0 with "
                     "--strategy=tpu (evaluation runs on the TPU VM's host CPU).", lower_bound=0)
flags.DEFINE_integer("seed", None, "Reproducible run: fixes the RPN anchor and RoI sampling (train.seed, "
                     "stateless draws keyed by seed and step), the data order and augmentation (data.seed, "
                     "unless given) and the weight initialisation.")
flags.DEFINE_multi_string("params_override", [], "Any config field: dotted.name=JSON value, e.g. "
                          "train.checkpoint_every_steps=500 (repeatable; applied after the flags above).")

DEMO_MODEL_DIR = "maskrcnn_demo"
DEFAULT_PRESET = "coco_r50_fpn_1x"
DEMO_PRESET = "tiny"
_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}\.tfrecord$")

# Built-in demo: synthetic shapes, the tiny preset shortened to fit 10 minutes of a 2-core CPU.
DEMO_NUM_TRAIN = 1200
DEMO_NUM_VAL = 100
DEMO_IMAGE_SIZE = 128  # generated images and model input (shapes are 13-45 px)
DEMO_SEED = 0
DEMO_NUM_SHARDS = 2
DEMO_PREDICTION_IMAGES = 4
# TF's default inter-op pool (one thread per core) instead of the single thread a CPU-only host gets:
# the demo's ops are small and leave cores idle when run one at a time, and its memory is small
# (figures: benchmarks/README.md, "The demo").
DEMO_INTER_OP_THREADS = 0
DEMO_OVERRIDES = {
    "model.image_size": (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE),
    "model.anchors.sizes": (8, 16, 32, 64, 128),  # halved with the image size
    # Narrower FPN/RPN and heads, fewer proposals: a fraction of the tiny preset's CPU per step at
    # 128x128 (benchmarks/README.md), which is what fits 10 minutes.
    # 2000 steps, not fewer: at 1500 the held-out mask AP ranged 0.47-0.58 over seeds, at 2000 it cleared
    # 0.6 (benchmarks/README.md, "The demo").
    "model.fpn_num_filters": 32,
    "model.rpn_num_filters": 32,
    "model.heads.fc_dim": 128,
    "model.heads.mask_num_filters": 32,
    "model.roi.num_samples": 64,
    "model.roi.max_mask_rois": 16,
    "model.rpn.pre_nms_top_k_train": 128,
    "model.rpn.post_nms_top_k_train": 64,
    "model.rpn.pre_nms_top_k_test": 128,
    "model.rpn.post_nms_top_k_test": 64,
    "data.train_batch_size": 4,
    "train.total_steps": 2000,
    "train.base_learning_rate": 0.16,  # at reference batch 16: peak 0.04 at batch 4
    "train.schedule": "cosine",
    "train.warmup_steps": 100,
    "train.checkpoint_every_steps": 500,
    "train.log_every_steps": 50,
}


# ------------------------------------------------------------------------------------------ config


def parse_image_size(text: str):
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--image_size={text!r}: expected HxW, e.g. 512x512")
    return int(match.group(1)), int(match.group(2))


def find_label_map(file_pattern: str):
    """{output_prefix}_label_map.json of the converter that wrote the files matching file_pattern
    (tf.io.gfile: the records may be in gs://...)."""
    import tensorflow as tf

    for path in sorted(tf.io.gfile.glob(file_pattern)):
        prefix = _SHARD_SUFFIX.sub("", path)
        if prefix != path and tf.io.gfile.exists(prefix + LABEL_MAP_SUFFIX):
            return prefix + LABEL_MAP_SUFFIX
    return None


# Settings restored weights were trained under: changing one makes them meaningless (features of another
# normalisation, deltas of other anchors), so a fine-tuning run keeps the init run's unless forced.
WEIGHT_CONVENTION_FIELDS = (
    "model.backbone.name", "model.backbone.stride_in_3x3", "model.backbone.norm_epsilon", "model.pixel_mean",
    "model.pixel_std", "model.anchors.sizes", "model.anchors.aspect_ratios", "model.anchors.offset",
    "model.anchors.round_base_anchors", "model.roi.aligned")


def init_run_config(init_checkpoint: str):
    """(run directory, Config) of the run that wrote --init_checkpoint, or None when the checkpoint has
    no config.json beside it (ckpt prefix RUN/checkpoints/ckpt-N, checkpoints dir or RUN itself)."""
    import tensorflow as tf

    from maskrcnn_tf import checkpointing, run_dir

    run = os.path.dirname(os.path.dirname(checkpointing.resolve_checkpoint(init_checkpoint)))
    if not tf.io.gfile.exists(os.path.join(run, run_dir.CONFIG_FILE)):
        return None
    return run, run_dir.load_config(run)


def fine_tune_config(preset_cfg, init_cfg, overrides: dict, init_dir: str, force: bool):
    """preset_cfg with the model settings of the init run and the backbone's initial weights off (the
    caller applies `overrides` after it); prints where the model differs from the preset. ValueError
    when `overrides` change a WEIGHT_CONVENTION_FIELDS setting of the init run, unless `force`."""
    import dataclasses

    cfg = config_lib.replace(dataclasses.replace(preset_cfg, model=init_cfg.model), **{"model.backbone.weights": None})
    wanted = config_lib.replace(cfg, **overrides)
    conflicts = [change for change in config_lib.differences(init_cfg, wanted)
                 if change.split(":")[0] in WEIGHT_CONVENTION_FIELDS]
    if conflicts and not force:
        raise ValueError(f"--init_checkpoint: the weights of {init_dir} were trained with other settings than "
                         f"asked ({'; '.join(conflicts)}), which makes them meaningless; drop those overrides, "
                         "or give --force_conventions")
    model_changes = [c for c in config_lib.differences(preset_cfg, cfg, ignore=config_lib.DATASET_FIELDS)
                     if c.startswith("model.")]
    print(f"init_checkpoint: model settings from {init_dir}/config.json"
          + (f" ({len(model_changes)} differ from the preset: {'; '.join(model_changes)})" if model_changes else ""),
          flush=True)
    for conflict in conflicts:
        print(f"init_checkpoint: forced {conflict}", flush=True)
    return cfg


def resolve_config(preset: str, train_file_pattern: str, label_map_path=None, extra_overrides=None):
    """(config, label map path, steps per epoch) from the flags; ValueError on bad combinations."""
    import tensorflow as tf

    from maskrcnn_tf import training
    from maskrcnn_tf.data import pipeline

    cfg = config_lib.get_preset(preset)
    overrides = dict(extra_overrides or {})
    if FLAGS.batch_size is not None:
        overrides["data.train_batch_size"] = FLAGS.batch_size
    if FLAGS.image_size is not None:
        overrides["model.image_size"] = parse_image_size(FLAGS.image_size)
    if FLAGS.pretrained is not None:
        overrides["model.backbone.weights"] = None if FLAGS.pretrained.lower() == "none" else FLAGS.pretrained
    if FLAGS.precision is not None:
        overrides["train.precision"] = FLAGS.precision
    if FLAGS.jit_compile is not None:
        overrides["train.jit_compile"] = FLAGS.jit_compile
    if FLAGS.steps_per_loop is not None:
        overrides["train.steps_per_loop"] = FLAGS.steps_per_loop
    if FLAGS.seed is not None:
        overrides["train.seed"] = FLAGS.seed
        overrides["data.seed"] = FLAGS.seed  # a params_override of data.seed below still wins
    explicit = config_lib.parse_overrides(FLAGS.params_override)
    if FLAGS.strategy == "tpu":  # CropAndResize has no XLA kernel: the gather backend, or a clear refusal
        if explicit.get("model.roi.roi_align_backend", "gather") != "gather":
            raise ValueError("--strategy=tpu cannot run model.roi.roi_align_backend="
                             f"{explicit['model.roi.roi_align_backend']} (no XLA kernel); leave it out to get gather")
        overrides["model.roi.roi_align_backend"] = "gather"
    overrides.update(explicit)
    init_run = init_run_config(FLAGS.init_checkpoint) if FLAGS.init_checkpoint else None
    if init_run:
        cfg = fine_tune_config(cfg, init_run[1], overrides, init_run[0], FLAGS.force_conventions)
    elif FLAGS.init_checkpoint and FLAGS.pretrained is None:
        overrides["model.backbone.weights"] = None  # the checkpoint overwrites the backbone
    cfg = config_lib.replace(cfg, **overrides)
    if FLAGS.learning_rate is not None:  # the peak rate at this run's batch: reference batch = batch
        cfg = config_lib.replace(cfg, **{"train.base_learning_rate": FLAGS.learning_rate,
                                         "train.reference_batch_size": cfg.data.train_batch_size})

    # Zero matching files or zero records: say so before the label map search (which would fail too, less
    # clearly), and never start a pipeline that waits forever for its first record.
    num_records = pipeline.count_training_records(train_file_pattern)
    label_map_path = label_map_path or FLAGS.label_map or find_label_map(train_file_pattern)
    if label_map_path:
        if not tf.io.gfile.exists(label_map_path):
            raise ValueError(f"--label_map={label_map_path}: file not found")
        cfg = training.apply_label_map(cfg, label_map_path)
        if FLAGS.num_classes is not None and FLAGS.num_classes != cfg.model.num_classes:
            raise ValueError(f"--num_classes={FLAGS.num_classes} but the label map {label_map_path} has "
                             f"{cfg.model.num_classes} classes")
    elif FLAGS.num_classes is not None:
        cfg = config_lib.replace(cfg, **{"model.num_classes": FLAGS.num_classes, "data.category_ids": (),
                                         "data.class_names": ()})
    else:
        raise ValueError(f"no label map found next to {train_file_pattern!r}; give --label_map or --num_classes")

    steps_per_epoch = training.steps_per_epoch(num_records, cfg.data.train_batch_size)
    if FLAGS.num_epochs is not None and FLAGS.train_steps is not None:
        raise ValueError("give --num_epochs or --train_steps, not both")
    if FLAGS.num_epochs is not None:
        cfg = config_lib.replace(cfg, **{"train.total_steps": max(1, round(FLAGS.num_epochs * steps_per_epoch))})
    elif FLAGS.train_steps is not None:
        cfg = config_lib.replace(cfg, **{"train.total_steps": FLAGS.train_steps})
    weights = cfg.model.backbone.weights
    if weights and weights != "imagenet":  # an ImageNet backbone file: its conventions, pixels included
        from maskrcnn_tf.weights import imagenet_backbones

        imagenet_backbones.check_model_config(weights, cfg.model)
    if cfg.data.copy_paste_probability > 0:  # pastes objects by their masks: box-only data has none
        if not cfg.model.include_mask:
            raise ValueError(f"data.copy_paste_probability={cfg.data.copy_paste_probability} needs masks, but "
                             "model.include_mask is False; set data.copy_paste_probability=0")
        if not pipeline.records_have_masks(train_file_pattern):
            raise ValueError(f"data.copy_paste_probability={cfg.data.copy_paste_probability} needs masks, but the "
                             f"records {train_file_pattern!r} have none (boxes only, e.g. the TXT converter's); "
                             "set data.copy_paste_probability=0")
    return config_lib.validate(cfg), label_map_path, steps_per_epoch


# -------------------------------------------------------------------------------------------- runs


def run_training(train_file_pattern, model_dir, preset, label_map_path=None, extra_overrides=None,
                 eval_file_pattern=None, val_json=None):
    import tensorflow as tf

    from maskrcnn_tf import training
    from maskrcnn_tf.data import pipeline

    cfg, label_map_path, steps_per_epoch = resolve_config(preset, train_file_pattern, label_map_path,
                                                          extra_overrides)
    # A preset is a recipe (e.g. detectron2's): say where this run leaves it, so a changed setting is a choice.
    changed = config_lib.differences(config_lib.get_preset(preset), cfg, ignore=config_lib.DATASET_FIELDS)
    if changed:
        print(f"config: {len(changed)} setting(s) differ from preset {preset}: {'; '.join(changed)}", flush=True)
    if cfg.train.seed is not None:
        import keras

        keras.utils.set_random_seed(cfg.train.seed)  # weight initialisation (Keras initialisers, NumPy)
    if val_json and not tf.io.gfile.exists(val_json):  # gfile: may be gs://...
        raise ValueError(f"--val_json={val_json}: file not found")
    if (eval_file_pattern is None) != (val_json is None):
        raise ValueError("evaluation during training needs both --eval_file_pattern and --val_json")
    # The strategy first: multi-worker collectives must be configured before any TensorFlow op runs.
    strategy = distribute.get_strategy(FLAGS.strategy, FLAGS.tpu)
    if eval_file_pattern:  # records and JSON must be the same images: say so now, not after an epoch
        from maskrcnn_tf.evaluation.run import check_inputs

        check_inputs(eval_file_pattern, val_json)
    if cfg.model.include_mask and not pipeline.records_have_masks(train_file_pattern):
        print("data: the records have no masks (boxes only, e.g. the TXT converter's): their mask loss is "
              "skipped, so the mask head stays untrained; --params_override=model.include_mask=false trains "
              "a box-only model", flush=True)
    eval_every_epochs = FLAGS.eval_every_epochs
    if eval_every_epochs is None:
        eval_every_epochs = 0 if FLAGS.strategy == "tpu" else 1
        if FLAGS.strategy == "tpu" and eval_file_pattern:
            # Evaluation runs outside the strategy: on a TPU VM, the host CPU runs the model per image.
            print("evaluation: only at the end of the run under --strategy=tpu (it runs on the host CPU, at "
                  "CPU inference speed per image); --eval_every_epochs=N evaluates more often", flush=True)
    # eval_every_epochs=0 still evaluates once at the end: give the monitor a period beyond the run.
    eval_every = eval_every_epochs or (cfg.train.total_steps // steps_per_epoch + 1)
    return training.train(cfg, model_dir, train_file_pattern, strategy, label_map_path=label_map_path,
                          init_checkpoint=FLAGS.init_checkpoint, eval_file_pattern=eval_file_pattern,
                          val_json=val_json, eval_every_epochs=eval_every if eval_file_pattern else 0,
                          num_steps_per_epoch=steps_per_epoch, stop_signals=stop_signals.GRACEFUL_SIGNALS)


def run_demo():
    """Shapes data -> records -> tiny model -> COCO eval -> SavedModel -> pictures, all under model_dir."""
    from maskrcnn_tf.data.coco_converter import convert_coco
    from maskrcnn_tf.data.shapes import make_shapes_dataset

    start = time.monotonic()
    model_dir = os.path.abspath(FLAGS.model_dir or DEMO_MODEL_DIR)
    print(f"demo: everything goes to {model_dir}", flush=True)
    data_dir = os.path.join(model_dir, "data")
    records = os.path.join(data_dir, "records")
    train_prefix, val_prefix = os.path.join(records, "train"), os.path.join(records, "val")
    shapes_dir = os.path.join(data_dir, "shapes")
    paths = {"train_images": os.path.join(shapes_dir, "train"), "val_images": os.path.join(shapes_dir, "val"),
             "train_annotations": os.path.join(shapes_dir, "annotations", "instances_train.json"),
             "val_annotations": os.path.join(shapes_dir, "annotations", "instances_val.json")}
    if not os.path.exists(val_prefix + LABEL_MAP_SUFFIX):  # a re-run reuses the data (and resumes)
        paths = make_shapes_dataset(shapes_dir, DEMO_NUM_TRAIN, DEMO_NUM_VAL, DEMO_IMAGE_SIZE, DEMO_SEED)
        print(f"demo: shapes images in {shapes_dir} ({DEMO_NUM_TRAIN} train, {DEMO_NUM_VAL} val)", flush=True)
        os.makedirs(records, exist_ok=True)
        for split, prefix in (("train", train_prefix), ("val", val_prefix)):
            convert_coco(paths[f"{split}_images"], paths[f"{split}_annotations"], prefix, DEMO_NUM_SHARDS,
                         progress=False)
        print(f"demo: TFRecords in {records}", flush=True)
    train_pattern = train_prefix + "-*.tfrecord"
    val_pattern = val_prefix + "-*.tfrecord"
    result = run_training(train_pattern, model_dir, FLAGS.config or DEMO_PRESET, extra_overrides=DEMO_OVERRIDES)
    model = result["model"]
    print(f"demo: trained to step {result['global_step']} in {time.monotonic() - start:.0f} s; checkpoints "
          f"in {os.path.join(model_dir, 'checkpoints')}, losses in {os.path.join(model_dir, 'loss.log')}, "
          f"TensorBoard: tensorboard --logdir={os.path.join(model_dir, 'logs')}", flush=True)

    from maskrcnn_tf import run_dir
    from maskrcnn_tf.evaluation.run import evaluate_model

    cfg = run_dir.load_config(model_dir)
    eval_dir = os.path.join(model_dir, run_dir.EVAL_DIR)
    metrics = evaluate_model(model, cfg, val_pattern, paths["val_annotations"], output_dir=eval_dir)
    print(f"demo: held-out shapes ({DEMO_NUM_VAL} images): box AP@[.5:.95] {metrics['bbox/AP']:.3f}, "
          f"mask AP@[.5:.95] {metrics.get('segm/AP', float('nan')):.3f}; detections and metrics in {eval_dir}",
          flush=True)

    from maskrcnn_tf.export import export_saved_model
    from maskrcnn_tf.predictor import Predictor, predict_files

    export_dir = export_saved_model(model, cfg, os.path.join(model_dir, "export"))
    print(f"demo: SavedModel in {export_dir}", flush=True)
    images = sorted(glob.glob(os.path.join(paths["val_images"], "*")))[:DEMO_PREDICTION_IMAGES]
    written, _ = predict_files(Predictor.from_saved_model(export_dir), images, os.path.join(model_dir, "predictions"),
                               cfg.data.class_names)
    print(f"demo: predictions drawn on {len(images)} val images: {', '.join(p for p in written if p.endswith('.png'))}",
          flush=True)
    print(f"demo: done in {time.monotonic() - start:.0f} s", flush=True)
    return metrics


def app_main(argv):
    # TF's own INFO lines (e.g. one per checkpoint save) would drown the progress lines. Some go through
    # Python's "tensorflow" logger, others (checkpoint sharding's "Sharding callback duration") through
    # absl, whose verbosity app.run sets to INFO; --verbosity=0 brings them back.
    pylogging.getLogger("tensorflow").setLevel(pylogging.WARNING)
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
    demo = FLAGS.demo or len(sys.argv) == 1
    inter_op_threads = FLAGS.inter_op_threads
    if demo and not FLAGS["inter_op_threads"].present:
        inter_op_threads = DEMO_INTER_OP_THREADS
    distribute.configure_host_threads(inter_op_threads, FLAGS.strategy)  # before anything starts TF's runtime
    from maskrcnn_tf import training

    dataset_flags = ("train_file_pattern", "eval_file_pattern", "val_json", "label_map")
    try:
        # Only an explicit --demo or a bare command line runs the demo: an empty --train_file_pattern= (an
        # unset shell variable) must not quietly train the demo into the user's --model_dir.
        if demo:
            given = [f"--{name}" for name in dataset_flags if FLAGS[name].present]
            if given:
                raise ValueError(f"--demo makes its own data; drop {', '.join(given)}")
            _check_model_dir(FLAGS.model_dir or DEMO_MODEL_DIR)
            run_demo()
            return
        if not FLAGS.train_file_pattern:
            raise ValueError(("--train_file_pattern is empty" if FLAGS["train_file_pattern"].present else
                              "--train_file_pattern is required") +
                             " (the built-in demo runs with no flags at all, or with --demo)")
        if not FLAGS.model_dir:
            raise ValueError("--model_dir is required")
        _check_model_dir(FLAGS.model_dir)
        result = run_training(FLAGS.train_file_pattern, FLAGS.model_dir, FLAGS.config or DEFAULT_PRESET,
                              eval_file_pattern=FLAGS.eval_file_pattern, val_json=FLAGS.val_json)
        print(f"done: global step {result['global_step']}, model dir {os.path.abspath(FLAGS.model_dir)}", flush=True)
    except training.NonFiniteLossError as e:
        launch.exit_now(f"error: {e}", 1)
    except training.TrainingInterrupted as e:
        launch.exit_now(f"stopped: {e}", 128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (data preparation, building, evaluation)
        launch.exit_now("interrupted; run the same command again to resume from the latest checkpoint", 130)
    except (ValueError, OSError) as e:  # OSError: unwritable --model_dir, a full disk, a vanished file
        sys.exit(f"error: {e}")


def _check_model_dir(model_dir: str) -> None:
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ValueError(f"--model_dir={model_dir}: exists and is not a directory")


def _configure_before_tf():
    """Device setup that must precede TensorFlow's device initialisation (MASKRCNN_TF_CPU_DEVICES)."""
    try:
        distribute.configure_cpu_devices_from_env()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


def main() -> None:
    """Console script `maskrcnn-train`; also `python train.py` (the root shim)."""
    host_allocator.configure()  # keep freed memory for reuse; before TF allocates (host_allocator.py)
    _configure_before_tf()
    launch.run(app_main, __name__)


if __name__ == "__main__":
    main()
