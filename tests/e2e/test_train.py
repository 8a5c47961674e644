"""train.py as people run it (subprocesses): loss.log format, resume after kill -9, NaN stop, mirrored and
multi-worker strategies, fine-tuning from an 80-class run into a 1-class run; plus the in-process pieces
(loss line format, resume config check, checkpoint keys, strategies by name).

Data: the real COCO and Roboflow samples of ../shared/data in the development workspace; without them (a
user's clone) their generated stand-ins (tests/conftest.py coco_sample: shapes images, 3 classes instead of
80, a 1-class set with the Roboflow export's unused parent category)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets
from maskrcnn_tf import checkpointing, distribute, loss_log, run_dir
from tests.conftest import REPO_ROOT, STANDIN_ONE_CLASS_NAME

TRAIN_PY = str(REPO_ROOT / "train.py")
# The tiny preset shrunk as tests/e2e/synthetic.tiny_test_config (a step takes ~1 s on 2 cores).
SMALL_MODEL = [
    "--config=tiny", "--image_size=128x128", "--batch_size=2",
    "--params_override=model.fpn_num_filters=32", "--params_override=model.rpn_num_filters=32",
    "--params_override=model.rpn.batch_size_per_image=64", "--params_override=model.rpn.pre_nms_top_k_train=128",
    "--params_override=model.rpn.post_nms_top_k_train=48", "--params_override=model.rpn.pre_nms_top_k_test=128",
    "--params_override=model.rpn.post_nms_top_k_test=48", "--params_override=model.roi.num_samples=32",
    "--params_override=model.roi.max_mask_rois=8", "--params_override=model.heads.fc_dim=64",
    "--params_override=model.heads.mask_num_filters=32", "--params_override=data.max_instances=8",
    "--params_override=data.gt_mask_size=28", "--params_override=data.shuffle_buffer=8",
]
COCO_STEPS = 10  # the reference run; the resume test kills a copy after its first checkpoint
COCO_IMAGES = 8
PROCESS_TIMEOUT = 300


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.pop(distribute.CPU_DEVICES_ENV, None)
    env.update(extra)
    return env


def run_train(args, env=None, check=True):
    proc = subprocess.run([sys.executable, TRAIN_PY, *args], capture_output=True, text=True,
                          env=env or _env(), timeout=PROCESS_TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def loss_log_steps(model_dir):
    with open(os.path.join(model_dir, run_dir.LOSS_LOG), encoding="utf-8") as f:
        parsed = [loss_log.parse_loss_line(line) for line in f]
    assert all(p is not None for p in parsed), "a loss.log line does not match the original's format"
    return [step for _, step, _ in parsed]


def checkpoint_steps(model_dir):
    return checkpoint_steps_in(os.path.join(model_dir, run_dir.CHECKPOINT_DIR))


def checkpoint_steps_in(directory):
    state = tf.train.get_checkpoint_state(directory)
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] if state else []


def _convert(image_dir, annotation_file, prefix, num_shards, max_images=None):
    from maskrcnn_tf.data.coco_converter import convert_coco

    convert_coco(str(image_dir), str(annotation_file), prefix, num_shards, max_images=max_images, progress=False)
    return prefix + "-*.tfrecord"


@pytest.fixture(scope="module")
def coco_records(coco_sample, tmp_path_factory):
    sample = coco_sample("coco_tiny/train")
    prefix = str(tmp_path_factory.mktemp("coco_records") / "train")
    # 2 shards: the multi-worker test needs one per worker.
    return _convert(sample.image_dir, sample.annotation_file, prefix, 2, COCO_IMAGES)


def coco_args(records, model_dir, steps=COCO_STEPS, *extra):
    return [f"--train_file_pattern={records}", f"--model_dir={model_dir}", f"--train_steps={steps}",
            *SMALL_MODEL, "--params_override=train.checkpoint_every_steps=2",
            "--params_override=train.log_every_steps=1", "--params_override=train.warmup_steps=2", *extra]


@pytest.fixture(scope="module")
def coco_run(coco_records, tmp_path_factory):
    """An uninterrupted 80-class run on COCO images (3 classes on the stand-in): the reference for resume and
    the fine-tuning source."""
    model_dir = str(tmp_path_factory.mktemp("coco_run"))
    proc = run_train(coco_args(coco_records, model_dir))
    return model_dir, proc


# ------------------------------------------------------------------------------------ in-process


def test_loss_line_has_the_originals_format_and_round_trips():
    losses = {name: 0.1 * (i + 1) for i, name in enumerate(loss_log.LOSS_LOG_NAMES)}
    line = loss_log.format_loss_line(1, 7393, losses)
    # The MindSpore original's line, with its odd " ," after the step.
    assert line.startswith("epoch: 1 step: 7393 ,rpn_loss: 0.10000, rcnn_loss: 0.20000, rpn_cls_loss: 0.30000")
    assert line.endswith("rcnn_mask_loss: 0.70000, total_loss: 0.80000")
    epoch, step, parsed = loss_log.parse_loss_line(line)
    assert (epoch, step) == (1, 7393) and parsed == pytest.approx(losses)
    assert loss_log.parse_loss_line("epoch: 1 step: 3, total_loss: 1.0") is None


def test_after_a_bad_step_the_latest_checkpoint_is_the_last_sane_one(tmp_path):
    variable = tf.Variable(0.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), str(tmp_path), max_to_keep=10,
                                         checkpoint_name="ckpt")
    for step in (2, 4, 6, 8):
        manager.save(checkpoint_number=step)
    # A bad loss at step 7 was computed from ckpt-6's weights: ckpt-6 and later are dropped from the state.
    advice = checkpointing.resume_advice(manager, str(tmp_path), 6, True, str(tmp_path))
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-4")
    assert checkpoint_steps_in(str(tmp_path)) == [2, 4]
    assert advice.startswith(f"The latest checkpoint is now {tmp_path / 'ckpt-4'}")
    reloaded = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), str(tmp_path), max_to_keep=10,
                                          checkpoint_name="ckpt")
    assert "No checkpoint holds sane weights: use a new --model_dir" in checkpointing.resume_advice(
        reloaded, str(tmp_path), 1, True, str(tmp_path))
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-4")  # nothing better to offer


def test_weights_are_finite():
    model = keras.Sequential([keras.Input([3]), keras.layers.Dense(2)])
    assert checkpointing.weights_are_finite(model)
    model.layers[0].bias.assign([0.0, float("inf")])
    assert not checkpointing.weights_are_finite(model)


def test_resume_config_check_refuses_model_changes_and_allows_schedule_changes():
    saved = presets.tiny()
    longer = config_lib.replace(saved, **{"train.total_steps": 5000, "data.train_batch_size": 8})
    assert sorted(checkpointing.check_resume_config(saved, longer, "DIR")) == [
        "data.train_batch_size: 4 -> 8", "train.total_steps: 1000 -> 5000"]
    with pytest.raises(ValueError, match="model.num_classes"):
        checkpointing.check_resume_config(saved, config_lib.replace(saved, **{"model.num_classes": 5}), "DIR")
    with pytest.raises(ValueError, match="data.category_ids"):
        checkpointing.check_resume_config(saved, config_lib.replace(saved, **{"data.category_ids": (1, 2, 4)}), "DIR")


def test_get_strategy_by_name_and_clear_errors(monkeypatch):
    assert isinstance(distribute.get_strategy("one_device"), tf.distribute.OneDeviceStrategy)
    mirrored = distribute.get_strategy("mirrored")
    # tests/conftest.py splits the CPU into 2 logical devices; a CPU-only mirrored run uses all of them.
    assert mirrored.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(ValueError, match="one_device | mirrored"):
        distribute.get_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.get_strategy("multi_worker_mirrored")


@pytest.mark.parametrize("setting, cpu_devices, expected", [
    (distribute.AUTO_INTER_OP_THREADS, 1, 1),  # one CPU device: one op at a time
    (distribute.AUTO_INTER_OP_THREADS, 2, 0),  # logical CPU replicas run side by side: TF's default
    (0, 1, 0), (3, 1, 3)])
def test_configure_host_threads(setting, cpu_devices, expected):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("the automatic rule keeps TF's default on GPU hosts")
    # A fresh process: the thread count can only be set before TensorFlow's runtime starts.
    code = ("import sys; from maskrcnn_tf import distribute; import tensorflow as tf; "
            f"distribute.configure_cpu_devices({cpu_devices}); "
            f"print(distribute.configure_host_threads({setting}), "
            "tf.config.threading.get_inter_op_parallelism_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(expected), str(expected)]
    with pytest.raises(ValueError, match="inter_op_threads"):
        distribute.configure_host_threads(-2)


# ------------------------------------------------------------------------------------ processes


def test_train_on_coco_writes_run_dir_and_loss_log(coco_run, coco_records):
    model_dir, proc = coco_run
    # One line per step (log_every_steps=1), global steps 1..COCO_STEPS, all in epoch 1 or later.
    assert loss_log_steps(model_dir) == list(range(1, COCO_STEPS + 1))
    # 8 records / batch 2 = 4 steps per epoch: step 5 is the first of epoch 2.
    with open(os.path.join(model_dir, run_dir.LOSS_LOG)) as f:
        epochs = [loss_log.parse_loss_line(line)[0] for line in f]
    assert epochs == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    cfg = run_dir.load_config(model_dir)
    with open(os.path.join(model_dir, run_dir.LABEL_MAP_FILE)) as f:
        label_map = json.load(f)
    assert cfg.model.num_classes == len(label_map) == len(cfg.data.category_ids) == len(cfg.data.class_names)
    assert cfg.data.category_ids == tuple(e["id"] for e in sorted(label_map, key=lambda e: e["contiguous_id"]))
    assert cfg.model.image_size == (128, 128) and cfg.train.total_steps == COCO_STEPS
    # keep_checkpoints of the tiny preset (5) of the checkpoints every 2 steps.
    assert checkpoint_steps(model_dir) == [2, 4, 6, 8, 10]
    # TensorBoard scalars (written without the tensorboard package): one per logged step and tag.
    scalars = {}
    for path in tf.io.gfile.glob(os.path.join(model_dir, run_dir.TENSORBOARD_DIR, "train", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                scalars.setdefault(value.tag, []).append(event.step)
    assert scalars["loss/total_loss"] == scalars["learning_rate"] == list(range(1, COCO_STEPS + 1))
    assert {f"loss/{name}" for name in loss_log.LOSS_LOG_NAMES} <= set(scalars)
    assert re.search(r"steps/s [\d.]+ images/s", proc.stdout)
    assert f"done: global step {COCO_STEPS}" in proc.stdout
    # No Python INFO lines (absl's "I<mmdd> <time> <thread> <file>.py:<line>]", e.g. one "Sharding callback
    # duration" per checkpoint save) among the progress lines.
    assert not re.search(r"^I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", proc.stderr, re.M), proc.stderr[-2000:]


@pytest.mark.slow
def test_resume_after_kill_9_ends_at_the_same_step_and_never_goes_back(coco_run, coco_records, tmp_path):
    reference_dir, _ = coco_run
    model_dir = str(tmp_path / "killed")
    args = coco_args(coco_records, model_dir)
    process = subprocess.Popen([sys.executable, TRAIN_PY, *args], env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    state_file = os.path.join(model_dir, run_dir.CHECKPOINT_DIR, "checkpoint")
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not os.path.exists(state_file) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(checkpoint_steps(model_dir))
    assert 2 <= killed_at < COCO_STEPS

    proc = run_train(args)
    match = re.search(r"resuming from \S+: global step (\d+), epoch (\d+)", proc.stdout)
    assert match, proc.stdout
    resumed_step = int(match.group(1))
    assert resumed_step >= killed_at  # nothing before the last checkpoint is lost
    steps = loss_log_steps(model_dir)
    # The resume line's epoch is loss.log's for the same step (1-based, 4 steps per epoch).
    with open(os.path.join(model_dir, run_dir.LOSS_LOG), encoding="utf-8") as f:
        epochs = {step: epoch for epoch, step, _ in map(loss_log.parse_loss_line, f)}
    assert int(match.group(2)) == epochs[resumed_step] == (resumed_step - 1) // 4 + 1
    assert steps == loss_log_steps(reference_dir) == list(range(1, COCO_STEPS + 1))  # no step twice, none back
    assert max(checkpoint_steps(model_dir)) == max(checkpoint_steps(reference_dir)) == COCO_STEPS

    # The same directory with another model configuration is refused in one line (before building).
    changed = run_train(args + ["--image_size=192x192"], check=False)
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    assert "different model configuration" in changed.stderr and "model.image_size" in changed.stderr


@pytest.mark.slow
def test_sigterm_saves_the_step_in_flight_and_the_same_command_resumes(coco_records, tmp_path):
    # SIGTERM is what a preempted VM or a moved pod gets; SIGINT takes the same path (tests/test_stop_signals.py).
    model_dir = str(tmp_path / "preempted")
    loss_log = os.path.join(model_dir, run_dir.LOSS_LOG)
    no_periodic_saves = "--params_override=train.checkpoint_every_steps=1000"  # every checkpoint here is the signal's
    # SIG_DFL: a signal the parent ignores would stay ignored in the child (stop_signals.py).
    process = subprocess.Popen([sys.executable, TRAIN_PY, *coco_args(coco_records, model_dir, 1000, no_periodic_saves)],
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        if os.path.exists(loss_log) and open(loss_log, encoding="utf-8").read().count("\n") >= 3:
            process.send_signal(signal.SIGTERM)  # after 3 logged steps: training runs, the handler is in place
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    match = re.fullmatch(r"stopped: SIGTERM at global step (\d+): saved checkpoint (\S+); run the same command "
                         r"again to resume", stderr.strip().splitlines()[-1])
    assert match, stderr[-3000:]
    step, checkpoint = int(match.group(1)), match.group(2)
    assert step >= 3 and checkpoint == run_dir.latest_checkpoint(model_dir)
    assert checkpoint_steps(model_dir) == [step]  # saved at the step it stopped at
    assert loss_log_steps(model_dir) == list(range(1, step + 1))  # and that step is logged

    proc = run_train(coco_args(coco_records, model_dir, step + 2, no_periodic_saves))
    assert f"resuming from {checkpoint}: global step {step}," in proc.stdout
    assert loss_log_steps(model_dir) == list(range(1, step + 3))  # nothing lost, nothing trained twice


@pytest.mark.slow
def test_exploding_loss_stops_and_the_advice_resumes_from_a_sane_checkpoint(coco_records, tmp_path):
    model_dir = str(tmp_path / "explode")
    # The case: --learning_rate=1e3. A 3-step warmup from 1e-5 x peak trains the first steps at a
    # sane rate (0.01), then the updates blow the weights up: the loss explodes (finite but > 1e4 x its
    # running median) or turns NaN/inf. Before the guard, a checkpoint with weights near 1e21 was saved
    # after a finite loss of 6.8e19 and the advised re-run failed again at the same step.
    args = [f"--train_file_pattern={coco_records}", f"--model_dir={model_dir}", "--train_steps=12", *SMALL_MODEL,
            "--params_override=train.warmup_steps=3", "--params_override=train.warmup_factor=1e-5",
            "--params_override=train.checkpoint_every_steps=1", "--params_override=train.log_every_steps=1"]
    proc = run_train(args + ["--learning_rate=1e3"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    match = re.match(r"error: (?:non-finite loss at global step (\d+): ([a-z_, ]+)|exploding loss at global step "
                     r"(\d+): total_loss (\S+) > 10000 x its running median (\S+));", last)
    assert match, proc.stderr[-2000:]
    if match.group(1):
        bad_step = int(match.group(1))
        assert "total_loss" in match.group(2).split(", ")
    else:
        bad_step = int(match.group(3))
        assert float(match.group(4)) > 1e4 * float(match.group(5))
    saved = checkpoint_steps(model_dir)
    # ckpt-(bad - 1) holds the weights that produced the bad loss: no longer the one a re-run resumes from.
    assert saved and max(saved) == bad_step - 2, (saved, bad_step, last)
    latest = run_dir.latest_checkpoint(model_dir)
    assert f"The latest checkpoint is now {latest}" in last and "lower --learning_rate" in last
    assert all(step < bad_step for step in loss_log_steps(model_dir))
    from maskrcnn_tf.model import build_model

    model = build_model(run_dir.load_config(model_dir))
    run_dir.restore_weights(model, latest)  # complete, loadable, and sane
    assert checkpointing.weights_are_finite(model)
    assert max(float(np.abs(v.numpy()).max()) for v in model.trainable_variables) < 1e6

    # A crash during a save leaves "<prefix>_temp/": the next start removes it.
    unfinished = os.path.join(model_dir, run_dir.CHECKPOINT_DIR, f"ckpt-{bad_step + 5}_temp")
    os.makedirs(unfinished)
    open(os.path.join(unfinished, "part-00000-of-00001.data-00000-of-00001"), "wb").close()
    # The advice works: the same command with a lower rate resumes from that checkpoint and finishes.
    resumed = run_train(args + ["--learning_rate=0.01", f"--train_steps={bad_step + 1}"])
    assert f"removed {unfinished}: an unfinished checkpoint save" in resumed.stdout and not os.path.exists(unfinished)
    assert f"resuming from {latest}: global step {bad_step - 2}" in resumed.stdout
    assert max(checkpoint_steps(model_dir)) == bad_step + 1


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus(coco_records, tmp_path):
    model_dir = str(tmp_path / "mirrored")
    proc = run_train([f"--train_file_pattern={coco_records}", f"--model_dir={model_dir}", "--train_steps=2",
                      *SMALL_MODEL, "--strategy=mirrored", "--params_override=train.log_every_steps=1"],
                     env=_env(**{distribute.CPU_DEVICES_ENV: "2"}))
    assert "2 replica(s) on 2 x CPU (MirroredStrategy)" in proc.stdout
    # The start-up line names the resolved choices (CPU replicas: the CPU techniques are on).
    assert "execution: float32, no XLA, padding trimmed per batch, 1 step(s) per loop" in proc.stdout
    assert loss_log_steps(model_dir) == [1, 2] and checkpoint_steps(model_dir) == [2]


@pytest.fixture(scope="module")
def shapes_records(tmp_path_factory):
    """Records of 4 generated shapes images (no ../shared needed)."""
    from maskrcnn_tf.data.coco_converter import convert_coco
    from maskrcnn_tf.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    paths = make_shapes_dataset(str(root / "shapes"), num_train=4, num_val=0, image_size=96, seed=5)
    convert_coco(paths["train_images"], paths["train_annotations"], str(root / "train"), num_shards=1,
                 progress=False)
    return str(root / "train-*")


def test_mirrored_without_a_gpu_or_cpu_split_is_a_one_line_error(shapes_records, tmp_path):
    # Before: TensorFlow without CUDA (or CUDA failing to load, its warning hidden) made --strategy=mirrored
    # train on one CPU with every CPU-only technique on; only "1 replica(s)" hinted at it.
    proc = run_train([f"--train_file_pattern={shapes_records}", f"--model_dir={tmp_path / 'run'}", *SMALL_MODEL,
                      "--strategy=mirrored"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "--strategy=mirrored: TensorFlow sees no GPU" in last and "MASKRCNN_TF_CPU_DEVICES=N" in last


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_two_local_workers(coco_records, tmp_path):
    model_dir = str(tmp_path / "multi_worker")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    args = [f"--train_file_pattern={coco_records}", f"--model_dir={model_dir}", "--train_steps=3", *SMALL_MODEL,
            "--strategy=multi_worker_mirrored", "--params_override=train.log_every_steps=1"]
    # What a killed earlier run of worker 1 left behind: its scratch checkpoints, emptied at the start.
    scratch = distribute.worker_scratch_dir(model_dir, "worker", 1)
    os.makedirs(scratch, exist_ok=True)
    open(os.path.join(scratch, "ckpt-99.data-00000-of-00001"), "wb").close()
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen([sys.executable, TRAIN_PY, *args], env=_env(TF_CONFIG=tf_config),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=PROCESS_TIMEOUT) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "2 replica(s) on 1 x CPU on each of 2 workers (CollectiveAllReduceStrategy)" in outputs[0][0]
    assert "done: global step 3" in outputs[1][0]  # the other worker ran to the end as well
    assert loss_log_steps(model_dir) == [1, 2, 3] and checkpoint_steps(model_dir) == [3]  # chief only
    assert f"removed {scratch}: scratch checkpoints of an earlier run" in outputs[1][0]  # emptied at the start
    assert not os.path.exists(scratch)  # and removed at the end


@pytest.fixture(scope="module")
def pothole_records(coco_sample, tmp_path_factory):
    sample = coco_sample("potholes")
    prefix = str(tmp_path_factory.mktemp("pothole_records") / "valid")
    return _convert(sample.image_dir, sample.annotation_file, prefix, 1, COCO_IMAGES)


def test_fine_tune_80_class_checkpoint_into_1_class_run(coco_run, pothole_records, coco_sample, tmp_path):
    from maskrcnn_tf.data.shapes import CATEGORIES
    from maskrcnn_tf.model import build_model

    real = coco_sample("coco_tiny/train").real
    assert coco_sample("potholes").real == real  # ../shared has both or neither
    source_dir, _ = coco_run
    source_cfg = run_dir.load_config(source_dir)
    assert source_cfg.model.num_classes == (80 if real else len(CATEGORIES))  # the stand-in: 3 shapes classes
    target_dir = str(tmp_path / "potholes")
    args = [f"--train_file_pattern={pothole_records}", f"--model_dir={target_dir}", "--train_steps=2",
            *SMALL_MODEL, f"--init_checkpoint={source_dir}", "--params_override=train.log_every_steps=1"]
    proc = run_train(args)
    assert re.search(r"\d+ variables restored, 6 kept at their fresh initialisation", proc.stdout)
    not_restored = sorted(re.findall(r"not restored: (\S+)", proc.stdout))
    # Exactly the class-specific layers (kernel and bias each; keys seen with tf.train.list_variables):
    # box classifier [64, 81] -> [64, 2], box regressor [64, 324] -> [64, 8], mask predictor 80 -> 1
    # (from 3 classes on the stand-in: [64, 4], [64, 12], 3).
    assert not_restored == sorted(f"mask_rcnn/{layer}/{kind}" for kind in ("kernel", "bias") for layer in
                                  ("box_head/classifier", "box_head/box_regressor", "mask_head/predictor"))
    assert loss_log_steps(target_dir) == [1, 2]
    target_cfg = run_dir.load_config(target_dir)
    assert target_cfg.model.num_classes == 1
    assert target_cfg.data.class_names == (("pothole",) if real else (STANDIN_ONE_CLASS_NAME,))

    # In process: after loading (before any step), shared weights equal the source's.
    model = build_model(target_cfg)
    restored, skipped = checkpointing.load_matching_weights(model, source_dir)
    reader = tf.train.load_checkpoint(run_dir.latest_checkpoint(source_dir))
    by_path = run_dir.variables_by_path(model)
    for stage in ("backbone", "fpn", "rpn_head"):
        variables = getattr(model, stage).variables
        assert variables and all(v.path in restored for v in variables), stage
        for v in variables:
            np.testing.assert_array_equal(v.numpy(), reader.get_tensor(run_dir.checkpoint_key(v.path)))
    skipped_paths = {s.split(" ")[0] for s in skipped}
    class_specific = [p for p, v in by_path.items() if p in skipped_paths]
    assert len(class_specific) == 6
    for path in class_specific:
        source_shape = reader.get_variable_to_shape_map()[run_dir.checkpoint_key(path)]
        assert tuple(by_path[path].shape) != tuple(source_shape)  # 1-class shape, not the source's


def test_wrong_flags_give_one_line_errors(tmp_path):
    bad_size = run_train(["--train_file_pattern=/nonexistent/x-*", f"--model_dir={tmp_path}", "--image_size=12"],
                         check=False)
    no_files = run_train(["--train_file_pattern=/nonexistent/x-*", f"--model_dir={tmp_path}", "--num_classes=2"],
                         check=False)
    for proc, message in ((bad_size, "--image_size='12': expected HxW"), (no_files, "no files match")):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # six train.py start-ups
def test_no_records_empty_pattern_and_a_file_as_model_dir_are_one_line_errors_not_the_demo(tmp_path):
    # Zero records (an empty shard next to its label map) used to hang forever; an empty
    # --train_file_pattern= (an unset shell variable) used to train the demo into --model_dir.
    (tmp_path / "empty-00000-of-00001.tfrecord").write_bytes(b"")
    (tmp_path / "empty_label_map.json").write_text(json.dumps([{"id": 1, "contiguous_id": 1, "name": "a"}]))
    empty = str(tmp_path / "empty-*.tfrecord")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [
        ([f"--train_file_pattern={empty}", f"--model_dir={tmp_path / 'm1'}"], f"no records in {empty!r}"),
        (["--train_file_pattern=", f"--model_dir={tmp_path / 'm2'}"], "--train_file_pattern is empty"),
        ([f"--model_dir={tmp_path / 'm3'}"], "--train_file_pattern is required"),
        ([f"--train_file_pattern={empty}", f"--model_dir={a_file}"], f"--model_dir={a_file}: exists and is not"),
        (["--train_file_pattern=/nonexistent/x-*", f"--model_dir={tmp_path / 'm4'}"],
         "no files match '/nonexistent/x-*'"),  # not "no label map found"
        (["--demo", f"--train_file_pattern={empty}"], "--demo makes its own data; drop --train_file_pattern"),
    ]
    for args, message in cases:
        proc = run_train(args, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert message in proc.stderr.strip().splitlines()[-1], (args, proc.stderr[-2000:])
    assert sorted(os.listdir(tmp_path)) == ["a_file", "empty-00000-of-00001.tfrecord", "empty_label_map.json"]
    assert a_file.read_text() == "not a directory"


# ------------------------------------------ the whole chain on real COCO images (or their stand-in)


def _run_program(script, *args):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / script), *args], capture_output=True, text=True,
                          env=_env(), timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_coco_chain_train_eval_export_predict(coco_run, coco_sample, tmp_path):
    """The programs people run, one after the other on real COCO images (coco_tiny, or its stand-in): the
    run trained by train.py (coco_run) is evaluated, exported and used to draw predictions."""
    model_dir, _ = coco_run
    val = coco_sample("coco_tiny/val")
    val_json = val.annotation_file
    val_records = _convert(val.image_dir, val_json, str(tmp_path / "val"), 1, max_images=4)

    proc = _run_program("eval.py", f"--model_dir={model_dir}", f"--eval_file_pattern={val_records}",
                        f"--val_json={val_json}")
    # pycocotools' first table line, printed once for bbox and once for segm (or zeros if nothing found).
    table_line = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"
    assert proc.stdout.count(table_line) == 2 or "no detections" in proc.stdout + proc.stderr
    metrics = json.load(open(os.path.join(model_dir, run_dir.EVAL_DIR, "metrics.json")))
    assert "segm/AP" in metrics["metrics"] and os.path.exists(
        os.path.join(model_dir, run_dir.EVAL_DIR, "detections.json"))

    export_dir = str(tmp_path / "export")
    _run_program("export.py", f"--model_dir={model_dir}", f"--export_dir={export_dir}")
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))

    image = sorted(val.image_dir.iterdir())[0]
    out_dir = tmp_path / "predictions"
    _run_program("predict.py", f"--saved_model={export_dir}", f"--image={image}", f"--output_dir={out_dir}")
    assert (out_dir / (image.stem + ".png")).exists() and (out_dir / (image.stem + ".json")).exists()


# ------------------------------------------------------------------ accelerators (issue 14), on the CPU


@pytest.mark.slow
def test_mixed_float16_run_with_overflowing_steps_ends_at_train_steps(coco_records, tmp_path):
    # A starting loss scale of 2**24 overflows the float16 gradients of the first steps; each skipped
    # step halves the scale and still counts, so the run ends at exactly --train_steps.
    model_dir = str(tmp_path / "float16")
    proc = run_train(coco_args(coco_records, model_dir, 4, "--precision=mixed_float16",
                               "--params_override=train.initial_loss_scale=16777216"))
    skipped = re.search(r"loss scaling: (\d+) step\(s\) of this run had overflowing float16 gradients", proc.stdout)
    assert skipped and int(skipped.group(1)) >= 1, proc.stdout[-2000:]
    assert loss_log_steps(model_dir) == [1, 2, 3, 4]  # no "step: 0", none missing
    assert checkpoint_steps(model_dir) == [2, 4] and "done: global step 4" in proc.stdout
    reader = tf.train.load_checkpoint(run_dir.latest_checkpoint(model_dir))
    scale_key = next(k for k in reader.get_variable_to_shape_map() if "dynamic_scale" in k)
    assert reader.get_tensor(scale_key) <= 2.0**24 / 2 ** int(skipped.group(1))


@pytest.mark.slow
def test_one_worker_cluster_trains_through_the_distribute_script(coco_records, tmp_path):
    # NumPy 2 refused float() of the [1]-shaped step outputs that multi-worker runs return.
    model_dir = str(tmp_path / "one_worker")
    records_dir = os.path.dirname(coco_records)
    tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{_free_ports(1)[0]}"]},
                            "task": {"type": "worker", "index": 0}})
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "run_distribute_train.sh"), "--multi_worker",
                           records_dir, model_dir, "none", "--train_steps=2", *SMALL_MODEL,
                           "--params_override=train.log_every_steps=1"],
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
                          env=_env(TF_CONFIG=tf_config, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("1 replica(s) on 1 x CPU (CollectiveAllReduceStrategy)" in proc.stdout
            and "done: global step 2" in proc.stdout)
    assert loss_log_steps(model_dir) == [1, 2] and checkpoint_steps(model_dir) == [2]


@pytest.mark.slow
def test_steps_per_loop_keeps_log_lines_and_checkpoints_on_their_steps(coco_records, tmp_path):
    model_dir = str(tmp_path / "loops")
    args = [f"--train_file_pattern={coco_records}", f"--model_dir={model_dir}", *SMALL_MODEL,
            "--steps_per_loop=3", "--params_override=train.log_every_steps=3",
            "--params_override=train.checkpoint_every_steps=6"]
    run_train(args + ["--train_steps=6"])
    proc = run_train(args + ["--train_steps=9"])  # resumed; 4 steps per epoch, so epochs end inside loops
    assert "resuming from" in proc.stdout and "done: global step 9" in proc.stdout
    assert loss_log_steps(model_dir) == [3, 6, 9] and checkpoint_steps(model_dir) == [6, 9]
    with open(os.path.join(model_dir, run_dir.LOSS_LOG)) as f:
        assert [loss_log.parse_loss_line(line)[0] for line in f] == [1, 2, 3]  # 1-based epoch of each step
    bad = run_train(args + ["--train_steps=8"], check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "train.total_steps=8" in bad.stderr and "multiple of train.steps_per_loop=3" in bad.stderr


def test_tpu_and_jit_compile_refuse_crop_and_resize_in_one_line(coco_records, tmp_path):
    tpu = run_train([f"--train_file_pattern={coco_records}", f"--model_dir={tmp_path}", "--strategy=tpu",
                     "--params_override=model.roi.roi_align_backend=crop_and_resize"], check=False)
    jit = run_train([f"--train_file_pattern={coco_records}", f"--model_dir={tmp_path}", "--jit_compile"],
                    check=False)
    for proc, message in ((tpu, "--strategy=tpu cannot run model.roi.roi_align_backend=crop_and_resize"),
                          (jit, "train.jit_compile=True is not allowed")):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert message in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------ fine-tuning keeps the init run's conventions


def _write_run(model_dir, cfg, model=None):
    """A run directory with config.json and ckpt-0 (the model's weights, or an empty stand-in index)."""
    os.makedirs(os.path.join(model_dir, run_dir.CHECKPOINT_DIR), exist_ok=True)
    config_lib.save_json(cfg, os.path.join(model_dir, run_dir.CONFIG_FILE))
    if model is None:
        open(os.path.join(model_dir, run_dir.CHECKPOINT_DIR, "ckpt-0.index"), "wb").close()
        return
    manager = tf.train.CheckpointManager(run_dir.make_checkpoint(model),
                                         os.path.join(model_dir, run_dir.CHECKPOINT_DIR), max_to_keep=1,
                                         checkpoint_name="ckpt")
    manager.save(checkpoint_number=0)


def test_fine_tuning_takes_the_init_runs_model_settings_and_guards_its_conventions(tmp_path, capsys):
    from maskrcnn_tf.programs import train as train_program

    init_dir = str(tmp_path / "imported")
    init_cfg = config_lib.get_preset("torchvision_maskrcnn_r50_fpn")  # what import_weights.py writes
    _write_run(init_dir, init_cfg)
    assert train_program.init_run_config(init_dir + "/checkpoints/ckpt-0")[0] == init_dir
    preset = config_lib.get_preset("coco_r50_fpn_1x")
    cfg = train_program.fine_tune_config(preset, init_cfg, {}, init_dir, force=False)
    # Before: the default preset's conventions (stride, BN epsilon, anchors, normalisation) with
    # torchvision's weights, and an ImageNet download first.
    assert cfg.model == config_lib.replace(init_cfg, **{"model.backbone.weights": None}).model
    assert cfg.train == preset.train and cfg.data == preset.data  # the recipe stays the preset's
    printed = capsys.readouterr().out
    assert f"init_checkpoint: model settings from {init_dir}/config.json" in printed
    assert "model.backbone.norm_epsilon" in printed and "model.backbone.weights: 'imagenet' -> None" in printed
    # A setting the weights depend on cannot change silently; other model settings can.
    with pytest.raises(ValueError, match=r"model\.backbone\.norm_epsilon: 0\.0 -> 1e-05.*--force_conventions"):
        train_program.fine_tune_config(preset, init_cfg, {"model.backbone.norm_epsilon": 1e-5}, init_dir, False)
    train_program.fine_tune_config(preset, init_cfg, {"model.detection.score_threshold": 0.3}, init_dir, False)
    train_program.fine_tune_config(preset, init_cfg, {"model.pixel_std": [1.0, 1.0, 1.0]}, init_dir, True)
    assert "init_checkpoint: forced model.pixel_std" in capsys.readouterr().out


def test_fine_tuning_without_config_uses_the_init_run_and_downloads_nothing(shapes_records, tmp_path):
    from maskrcnn_tf.model import build_model
    from tests.e2e.synthetic import tiny_test_config

    init_dir = str(tmp_path / "init")
    init_cfg = tiny_test_config(**{"model.num_classes": 5})
    _write_run(init_dir, init_cfg, build_model(init_cfg))
    target = str(tmp_path / "target")
    # No --config: the default preset is the R50 with ImageNet weights (a download, offline a traceback).
    proc = run_train([f"--train_file_pattern={shapes_records}", f"--model_dir={target}", "--train_steps=1",
                      "--batch_size=2", f"--init_checkpoint={init_dir}"],
                     env=_env(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9"))
    assert f"init_checkpoint: model settings from {init_dir}/config.json" in proc.stdout
    assert re.search(r"initialised from \S+ckpt-0: \d+ variables restored", proc.stdout)
    written = run_dir.load_config(target)
    assert written.model.backbone.name == "tiny" and written.model.image_size == init_cfg.model.image_size
    assert written.model.backbone.weights is None


def test_pretrained_backbone_file_of_other_conventions_is_a_one_line_error(shapes_records, tmp_path):
    # torchvision's ImageNet ResNet wants the stride in the 3x3, eps 1e-5 and ImageNet pixel statistics;
    # the default preset has none of them. Checked from the file's kind before anything is read or built.
    proc = run_train([f"--train_file_pattern={shapes_records}", f"--model_dir={tmp_path / 'run'}",
                      f"--pretrained={tmp_path / 'resnet50-0676ba61.pth'}"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "is a torchvision ImageNet ResNet" in last and "model.pixel_mean" in last, last
    assert not (tmp_path / "run").exists()


def test_copy_paste_on_box_only_records_is_a_one_line_error(tmp_path):
    # Copy-paste pastes objects by their masks; box-only records (the TXT converter's) have none. Refused
    # in one line from the first record, before the strategy or the model exist.
    import cv2

    from maskrcnn_tf.data import schema

    encoded = cv2.imencode(".png", np.full((32, 32, 3), 50, np.uint8))[1].tobytes()
    record = schema.build_example(encoded=encoded, image_format="png", height=32, width=32, filename="a.png",
                                  source_id="1", boxes_norm_xyxy=np.array([[0.1, 0.1, 0.5, 0.5]]), labels=[1],
                                  texts=["a"], is_crowd=[0], areas=[1.0], png_masks=None)
    records = str(tmp_path / "boxes-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(records) as writer:
        writer.write(record.SerializeToString())
    proc = run_train([f"--train_file_pattern={records}", f"--model_dir={tmp_path / 'run'}", "--num_classes=1",
                      "--config=tiny", "--train_steps=1", "--params_override=data.copy_paste_probability=0.5"],
                     check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.copy_paste_probability=0.5 needs masks" in last and "have none" in last, last
    assert not (tmp_path / "run").exists()
