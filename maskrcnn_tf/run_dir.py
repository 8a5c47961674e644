"""The model directory written by train.py and read by eval.py, export.py and predict.py.

    MODEL_DIR/
      config.json          the resolved Config (config.to_dict); the label map lives in it
                           (data.category_ids, data.class_names), so nothing else is needed to use the run
      label_map.json       copy of the converter's label map, for people and other tools
      checkpoints/ckpt-N   tf.train.Checkpoint(model=..., optimizer=..., epoch=...), N = global step
      loss.log             one line per logging interval, the MindSpore original's format
      logs/                TensorBoard event files
      eval/                detections JSON and metrics JSON of eval.py

Checkpoints key every variable by its Keras path ("mask_rcnn/box_head/fc1/kernel", "conv1_conv/kernel",
optimizer slots likewise), because tf.train.Checkpoint(model=model) still (Keras 3.15) skips layers
held in Python lists (FPN's convs, BoxHead's fcs): tests/test_checkpoints.py shows it and fails once
Keras tracks them. Paths are stable because every layer of build_model has a fixed name. The same keys
(`checkpoint_key`) let --init_checkpoint restore exactly the variables whose shapes match. Keras'
`.weights.h5` / `.keras` formats do see list-held layers (`model.save` works, see model.py) but hold no
training state, so run directories keep this format (docs/design.md section 9).
"""

import json
import os

import tensorflow as tf

from maskrcnn_tf import config as config_lib

CONFIG_FILE = "config.json"
LABEL_MAP_FILE = "label_map.json"
CHECKPOINT_DIR = "checkpoints"
LOSS_LOG = "loss.log"
TENSORBOARD_DIR = "logs"
EVAL_DIR = "eval"


def load_config(model_dir: str) -> config_lib.Config:
    """The config train.py wrote into model_dir; ValueError naming the file when absent or broken."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):  # gfile: model_dir may be gs://...
        raise ValueError(f"{path}: not found; is {model_dir!r} a model directory written by train.py?")
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            return config_lib.from_dict(json.loads(f.read()))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a maskrcnn_tf config ({e})") from e


def write_text(path: str, text: str) -> None:
    """Writes a whole text file through tf.io.gfile (path may be gs://...): into a temporary file, then
    renamed over `path`, so a reader never sees half a file (and TensorFlow's ram:// filesystem, which
    overwrites in place, keeps no stale tail of a longer old version)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def variables_by_path(obj) -> dict:
    """{variable.path: variable} of a Keras model or optimizer; ValueError on a duplicate path."""
    variables = {}
    for v in obj.variables:
        if v.path in variables:
            raise ValueError(f"two variables share the path {v.path!r}; give their layers distinct names")
        variables[v.path] = v
    return variables


def checkpoint_key(variable_path: str) -> str:
    """Key of a model variable in a make_checkpoint checkpoint (as tf.train.list_variables shows)."""
    # tf.train.Checkpoint escapes "." as ".." and "/" as ".S" in the names of its children.
    escaped = variable_path.replace(".", "..").replace("/", ".S")
    return f"model/{escaped}/.ATTRIBUTES/VARIABLE_VALUE"


def make_checkpoint(model, optimizer=None, **extra) -> tf.train.Checkpoint:
    """A tf.train.Checkpoint over the model's (and optimizer's) variables keyed by path, plus `extra`
    trackables (e.g. an epoch counter)."""
    parts = {"model": variables_by_path(model), **extra}
    if optimizer is not None:
        parts["optimizer"] = variables_by_path(optimizer)
    return tf.train.Checkpoint(**parts)


def latest_checkpoint(model_dir: str):
    """Path prefix of the newest checkpoint in model_dir/checkpoints, or None."""
    return tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_DIR))


def restore_weights(model, checkpoint_path: str) -> None:
    """Loads the model's weights from a training checkpoint (optimizer state ignored).

    Raises ValueError naming the checkpoint when it is missing or was written by a model of another
    configuration (a variable of different shape, or model variables the checkpoint lacks).
    """
    if not checkpoint_path or not tf.io.gfile.exists(checkpoint_path + ".index"):
        raise ValueError(f"checkpoint {checkpoint_path!r} not found")
    try:
        status = make_checkpoint(model).restore(checkpoint_path)
        status.expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        raise ValueError(f"checkpoint {checkpoint_path} does not fit this model's configuration: {e}") from e


def restore_model(model_dir: str, checkpoint_path: str = None):
    """(config, model) of a training run: builds the model of model_dir/config.json and restores the given
    checkpoint, or the latest one. ValueError with a clear message when there is none."""
    from maskrcnn_tf.model import build_model  # late import: building pulls in all of TF/Keras

    cfg = load_config(model_dir)
    checkpoint_path = checkpoint_path or latest_checkpoint(model_dir)
    if checkpoint_path is None:
        raise ValueError(f"{os.path.join(model_dir, CHECKPOINT_DIR)}: no checkpoint yet")
    model = build_model(cfg)  # reads no file: the checkpoint gives every weight
    restore_weights(model, checkpoint_path)
    return cfg, model
