"""The training loop behind train.py: Keras fit under a tf.distribute strategy, with resume, loss.log,
TensorBoard, console progress, NaN stop, periodic COCO evaluation and fine-tuning from another run.

`train(cfg, model_dir, train_file_pattern, strategy, ...)` builds the model and optimizer under
strategy.scope(), feeds strategy.distribute_datasets_from_function(build_dataset(..., input_context)) to
model.fit, and does everything else in one Keras callback (TrainingMonitor) keyed on the global step
(optimizer.iterations), never on Keras' epoch counter.

Decisions:
- Global step = optimizer.iterations (the learning-rate schedule is a function of it, so a resumed run
  continues at the same rate). Epoch = global step // steps_per_epoch; loss.log and the console show the
  1-based epoch the step belongs to. fit runs with steps_per_epoch and initial_epoch = step //
  steps_per_epoch, and the callback stops it at cfg.train.total_steps, so a run resumed in the middle of
  an epoch needs no special case.
- Checkpoints: run_dir.make_checkpoint(model, optimizer, epoch=<completed epochs>) managed by a
  tf.train.CheckpointManager (model_dir/checkpoints, "ckpt-<global step>", keeps
  cfg.train.keep_checkpoints), saved every cfg.train.checkpoint_every_steps and at the end. TF writes
  a checkpoint's files first and only then rewrites the small "checkpoint" state file (atomically,
  write-to-temp + rename), and resume reads that state file: a kill -9 during a save leaves the previous
  checkpoint as the latest.
- Resume = run the same command again: the latest checkpoint's model, optimizer (iterations, momenta)
  and epoch are restored. loss.log lines of steps after that checkpoint (trained by the killed run, and
  lost with it) are dropped, so the log's step column always increases. The saved config.json must agree
  with the new one in every model field and in the label map (data.category_ids); other fields (total
  steps, batch, learning rate) may change and the new values are written.
- Losses: the model's loss trackers are means since their last reset; the callback resets them at each
  log, so a loss.log line holds the mean over its logging interval. The total loss is checked every step;
  a non-finite value, or one above EXPLOSION_FACTOR x the running median of this run's losses, stops fit
  before anything is saved (the step's update already poisoned the weights), and train() raises
  NonFiniteLossError naming the global step and the components. The checkpoint whose weights produced
  the bad loss is dropped from the checkpoint state, so a re-run with a lower rate resumes from the last
  sane one (_resume_advice); a checkpoint whose weights are not finite is never written.
- Signals: with stop_signals (train.py: SIGINT and SIGTERM), the first signal makes the callback log,
  save and stop at the end of the step in flight, and train() raises TrainingInterrupted naming that
  checkpoint; a second exits at once (stop_signals.py). Not under multi-worker training (a save there is
  collective), and not around the final save and evaluation, where a signal has its usual effect.
- --init_checkpoint: variables are matched by checkpoint key (model/<Keras path, "/" escaped>), restored
  when the shape agrees, left at their fresh initialisation otherwise (the class-specific layers when
  num_classes differs); both lists are logged. It applies only to a fresh run, never on resume.
- Multi-worker: every worker trains and takes part in saves (TF's rule); only the chief writes into
  model_dir (config, loss.log, TensorBoard, checkpoints); other workers save into a scratch directory
  named after model_dir and the task (worker_scratch_dir), emptied at start (a killed worker's
  checkpoints do not pile up in /tmp) and deleted at the end.
- Evaluation during training is chief-only and runs outside the strategy (on the chief's default
  device; on a TPU VM the host CPU). The other workers wait meanwhile in the next step's all-reduce:
  MultiWorkerMirroredStrategy's collectives have no timeout by default
  (CommunicationOptions.timeout_seconds=None) and its peer health check talks to the chief's TF
  server, which keeps answering while the chief's Python thread evaluates, so nobody times out.
- Mixed precision: mixed_float16 wraps the optimizer in loss_scale.StepCountingLossScaleOptimizer (the
  model itself keeps a float32 policy, so Keras would not do it automatically); a step skipped on a
  gradient overflow still counts as a step (loss_scale.py), so the run ends at exactly total_steps.
- steps_per_loop = k runs k steps per call of the train function (Keras steps_per_execution); the
  callback then sees every k-th step, so config.validate requires logging, checkpoint and total steps
  to be multiples of k; epoch ends inside a loop are acted on at the loop's end.
- Storage: every file of the run directory goes through tf.io.gfile, so model_dir may be gs://...
  (or TensorFlow's ram:// in tests) like the checkpoints and TensorBoard logs.
- CPU-only techniques (recompute, banded conv gradients, the sparse RoIAlign gradient, the heap
  trimmer) follow the device: device_defaults.py.
- The optimizer's slots are built before the first step (also needed for a restore): otherwise
  tf.function traces the step twice and keeps both graphs (figures: benchmarks/README.md).
- fit runs under host_memory.HeapTrimmer, which gives the heap that graph building frees back to the
  OS (lower peak RSS; benchmarks/README.md).
"""

import collections
import contextlib
import json
import math
import os
import re
import time
import warnings
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import device_defaults, distribute
from maskrcnn_tf import run_dir
from maskrcnn_tf import stop_signals as stop_signals_lib
from maskrcnn_tf.data import pipeline
from maskrcnn_tf.data.label_map import load_label_map
from maskrcnn_tf.host_memory import HeapTrimmer
from maskrcnn_tf.loss_scale import StepCountingLossScaleOptimizer

# Order and spelling of the MindSpore original's loss.log line.
LOSS_LOG_NAMES = ("rpn_loss", "rcnn_loss", "rpn_cls_loss", "rpn_reg_loss", "rcnn_cls_loss", "rcnn_reg_loss",
                  "rcnn_mask_loss", "total_loss")
_FLOAT = r"(-?(?:\d+\.\d+|nan|inf))"
LOSS_LINE_PATTERN = re.compile(
    r"^epoch: (\d+) step: (\d+) ," + ", ".join(rf"{name}: {_FLOAT}" for name in LOSS_LOG_NAMES) + r"$")
# Fields a resumed run must share with the run that wrote the checkpoint (everything else may change).
_RESUME_FIXED_FIELDS = ("model", "data.category_ids")
_CHECKPOINT_NAME = "ckpt"
_EVAL_METRICS_SHOWN = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf or exploding loss (or non-finite weights); the message names the global
    step, the components and the checkpoint to resume from (or that a new --model_dir is needed)."""


class TrainingInterrupted(RuntimeError):
    """A caught SIGINT/SIGTERM stopped training after a step, saved as a checkpoint (stop_signals.py);
    `signum` is the signal, the message names the step and the checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# A loss this many times its running median is an explosion (a too-high learning rate): the weights that
# produced it are already ruined, and a finite loss would otherwise let them be saved and resumed from.
EXPLOSION_FACTOR = 1e4
EXPLOSION_WINDOW = 100  # logged losses the running median is taken over
EXPLOSION_MIN_HISTORY = 1  # earlier losses needed: one is enough, a 1e4 x jump is never training


# ------------------------------------------------------------------------------------------- helpers


def format_loss_line(epoch: int, step: int, losses: Dict[str, float]) -> str:
    """One loss.log line: `epoch: 1 step: 7393 ,rpn_loss: 0.10626, rcnn_loss: 0.81592, ...` (5 decimals)."""
    return f"epoch: {epoch} step: {step} ," + ", ".join(f"{n}: {losses[n]:.5f}" for n in LOSS_LOG_NAMES)


def parse_loss_line(line: str) -> Optional[Tuple[int, int, Dict[str, float]]]:
    """(epoch, step, {loss name: value}) of a loss.log line, or None when it does not match the format."""
    match = LOSS_LINE_PATTERN.match(line.strip())
    if not match:
        return None
    values = [float(v) for v in match.groups()[2:]]
    return int(match.group(1)), int(match.group(2)), dict(zip(LOSS_LOG_NAMES, values))


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    """Full batches in one pass over the data (the pipeline drops the remainder); at least 1.
    ValueError for zero records: training on them would wait forever for a first batch."""
    if num_records <= 0:
        raise ValueError("no training records (0 records to make an epoch of)")
    return max(1, num_records // global_batch)


def apply_label_map(cfg: config_lib.Config, label_map_path: str) -> config_lib.Config:
    """cfg with model.num_classes, data.category_ids and data.class_names from a converter's label map."""
    category_ids, class_names = load_label_map(label_map_path)
    return config_lib.replace(cfg, **{"model.num_classes": len(category_ids), "data.category_ids": category_ids,
                                      "data.class_names": class_names})


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


def _scalar(value) -> float:
    """A step output as a float: scalars, and the [1] tensors of a multi-worker run (_build)."""
    return float(np.asarray(value).reshape(-1)[0])


def write_run_files(cfg: config_lib.Config, model_dir: str, label_map_path: Optional[str]) -> None:
    """config.json (resolved config) and label_map.json (copy of the converter's) into model_dir."""
    run_dir.write_text(os.path.join(model_dir, run_dir.CONFIG_FILE), json.dumps(config_lib.to_dict(cfg), indent=2))
    if label_map_path:
        with tf.io.gfile.GFile(label_map_path, "r") as f:
            run_dir.write_text(os.path.join(model_dir, run_dir.LABEL_MAP_FILE), f.read())


def _truncate_loss_log(path: str, last_step: int) -> None:
    """Drops loss.log lines of steps after `last_step` (trained by an interrupted run, then lost)."""
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path, "r") as f:
        lines = f.readlines()
    kept = [line for line in lines if (parse_loss_line(line) or (0, 0, None))[1] <= last_step]
    if len(kept) != len(lines):
        run_dir.write_text(path, "".join(kept))


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


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# TensorBoard's scalar plugin reads summaries tagged with this metadata. Written with the core op
# tf.summary.write because tf.summary.scalar needs the tensorboard package, which is not a dependency.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()


def write_scalar(name: str, value: float, step: int) -> None:
    """A TensorBoard scalar into the default summary writer."""
    tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=_SCALAR_METADATA)


# ------------------------------------------------------------------------------------------ callback


class TrainingMonitor(keras.callbacks.Callback):
    """Per-step work of train(): NaN check, loss.log/TensorBoard/console, checkpoints, evaluation."""

    def __init__(self, *, cfg, model_dir, manager, epoch_variable, steps_per_epoch, chief, evaluate=None,
                 eval_every_epochs=0, verbose=True, stop_request=None):
        super().__init__()
        self.stop_request = stop_request or stop_signals_lib.StopRequest()  # set by a caught signal
        self.cfg = cfg
        self.total_steps = cfg.train.total_steps
        self.global_batch = cfg.data.train_batch_size
        self.manager = manager
        self.epoch_variable = epoch_variable
        self.steps_per_epoch = steps_per_epoch
        self.chief = chief
        self.evaluate = evaluate
        self.eval_every_epochs = eval_every_epochs
        self.verbose = verbose and chief
        self.loss_log_path = os.path.join(model_dir, run_dir.LOSS_LOG)
        self.writer = tf.summary.create_file_writer(os.path.join(model_dir, run_dir.TENSORBOARD_DIR, "train")) \
            if chief else None
        self.eval_writer = tf.summary.create_file_writer(os.path.join(model_dir, run_dir.TENSORBOARD_DIR, "eval")) \
            if chief and evaluate else None
        # (first checkpoint step that holds bad weights, what went wrong) once a loss is NaN/inf or exploded
        # (the weights of the step before produced it) or the weights are not finite.
        self.non_finite = None
        self.recent_totals = collections.deque(maxlen=EXPLOSION_WINDOW)  # total losses seen by this run
        self.last_saved_step = None
        self.last_eval_step = None
        self.last_losses = {}
        self.eval_metrics = {}

    @property
    def step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def epoch_of(self, step: int) -> int:
        """1-based epoch the step `step` (1-based) belongs to."""
        return (max(step, 1) - 1) // self.steps_per_epoch + 1

    def on_train_begin(self, logs=None):
        self._mark = (time.monotonic(), self.step)
        self._previous_step = self.step
        self._first_step_shown = False

    def on_train_batch_end(self, batch, logs=None):
        step = self.step
        total = _scalar(logs["total_loss"])
        if not math.isfinite(total):
            bad = [n for n in LOSS_LOG_NAMES if not math.isfinite(_scalar(logs[n]))]
            self.non_finite = (step - 1, f"non-finite loss at global step {step}: {', '.join(bad)}")
        elif len(self.recent_totals) >= EXPLOSION_MIN_HISTORY and \
                total > EXPLOSION_FACTOR * float(np.median(self.recent_totals)):
            self.non_finite = (step - 1, f"exploding loss at global step {step}: total_loss {total:.4g} > "
                                     f"{EXPLOSION_FACTOR:g} x its running median "
                                     f"{float(np.median(self.recent_totals)):.4g}")
        if self.non_finite:
            self.model.stop_training = True  # nothing is saved after this step
            return
        self.recent_totals.append(total)
        # A caught signal: log, save and stop at this step, without an evaluation (a preempted VM has
        # seconds; the final evaluation of the resumed run still comes).
        stopping = self.stop_request.signum is not None
        if step % self.cfg.train.log_every_steps == 0 or step >= self.total_steps or stopping:
            self._log(step, {n: _scalar(logs[n]) for n in LOSS_LOG_NAMES})
        elif not self._first_step_shown and self.verbose:
            # The first logged step may be minutes away (an R50 on a CPU, log_every_steps 20): show life now.
            every = self.cfg.train.log_every_steps
            print(f"step {step}/{self.total_steps}: first step(s) of this run took "
                  f"{_format_duration(time.monotonic() - self._mark[0])} (tracing included), total_loss "
                  f"{total:.4f}; next line at step {every * (step // every + 1)}", flush=True)
        self._first_step_shown = True
        epoch, previous_epoch = step // self.steps_per_epoch, self._previous_step // self.steps_per_epoch
        self._previous_step = step
        if epoch > previous_epoch:  # an epoch ended at this step (or inside this loop, steps_per_loop > 1)
            self.epoch_variable.assign(epoch)
            if self.evaluate and self.eval_every_epochs and not stopping and any(
                    e % self.eval_every_epochs == 0 for e in range(previous_epoch + 1, epoch + 1)):
                self.run_evaluation(step)
        if step % self.cfg.train.checkpoint_every_steps == 0 or stopping:
            self.save(step)
        if step >= self.total_steps or stopping:
            self.model.stop_training = True

    def _log(self, step, losses):
        for tracker in self.model.metrics:  # next line = mean over the next interval
            tracker.reset_state()
        self.last_losses = losses
        now = time.monotonic()
        elapsed, steps = now - self._mark[0], step - self._mark[1]
        self._mark = (now, step)
        steps_per_second = steps / elapsed if elapsed > 0 else 0.0
        learning_rate = _scalar(self.model.optimizer.learning_rate)
        epoch = self.epoch_of(step)
        if not self.chief:
            return
        with tf.io.gfile.GFile(self.loss_log_path, "a") as f:
            f.write(format_loss_line(epoch, step, losses) + "\n")
        with self.writer.as_default(step=step):
            for name, value in losses.items():
                write_scalar(f"loss/{name}", value, step)
            write_scalar("learning_rate", learning_rate, step)
            write_scalar("steps_per_second", steps_per_second, step)
        self.writer.flush()
        if self.verbose:
            num_epochs = -(-self.total_steps // self.steps_per_epoch)
            done = step / self.total_steps
            bar_width = 20
            bar = "=" * int(done * bar_width) + ">" + "." * (bar_width - int(done * bar_width))
            eta = (self.total_steps - step) / steps_per_second if steps_per_second > 0 else 0.0
            print(f"epoch {epoch}/{num_epochs} step {step}/{self.total_steps} [{bar[:bar_width]}] "
                  f"total_loss {losses['total_loss']:.4f} (rpn {losses['rpn_loss']:.4f}, "
                  f"rcnn {losses['rcnn_loss']:.4f}, mask {losses['rcnn_mask_loss']:.4f}) lr {learning_rate:.3g} "
                  f"{steps_per_second:.2f} steps/s {steps_per_second * self.global_batch:.1f} images/s "
                  f"eta {_format_duration(eta)}", flush=True)

    def save(self, step):
        if self.non_finite or step == self.last_saved_step:
            return
        if not weights_are_finite(self.model):  # never a checkpoint that cannot be resumed from
            self.non_finite = (step, f"non-finite weights after global step {step}")
            self.model.stop_training = True
            return
        self.epoch_variable.assign(step // self.steps_per_epoch)
        path = self.manager.save(checkpoint_number=step)
        self.last_saved_step = step
        if self.verbose:
            print(f"saved checkpoint {path}", flush=True)
        self._mark = (time.monotonic(), self._mark[1])  # saving time does not count as training speed

    def run_evaluation(self, step):
        if step == self.last_eval_step or not self.chief:
            return
        metrics = self.evaluate()
        self.last_eval_step = step
        self.eval_metrics = metrics
        with self.eval_writer.as_default(step=step):
            for name, value in metrics.items():
                write_scalar(name, value, step)
        self.eval_writer.flush()
        if self.verbose:
            shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in _EVAL_METRICS_SHOWN if k in metrics)
            print(f"evaluation at step {step}: {shown}", flush=True)
        self._mark = (time.monotonic(), self._mark[1])


# ------------------------------------------------------------------------------------------- train


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


def _resume_advice(manager, checkpoint_dir: str, first_bad: int, chief: bool, model_dir: str) -> str:
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


def _build(cfg, strategy):
    from maskrcnn_tf.model import build_model  # late: pulls in every layer
    from maskrcnn_tf.optimizer import build_optimizer

    cfg = _resolve_for_devices(cfg, strategy)  # idempotent: train() passes a resolved cfg
    with strategy.scope():
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        if cfg.train.precision == "mixed_float16":
            # The name keeps the checkpoint keys of Keras' LossScaleOptimizer's variables.
            optimizer = StepCountingLossScaleOptimizer(optimizer, initial_scale=cfg.train.initial_loss_scale,
                                                       name="loss_scale_optimizer")
        optimizer.build(model.trainable_variables)  # slots exist before a restore
        model.compile(optimizer=optimizer, jit_compile=bool(cfg.train.jit_compile),
                      steps_per_execution=cfg.train.steps_per_loop)
        if cfg.train.jit_compile and not (model.jit_compile or model.replica_jit_compile):
            # Keras would only warn and run without XLA.
            raise ValueError("train.jit_compile=true, but a layer of this model cannot be XLA-compiled "
                             "(check model.roi.roi_align_backend=gather)")
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    # Keras' fit under a strategy first MEAN-reduces one input batch over the replicas to build the model
    # symbolically; MultiWorkerMirroredStrategy cannot reduce a dict batch ("unsupported type dict").
    # Model and optimizer are already built here, so that step would do nothing: skip it (instance only).
    assert model.built and optimizer.built
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Keras reduces step outputs over workers with strategy.reduce("MEAN", v, axis=0), which fails on
        # the scalar losses ("Invalid reduction dimension 0"); a [1] shape reduces to the same mean.
        train_step = model.train_step
        model.train_step = lambda data: {k: tf.reshape(v, [1]) for k, v in train_step(data).items()}  # [1]
    return model, optimizer, epoch


def _resolve_for_devices(cfg, strategy):
    """cfg with every "auto" of device_defaults.py decided for the strategy's devices; refuses a
    crop_and_resize RoIAlign on a TPU."""
    device_kind = device_defaults.device_kind(strategy)
    if device_kind == "tpu" and cfg.model.roi.roi_align_backend != "gather":
        raise ValueError("a TPU needs model.roi.roi_align_backend=gather (CropAndResize has no XLA kernel); "
                         f"got {cfg.model.roi.roi_align_backend!r}")
    return device_defaults.resolve(cfg, device_kind)  # ValueError for a refused combination


def _prepare_run_dir(cfg, model_dir, label_map_path, chief, say) -> Optional[str]:
    """Creates model_dir, clears interrupted checkpoint saves, reports config changes of a resumed run and
    writes config.json / label_map.json (chief). Returns the run's latest checkpoint or None."""
    tf.io.gfile.makedirs(model_dir)
    if chief:
        for leftover in remove_unfinished_checkpoints(os.path.join(model_dir, run_dir.CHECKPOINT_DIR)):
            say(f"removed {leftover}: an unfinished checkpoint save of an interrupted run")
    latest = run_dir.latest_checkpoint(model_dir)
    if latest and tf.io.gfile.exists(os.path.join(model_dir, run_dir.CONFIG_FILE)):
        for change in check_resume_config(run_dir.load_config(model_dir), cfg, model_dir):
            say(f"resume: config changed {change}")
    if chief:
        write_run_files(cfg, model_dir, label_map_path)
    return latest


def _checkpoint_manager(checkpoint, cfg, model_dir, strategy, chief, verbose):
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
                                         checkpoint_name=_CHECKPOINT_NAME)
    return manager, scratch


def _restore(model, optimizer, checkpoint, latest, init_checkpoint, model_dir, num_steps_per_epoch, chief, say):
    """Resumes from the run's own latest checkpoint, or else initialises from init_checkpoint (shape-matched
    variables only), or else keeps the fresh weights."""
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        step = int(optimizer.iterations.numpy())
        # The epoch of the last step trained, 1-based as in loss.log (epoch_variable counts completed ones).
        say(f"resuming from {latest}: global step {step}, epoch {(max(step, 1) - 1) // num_steps_per_epoch + 1}, "
            f"learning rate {float(np.asarray(optimizer.learning_rate)):.6f}")
        if init_checkpoint:
            say("--init_checkpoint ignored: the run already has its own checkpoint")
        if chief:
            _truncate_loss_log(os.path.join(model_dir, run_dir.LOSS_LOG), step)
    elif init_checkpoint:
        restored, skipped = load_matching_weights(model, init_checkpoint)
        logging.info("init_checkpoint %s: restored %d variables: %s", init_checkpoint, len(restored), restored)
        logging.info("init_checkpoint %s: kept fresh %d variables: %s", init_checkpoint, len(skipped), skipped)
        say(f"initialised from {resolve_checkpoint(init_checkpoint)}: {len(restored)} variables restored, "
            f"{len(skipped)} kept at their fresh initialisation" + (":" if skipped else ""))
        for line in skipped:
            say(f"  not restored: {line}")


def _evaluation(model, cfg, model_dir, eval_file_pattern, val_json, eval_every_epochs):
    """A no-argument function running COCO evaluation into model_dir/eval, or None when it is off."""
    if not (eval_file_pattern and val_json and eval_every_epochs):
        return None

    def evaluate():
        from maskrcnn_tf.evaluation.run import evaluate_model  # late: owned by the evaluation module

        return evaluate_model(model, cfg, eval_file_pattern, val_json,
                              output_dir=os.path.join(model_dir, run_dir.EVAL_DIR))

    return evaluate


def execution_summary(cfg, model) -> str:
    """The resolved execution choices of a run in one line: precision, XLA, shapes, steps per loop,
    RoIAlign and the CPU-only techniques. cfg: resolved (device_defaults.resolve); call it under the
    strategy's scope."""
    if model.replica_jit_compile:
        xla = "XLA per replica (forward + backward; gradient sum and update outside)"
    else:
        xla = "XLA whole step" if model.jit_compile else "no XLA"
    t, roi = cfg.train, cfg.model.roi
    gradient = f" (gradient {t.roi_align_gradient})" if roi.roi_align_backend == "crop_and_resize" else ""
    cpu = [name.replace("_", " ") for name in config_lib.DEVICE_SWITCHES if getattr(t, name) is True]
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return (f"{t.precision}, {xla}, {'padding trimmed per batch' if model._trims_padding() else 'static shapes'}, "
            f"{t.steps_per_loop} step(s) per loop, RoIAlign {roi.roi_align_backend}{gradient}, "
            f"CPU techniques: {', '.join(cpu) or 'none'}{batch_norm_summary(cfg, num_replicas)}")


def batch_norm_summary(cfg, num_replicas: int) -> str:
    """'; BatchNorm ...': which parts normalise with batch statistics and over how many images (empty
    when none does). Synchronized BN takes its statistics over the global batch, plain BN over each
    replica's; one image is allowed (torchvision trains so with one image per GPU) and said here."""
    m = cfg.model
    parts = {"backbone": m.backbone.norm, "FPN": m.fpn_norm, "box head": m.heads.box_norm,
             "mask head": m.heads.mask_norm}
    batch_norms = {part: norm for part, norm in parts.items() if norm in ("batch_norm", "sync_batch_norm")}
    if not batch_norms:
        return ""
    per_replica = cfg.data.train_batch_size // num_replicas
    images = {norm: cfg.data.train_batch_size if norm == "sync_batch_norm" else per_replica
              for norm in batch_norms.values()}
    line = "; BatchNorm statistics: " + ", ".join(f"{part} {norm} over {images[norm]} image(s)"
                                                   for part, norm in batch_norms.items())
    if min(images.values()) == 1:
        line += (" (one image per statistic, as torchvision with one image per GPU: the backbone and FPN "
                 "statistics are noisy; the heads' run over that image's RoIs)")
    return line


def _fit(model, cfg, strategy, train_file_pattern, monitor, num_steps_per_epoch, model_dir, say):
    """model.fit from the optimizer's step to cfg.train.total_steps (nothing when already there); cfg is
    resolved for the devices (device_defaults.resolve)."""
    step, total = int(model.optimizer.iterations.numpy()), cfg.train.total_steps
    if step >= total:
        say(f"{model_dir}: already trained to step {step} (train.total_steps={total})")
        return
    dataset = strategy.distribute_datasets_from_function(
        lambda context: pipeline.build_dataset(train_file_pattern, cfg, training=True, input_context=context))
    say(f"training {model_dir}: steps {step} -> {total}, {num_steps_per_epoch} steps per epoch, "
        f"global batch {cfg.data.train_batch_size}, {distribute.describe_devices(strategy)}")
    with strategy.scope():
        say(f"execution: {execution_summary(cfg, model)}")
    # HeapTrimmer: graph building and optimisation leave freed C++ heap resident (host_memory.py).
    trimmer = HeapTrimmer() if cfg.train.heap_trim else contextlib.nullcontext()
    with warnings.catch_warnings(), trimmer:
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # Keras: tf.data ignores shuffle
        model.fit(dataset, steps_per_epoch=num_steps_per_epoch, epochs=-(-total // num_steps_per_epoch),
                  initial_epoch=step // num_steps_per_epoch, callbacks=[monitor], verbose=0)


def _finish(model, optimizer, monitor, manager, evaluate, model_dir, chief, say) -> int:
    """After fit: raises NonFiniteLossError for a stopped run, else saves the final checkpoint and runs the
    last evaluation. Returns the global step."""
    if monitor.non_finite:
        first_bad, what = monitor.non_finite
        checkpoint_dir = os.path.join(model_dir, run_dir.CHECKPOINT_DIR)
        raise NonFiniteLossError(f"{what}; training stopped, nothing saved after it. "
                                 + _resume_advice(manager, checkpoint_dir, first_bad, chief, model_dir))
    step = int(optimizer.iterations.numpy())
    signum = monitor.stop_request.signum
    if signum is not None and step < monitor.total_steps:
        raise TrainingInterrupted(signum, f"{monitor.stop_request.name} at global step {step}: saved checkpoint "
                                          f"{manager.latest_checkpoint}; run the same command again to resume")
    skipped = int(optimizer.skipped_steps.numpy()) if hasattr(optimizer, "skipped_steps") else 0
    if skipped:
        say(f"loss scaling: {skipped} step(s) of this run had overflowing float16 gradients; their update "
            "was skipped (the loss scale halved) and they count as steps")
    monitor.save(step)
    if evaluate and monitor.last_eval_step != step:
        monitor.run_evaluation(step)
    return step


def train(cfg: config_lib.Config, model_dir: str, train_file_pattern, strategy: tf.distribute.Strategy, *,
          label_map_path: Optional[str] = None, init_checkpoint: Optional[str] = None,
          eval_file_pattern=None, val_json: Optional[str] = None, eval_every_epochs: int = 0,
          num_steps_per_epoch: Optional[int] = None, verbose: bool = True, stop_signals=()) -> Dict:
    """Trains (or resumes training) until cfg.train.total_steps global steps; see the module docstring.

    Args:
      cfg: the resolved Config (num_classes and the label map already applied, see apply_label_map).
      model_dir: run directory (run_dir.py layout); created if needed.
      train_file_pattern: glob (or list of globs) of training TFRecords.
      strategy: from distribute.get_strategy.
      label_map_path: converter label map copied to model_dir/label_map.json (optional).
      init_checkpoint: fine-tune from this checkpoint (prefix, checkpoints dir or model dir) when the run
        has no checkpoint of its own yet.
      eval_file_pattern, val_json, eval_every_epochs: COCO evaluation (maskrcnn_tf.evaluation.run) every
        that many epochs and at the end; off when any of them is missing/0.
      num_steps_per_epoch: default: count_records(train_file_pattern) // global batch.
      stop_signals: signals (e.g. stop_signals.GRACEFUL_SIGNALS) that stop training after the step in
        flight with a checkpoint there; ignored under multi-worker training, where a save is collective.
    Returns:
      {"model", "global_step", "epoch", "losses" (last logged), "eval_metrics" (last evaluation or {}),
       "restored_from" (checkpoint path or None)}.
    Raises:
      ValueError: bad inputs (no records, a model_dir of another configuration, a bad init checkpoint).
      NonFiniteLossError: a NaN/inf loss; the latest checkpoint is the last good one.
      TrainingInterrupted: one of stop_signals arrived; the latest checkpoint is at the step it stopped at.
    """
    config_lib.validate(cfg)
    # config.json keeps the "auto" switches (a resumed run may get other devices); the run uses these.
    resolved = _resolve_for_devices(cfg, strategy)
    chief = distribute.is_chief(strategy)
    say = print if (verbose and chief) else (lambda *a, **k: None)
    if num_steps_per_epoch is None:  # counted first: no records is an error before anything is written
        num_steps_per_epoch = steps_per_epoch(pipeline.count_training_records(train_file_pattern),
                                              cfg.data.train_batch_size)
    latest = _prepare_run_dir(cfg, model_dir, label_map_path, chief, say)

    model, optimizer, epoch_variable = _build(resolved, strategy)
    checkpoint = run_dir.make_checkpoint(model, optimizer, epoch=epoch_variable)
    manager, scratch = _checkpoint_manager(checkpoint, cfg, model_dir, strategy, chief, verbose)
    _restore(model, optimizer, checkpoint, latest, init_checkpoint, model_dir, num_steps_per_epoch, chief, say)
    evaluate = _evaluation(model, cfg, model_dir, eval_file_pattern, val_json, eval_every_epochs)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # A save is collective: a worker saving alone on its own signal would wait for the others forever.
        stop_signals = ()
    try:
        with stop_signals_lib.catch_stop_signals(stop_signals) as stop_request:
            monitor = TrainingMonitor(cfg=resolved, model_dir=model_dir, manager=manager, epoch_variable=epoch_variable,
                                      steps_per_epoch=num_steps_per_epoch, chief=chief, evaluate=evaluate,
                                      eval_every_epochs=eval_every_epochs, verbose=verbose,
                                      stop_request=stop_request)
            _fit(model, resolved, strategy, train_file_pattern, monitor, num_steps_per_epoch, model_dir, say)
        step = _finish(model, optimizer, monitor, manager, evaluate, model_dir, chief, say)
    finally:
        if scratch and tf.io.gfile.exists(scratch):
            tf.io.gfile.rmtree(scratch)
    return {"model": model, "global_step": step, "epoch": int(epoch_variable.numpy()),
            "losses": monitor.last_losses, "eval_metrics": monitor.eval_metrics,
            "restored_from": latest}
