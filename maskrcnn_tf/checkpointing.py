"""Checkpoints of a training run: saving policy, resume, fine-tuning from another run, housekeeping.

- Saving: run_dir.make_checkpoint(model, optimizer, epoch=<completed epochs>) managed by a
  tf.train.CheckpointManager (model_dir/checkpoints, "ckpt-<global step>", keeps
  cfg.train.keep_checkpoints), saved every cfg.train.checkpoint_every_steps and at the end. TF writes a
  checkpoint's files first and only then rewrites the small "checkpoint" state file (atomically,
  write-to-temp + rename), and resume reads that state file: a kill -9 during a save leaves the previous
  checkpoint as the latest.
- Resume = run the same command again: the latest checkpoint's model, optimizer (iterations, momenta)
  and epoch are restored. loss.log lines of steps after that checkpoint (trained by the killed run, and
  lost with it) are dropped, so the log's step column always increases. The saved config.json must
  agree with the new one in every model field and in the label map (data.category_ids); other fields
  (total steps, batch, learning rate) may change and the new values are written.
- --init_checkpoint (fine-tuning): variables are matched by checkpoint key (model/<Keras path, "/"
  escaped>), restored when the shape agrees, left at their fresh initialisation otherwise (the
  class-specific layers when num_classes differs); both lists are logged. It applies only to a fresh
  run, never on resume.
- The backbone's initial weights (model.backbone.weights: ImageNet, a file) are loaded here, into the built
  model of a fresh run only (weights/initial.py), before --init_checkpoint's variables: a resumed run
  takes them from its checkpoint and never reads or downloads them again.
"""
import os
from typing import List, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import distribute, run_dir
from maskrcnn_tf.loss_log import truncate_loss_log
from maskrcnn_tf.weights import initial

# Fields a resumed run must share with the run that wrote the checkpoint (everything else may change).
_RESUME_FIXED_FIELDS = ("model", "data.category_ids")
CHECKPOINT_NAME = "ckpt"


def check_resume_config(saved: config_lib.Config, new: config_lib.Config, model_dir: str) -> List[str]:
    """ValueError when `new` differs from the saved config in a field a resumed run cannot change;
    otherwise the list of the (allowed) differences, "field: old -> new"."""
    old_dict, new_dict = config_lib.to_dict(saved), config_lib.to_dict(new)

    def diff(a, b, prefix):
        if isinstance(a, dict):
            return [d for k in a for d in diff(a[k], b[k], f"{prefix}{k}.")]
        return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]

    changes = diff(old_dict, new_dict, "")
    fixed = [c for c in changes if any(c.startswith(f + ".") or c.startswith(f + ":") for f in _RESUME_FIXED_FIELDS)]
    if fixed:
        raise ValueError(f"{model_dir} holds a run with a different model configuration; use another "
                         f"--model_dir or the same settings ({'; '.join(fixed[:5])}"
                         f"{'; ...' if len(fixed) > 5 else ''})")
    return changes


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix, a checkpoints directory or a model directory; ValueError if none."""
    if tf.io.gfile.exists(path + ".index"):
        return path
    for directory in (path, os.path.join(path, run_dir.CHECKPOINT_DIR)):
        if tf.io.gfile.isdir(directory):
            latest = tf.train.latest_checkpoint(directory)
            if latest:
                return latest
    raise ValueError(f"--init_checkpoint={path!r}: no checkpoint there (give a ckpt-N prefix, a checkpoints "
                     "directory or a model directory)")


def load_matching_weights(model: keras.Model, checkpoint_path: str) -> Tuple[List[str], List[str]]:
    """Fine-tuning: assigns every model variable whose checkpoint key exists with the same shape.

    Returns (restored variable paths, skipped "path (reason)" strings); skipped variables keep their
    current (fresh) values.
    """
    checkpoint_path = resolve_checkpoint(checkpoint_path)
    reader = tf.train.load_checkpoint(checkpoint_path)
    shapes = reader.get_variable_to_shape_map()
    restored, skipped = [], []
    for path, variable in run_dir.variables_by_path(model).items():
        key = run_dir.checkpoint_key(path)
        if key not in shapes:
            skipped.append(f"{path} (not in checkpoint)")
        elif tuple(shapes[key]) != tuple(variable.shape):
            skipped.append(f"{path} (shape {tuple(shapes[key])} in checkpoint, {tuple(variable.shape)} here)")
        else:
            variable.assign(reader.get_tensor(key))
            restored.append(path)
    if not restored:
        raise ValueError(f"--init_checkpoint={checkpoint_path}: no variable of this model is in it; "
                         "is it a maskrcnn_tf training checkpoint?")
    return restored, skipped


def weights_are_finite(model: keras.Model) -> bool:
    """True when no model variable holds a NaN or an inf (one reduction per variable, no copy to host)."""
    return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in model.variables
                               if tf.as_dtype(v.dtype).is_floating]))


def remove_unfinished_checkpoints(checkpoint_dir: str) -> List[str]:
    """Deletes the "<prefix>_temp" directories a save interrupted by a crash leaves (TF writes a checkpoint's
    shards there, then renames them); the checkpoint state never points at them. Returns their paths."""
    leftovers = [p for p in tf.io.gfile.glob(os.path.join(checkpoint_dir, "*_temp")) if tf.io.gfile.isdir(p)]
    for path in leftovers:
        tf.io.gfile.rmtree(path)
    return leftovers


def _checkpoint_step(path: str) -> int:
    return int(path.rsplit("-", 1)[1])


def resume_advice(manager, checkpoint_dir: str, first_bad: int, chief: bool, model_dir: str) -> str:
    """Makes the latest checkpoint the last one before step first_bad, and says so.

    The loss of step k is computed from the weights saved as ckpt-(k - 1): when it is bad, that checkpoint
    (and any later) holds the weights that produced it (first_bad = k - 1), and resuming from it fails
    again. So the latest checkpoint becomes the last one before them, and the later ones are dropped from
    the state file (their files stay until a resumed run overwrites them)."""
    if not chief:
        return f"Lower --learning_rate or check the data; see {model_dir} for the checkpoint to resume from."
    paths = list(manager.checkpoints)
    good = [p for p in paths if _checkpoint_step(p) < first_bad]
    if good != paths and good:
        tf.compat.v1.train.update_checkpoint_state(checkpoint_dir, good[-1], all_model_checkpoint_paths=good)
    if good:
        return (f"The latest checkpoint is now {good[-1]}, the last whose weights gave a sane loss: re-run the "
                "same command with a lower --learning_rate to resume from it, or check the data.")
    return (f"No checkpoint holds sane weights: use a new --model_dir (or delete "
            f"{checkpoint_dir}) and a lower --learning_rate, or check the data.")


def checkpoint_manager(checkpoint, cfg, model_dir, strategy, chief, verbose):
    """(CheckpointManager, scratch dir or None). Non-chief workers must take part in saving, but into a
    per-task directory nobody reads; a killed run's leftovers there are removed first."""
    scratch = None
    manager_dir = os.path.join(model_dir, run_dir.CHECKPOINT_DIR)
    if not chief:
        resolver = strategy.cluster_resolver
        scratch = distribute.worker_scratch_dir(model_dir, resolver.task_type, resolver.task_id)
        if tf.io.gfile.exists(scratch):  # left by a killed run of this worker
            tf.io.gfile.rmtree(scratch)
            if verbose:  # this worker's own console (say() prints on the chief only)
                print(f"removed {scratch}: scratch checkpoints of an earlier run of this worker", flush=True)
        tf.io.gfile.makedirs(scratch)
        manager_dir = scratch
    manager = tf.train.CheckpointManager(checkpoint, manager_dir, max_to_keep=cfg.train.keep_checkpoints,
                                         checkpoint_name=CHECKPOINT_NAME)
    return manager, scratch


def restore(model, optimizer, checkpoint, latest, init_checkpoint, model_dir, num_steps_per_epoch, chief, say, *,
            backbone_weights):
    """Resumes from the run's own latest checkpoint, or else starts fresh: the backbone's initial weights
    (backbone_weights = cfg.model.backbone.weights, weights/initial.py), then init_checkpoint's
    shape-matched variables over them. A resumed run never reads (or downloads) backbone_weights."""
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        step = int(optimizer.iterations.numpy())
        # The epoch of the last step trained, 1-based as in loss.log (epoch_variable counts completed ones).
        say(f"resuming from {latest}: global step {step}, epoch {(max(step, 1) - 1) // num_steps_per_epoch + 1}, "
            f"learning rate {float(np.asarray(optimizer.learning_rate)):.6f}")
        if init_checkpoint:
            say("--init_checkpoint ignored: the run already has its own checkpoint")
        if chief:
            truncate_loss_log(os.path.join(model_dir, run_dir.LOSS_LOG), step)
        return
    if backbone_weights is not None:
        initial.load_initial_weights(model, backbone_weights)
        say(f"backbone initialised from {backbone_weights}")
    if init_checkpoint:
        restored, skipped = load_matching_weights(model, init_checkpoint)
        logging.info("init_checkpoint %s: restored %d variables: %s", init_checkpoint, len(restored), restored)
        logging.info("init_checkpoint %s: kept fresh %d variables: %s", init_checkpoint, len(skipped), skipped)
        say(f"initialised from {resolve_checkpoint(init_checkpoint)}: {len(restored)} variables restored, "
            f"{len(skipped)} kept at their fresh initialisation" + (":" if skipped else ""))
        for line in skipped:
            say(f"  not restored: {line}")



