"""The training loop behind train.py: Keras fit under a tf.distribute strategy, with resume, loss.log,
TensorBoard, console progress, NaN stop, periodic COCO evaluation and fine-tuning from another run.

`train(cfg, model_dir, train_file_pattern, strategy, ...)` builds the model and optimizer under
strategy.scope(), feeds strategy.distribute_datasets_from_function(build_dataset(..., input_context)) to
model.fit, and does everything else in one Keras callback (training_monitor.TrainingMonitor) keyed on the
global step (optimizer.iterations), never on Keras' epoch counter. The loss.log format is loss_log.py's;
saving, resume and fine-tuning from another run are checkpointing.py's.

Decisions:
- Global step = optimizer.iterations (the learning-rate schedule is a function of it, so a resumed run
  continues at the same rate). Epoch = global step // steps_per_epoch; loss.log and the console show the
  1-based epoch the step belongs to. fit runs with steps_per_epoch and initial_epoch = step //
  steps_per_epoch, and the callback stops it at cfg.train.total_steps, so a run resumed in the middle of
  an epoch needs no special case.
- Signals: with stop_signals (train.py: SIGINT and SIGTERM), the first signal makes the callback log,
  save and stop at the end of the step in flight, and train() raises TrainingInterrupted naming that
  checkpoint; a second exits at once (stop_signals.py). Not under multi-worker training (a save there is
  collective), and not around the final save and evaluation, where a signal has its usual effect.
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

import contextlib
import json
import os
import warnings
from typing import Dict, Optional

import tensorflow as tf

from maskrcnn_tf import checkpointing
from maskrcnn_tf import config as config_lib
from maskrcnn_tf import device_defaults, distribute
from maskrcnn_tf import run_dir
from maskrcnn_tf import stop_signals as stop_signals_lib
from maskrcnn_tf.data import pipeline
from maskrcnn_tf.data.label_map import load_label_map
from maskrcnn_tf.host_memory import HeapTrimmer
from maskrcnn_tf.loss_scale import StepCountingLossScaleOptimizer
from maskrcnn_tf.training_monitor import TrainingMonitor


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf or exploding loss (or non-finite weights); the message names the global
    step, the components and the checkpoint to resume from (or that a new --model_dir is needed)."""


class TrainingInterrupted(RuntimeError):
    """A caught SIGINT/SIGTERM stopped training after a step, saved as a checkpoint (stop_signals.py);
    `signum` is the signal, the message names the step and the checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# ------------------------------------------------------------------------------------------- helpers


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


def write_run_files(cfg: config_lib.Config, model_dir: str, label_map_path: Optional[str]) -> None:
    """config.json (resolved config) and label_map.json (copy of the converter's) into model_dir."""
    run_dir.write_text(os.path.join(model_dir, run_dir.CONFIG_FILE), json.dumps(config_lib.to_dict(cfg), indent=2))
    if label_map_path:
        with tf.io.gfile.GFile(label_map_path, "r") as f:
            run_dir.write_text(os.path.join(model_dir, run_dir.LABEL_MAP_FILE), f.read())


# ------------------------------------------------------------------------------------------- train


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
        checkpoint_dir = os.path.join(model_dir, run_dir.CHECKPOINT_DIR)
        for leftover in checkpointing.remove_unfinished_checkpoints(checkpoint_dir):
            say(f"removed {leftover}: an unfinished checkpoint save of an interrupted run")
    latest = run_dir.latest_checkpoint(model_dir)
    if latest and tf.io.gfile.exists(os.path.join(model_dir, run_dir.CONFIG_FILE)):
        for change in checkpointing.check_resume_config(run_dir.load_config(model_dir), cfg, model_dir):
            say(f"resume: config changed {change}")
    if chief:
        write_run_files(cfg, model_dir, label_map_path)
    return latest


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
                                 + checkpointing.resume_advice(manager, checkpoint_dir, first_bad, chief, model_dir))
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
    manager, scratch = checkpointing.checkpoint_manager(checkpoint, cfg, model_dir, strategy, chief, verbose)
    checkpointing.restore(model, optimizer, checkpoint, latest, init_checkpoint, model_dir, num_steps_per_epoch,
                          chief, say, backbone_weights=cfg.model.backbone.weights)
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
