"""The Keras callback that does the per-step work of training: NaN and explosion check, loss.log,
TensorBoard, console progress, checkpoint saves, periodic evaluation and the stop at total_steps or on a
caught signal (training.py's module docstring gives the policies).

The total loss is checked every step: a non-finite value, or one above EXPLOSION_FACTOR x the running
median of this run's losses, stops fit before anything is saved (the step's update already poisoned the
weights), and train() raises NonFiniteLossError naming the global step and the components. The
checkpoint whose weights produced the bad loss is dropped from the checkpoint state, so a re-run with a
lower rate resumes from the last sane one (checkpointing.resume_advice); a checkpoint whose weights are
not finite is never written.
"""
import collections
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from maskrcnn_tf import run_dir
from maskrcnn_tf import stop_signals as stop_signals_lib
from maskrcnn_tf.checkpointing import weights_are_finite
from maskrcnn_tf.loss_log import LOSS_LOG_NAMES, format_loss_line

_EVAL_METRICS_SHOWN = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")

# A loss this many times its running median is an explosion (a too-high learning rate): the weights that
# produced it are already ruined, and a finite loss would otherwise let them be saved and resumed from.
EXPLOSION_FACTOR = 1e4
EXPLOSION_WINDOW = 100  # logged losses the running median is taken over
EXPLOSION_MIN_HISTORY = 1  # earlier losses needed: one is enough, a 1e4 x jump is never training


def _scalar(value) -> float:
    """A step output as a float: scalars, and the [1] tensors of a multi-worker run (_build)."""
    return float(np.asarray(value).reshape(-1)[0])


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
