"""Import a COCO-trained torchvision or detectron2 Mask R-CNN checkpoint as a model directory.

  python import_weights.py --source=torchvision --checkpoint=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth \
      --model_dir=runs/torchvision_coco
  python import_weights.py --source=detectron2 --checkpoint=model_final_f10217.pkl --model_dir=runs/d2_3x

The model directory (config.json, label_map.json, checkpoints/ckpt-0) is what train.py writes, so
eval.py, export.py, predict.py and `train.py --init_checkpoint` take it unchanged. Neither torch nor
detectron2 is needed: the files are read with an allow-list unpickler that refuses anything but array
builders (maskrcnn_tf/weights/). Faster R-CNN checkpoints give a box-only model. Bad input (unreadable or
unsafe file, another architecture, another class count, buffers such as detectron2's cell anchors or
pixel statistics that contradict the config) ends with a one-line "error: ..." naming the file, the key
and the shapes, exit status 1, and no model directory.

A file name carrying a hash prefix (torchvision's "-bf2d0c1e.pth", detectron2's "model_final_f10217.pkl")
is checked against the file first, as torch.hub does; --no_verify_hash skips that. The summary line says
which BatchNorm epsilon the model runs with and why (a state dict does not record it:
--params_override=model.backbone.norm_epsilon=... sets it) and which buffers were checked.

torchvision's v1 (maskrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn) and v2 (maskrcnn_resnet50_fpn_v2,
fasterrcnn_resnet50_fpn_v2: BatchNorm FPN and heads) files are told apart by their keys and imported with
the matching preset (torchvision_maskrcnn_r50_fpn or torchvision_maskrcnn_r50_fpn_v2); --config forces
one, and a file of the other generation then ends with one line naming the file's builder and the
--config to use.

  python import_weights.py --source=torchvision --checkpoint=maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth \
      --model_dir=runs/torchvision_v2

detectron2's R50-FPN and R101-FPN files (res4 with 6 or 23 blocks) are told apart the same way
(detectron2_r50_fpn_1x or detectron2_r101_fpn_3x); a detectron2 model neither preset builds (ResNeXt, the
LSJ new baselines, GroupNorm, Cascade or keypoint heads) ends with one line naming its stage depths, 3x3
conv groups and head layout.

  python import_weights.py --source=detectron2 --checkpoint=model_final_a3ec72.pkl --model_dir=runs/d2_r101
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.programs import launch

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", None, ["torchvision", "detectron2"], "Who trained the checkpoint.")
flags.DEFINE_string("checkpoint", None, "torchvision .pth, or detectron2 model-zoo .pkl / .pth file.")
flags.DEFINE_string("model_dir", None, "Model directory to create (must not exist).")
flags.DEFINE_multi_string("params_override", [], "Config field of the imported model: dotted.name=JSON value, "
                          "e.g. model.detection.score_threshold=0.3 (repeatable).")
flags.DEFINE_string("config", None, "Preset of the imported model (default: recognised from the checkpoint; "
                    "torchvision: torchvision_maskrcnn_r50_fpn for v1 files, torchvision_maskrcnn_r50_fpn_v2 for "
                    "v2 files; detectron2: detectron2_r50_fpn_1x for R50-FPN files, detectron2_r101_fpn_3x for "
                    "R101-FPN files).")
flags.DEFINE_boolean("no_verify_hash", False, "Skip the check of the hash prefix in the checkpoint's file name "
                     "(torchvision: SHA-256, '-bf2d0c1e.pth'; detectron2 model zoo: MD5, "
                     "'model_final_f10217.pkl').")
flags.mark_flags_as_required(["source", "checkpoint", "model_dir"])


def app_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    # Checkpoint writing logs at INFO through absl; keep the console to this program's lines.
    logging.set_verbosity(logging.WARNING)
    from maskrcnn_tf.weights.importer import import_checkpoint

    try:
        result = import_checkpoint(FLAGS.source, FLAGS.checkpoint, FLAGS.model_dir,
                                   config_lib.parse_overrides(FLAGS.params_override),
                                   verify_hash=not FLAGS.no_verify_hash, preset=FLAGS.config)
    except (ValueError, OSError, tf.errors.OpError) as e:
        launch.exit_with_error(e)
    print(result.summary(FLAGS.checkpoint), flush=True)


def main() -> None:
    """Console script `maskrcnn-import`; also `python import_weights.py` (the root shim)."""
    launch.run(app_main, __name__)


if __name__ == "__main__":
    main()
