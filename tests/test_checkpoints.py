"""Why run directories key checkpoint variables by Keras path (run_dir.py), and that they work.

The first test pins the failure the workaround exists for: tf.train.Checkpoint(model=model) leaves out
the variables of layers held in Python lists. When a Keras release tracks them, it fails: then
run_dir.make_checkpoint can become tf.train.Checkpoint(model=model), with a loader for old run dirs.
"""
import os

import numpy as np
import tensorflow as tf

from maskrcnn_tf import run_dir
from maskrcnn_tf.model import build_model
from tests.e2e.synthetic import tiny_test_config

# Layers build_model keeps in Python lists: FPN's lateral/output convs, BoxHead's hidden fcs,
# MaskHead's convs.
LIST_HELD = ("/fpn/lateral_P", "/fpn/output_P", "/box_head/fc")


def _saved_paths(checkpoint_path, model):
    """Paths of the model variables whose value is in the checkpoint file."""
    reader = tf.train.load_checkpoint(checkpoint_path)
    saved = {reader.get_tensor(name).tobytes() for name, _ in tf.train.list_variables(checkpoint_path)
             if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    return {v.path for v in model.weights if v.numpy().tobytes() in saved}


def test_plain_tf_checkpoint_misses_list_held_layers(tmp_path):
    model = build_model(tiny_test_config())
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "plain"))
    missing = {v.path for v in model.weights} - _saved_paths(path, model)
    assert any(marker in p for p in missing for marker in LIST_HELD), (
        "tf.train.Checkpoint now saves list-held layers: run_dir's path-keyed workaround can go")
    assert all(any(marker in p for marker in LIST_HELD + ("/mask_head/",)) for p in missing), missing


def test_run_dir_checkpoint_saves_and_restores_every_variable(tmp_path):
    cfg = tiny_test_config()
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    for v in model.weights:  # distinct values, so a variable left at its initial value shows
        v.assign(rng.normal(size=v.shape).astype(v.dtype))
    path = run_dir.make_checkpoint(model).save(str(tmp_path / "ckpt"))
    names = {name for name, _ in tf.train.list_variables(path)}
    assert {run_dir.checkpoint_key(v.path) for v in model.weights} <= names
    restored = build_model(cfg)
    run_dir.restore_weights(restored, path)
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_keras_weights_file_sees_list_held_layers(tmp_path):
    cfg = tiny_test_config()
    model = build_model(cfg)
    rng = np.random.default_rng(1)
    for v in model.weights:
        v.assign(rng.normal(size=v.shape).astype(v.dtype))
    model.save_weights(os.path.join(tmp_path, "m.weights.h5"))
    restored = build_model(cfg)
    restored.load_weights(os.path.join(tmp_path, "m.weights.h5"))
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
