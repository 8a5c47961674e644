"""`maskrcnn_tf.load(path)`: a ready Predictor from whatever a user has on disk.

    path                                      opened as
    a directory with config.json              a run directory (train.py, import_weights.py): the model of
                                              its config.json with the latest checkpoint (or `checkpoint`)
    a directory with saved_model.pb           a SavedModel written by export.py (no Keras needed)
    a file ending in .keras                   a `model.save("m.keras")` of a build_model model

The returned predictor.Predictor takes image paths, encoded bytes or uint8 RGB arrays, one or many, and
returns boxes in original pixels, scores, category ids and names and full-size masks.
"""

import os
from typing import Optional

import tensorflow as tf

from maskrcnn_tf import run_dir
from maskrcnn_tf.predictor import Predictor

KERAS_SUFFIX = ".keras"


def load(path, checkpoint: Optional[str] = None) -> Predictor:
    """Predictor of a run directory, a SavedModel directory or a .keras file (module docstring).

    checkpoint: run directories only, a checkpoint prefix (default: the newest).
    Raises ValueError naming the path and what it should be.
    """
    path = os.fspath(path)
    if tf.io.gfile.isdir(path):
        if tf.io.gfile.exists(os.path.join(path, run_dir.CONFIG_FILE)):
            return Predictor.from_model_dir(path, checkpoint)
        if tf.saved_model.contains_saved_model(path):
            if checkpoint is not None:
                raise ValueError(f"load: {path} is a SavedModel; checkpoint= applies to run directories only")
            return Predictor.from_saved_model(path)
        raise ValueError(f"load: {path}: neither a run directory (no {run_dir.CONFIG_FILE}) nor a SavedModel "
                         "(no saved_model.pb)")
    if path.endswith(KERAS_SUFFIX) and tf.io.gfile.exists(path):
        return _load_keras_file(path)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"load: {path}: not found")
    raise ValueError(f"load: {path}: expected a run directory, a SavedModel directory or a {KERAS_SUFFIX} file")


def _load_keras_file(path: str) -> Predictor:
    import keras  # late import: SavedModels and run directories need only what they use

    from maskrcnn_tf.model import MaskRCNN

    model = keras.saving.load_model(path)
    if not isinstance(model, MaskRCNN):
        raise ValueError(f"load: {path}: holds a {type(model).__name__}, not a maskrcnn_tf MaskRCNN")
    return Predictor.from_keras_model(model, model.config)
