"""The run directory on a non-local filesystem: TensorFlow's in-memory ram:// stands in for gs:// (both
are reached only through tf.io.gfile). Train, resume, evaluation during training, export and
predictions all write there, and nothing lands on the local disk (os.makedirs("ram://x") would have
made a local folder "ram:/x")."""
import json
import os
import subprocess
import uuid

import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import distribute, loss_log, run_dir, training
from maskrcnn_tf.data.coco_converter import convert_coco
from maskrcnn_tf.data.shapes import make_shapes_dataset
from maskrcnn_tf.evaluation.run import DETECTIONS_FILE, METRICS_FILE
from tests.conftest import REPO_ROOT
from tests.e2e.synthetic import tiny_test_config


@pytest.fixture(scope="module")
def shapes_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("ram_run")
    paths = make_shapes_dataset(str(root / "shapes"), num_train=4, num_val=2, image_size=96, seed=5)
    records = {}
    for split in ("train", "val"):
        prefix = str(root / "records" / split)
        convert_coco(paths[f"{split}_images"], paths[f"{split}_annotations"], prefix, num_shards=1,
                     progress=False)
        records[split] = prefix + "-*"
    return records, paths, str(root / "records" / "train_label_map.json")


def _lines(path):
    with tf.io.gfile.GFile(path) as f:
        return f.read().splitlines()


@pytest.mark.slow
def test_train_resume_eval_export_predict_in_ram_filesystem(shapes_records, tmp_path, monkeypatch):
    from maskrcnn_tf.export import export_saved_model
    from maskrcnn_tf.predictor import Predictor, predict_files

    monkeypatch.chdir(tmp_path)  # a local "ram:" folder would appear here
    records, paths, label_map = shapes_records
    model_dir = f"ram://{uuid.uuid4().hex}/run"
    cfg = training.apply_label_map(tiny_test_config(**{
        "data.train_batch_size": 2, "data.eval_batch_size": 2, "train.total_steps": 2,
        "train.log_every_steps": 1, "train.checkpoint_every_steps": 1, "train.warmup_steps": 1}), label_map)
    strategy = distribute.get_strategy("one_device")
    val_json = f"{model_dir}-annotations/instances_val.json"  # pycocotools reads it through a local copy
    tf.io.gfile.makedirs(os.path.dirname(val_json))
    tf.io.gfile.copy(paths["val_annotations"], val_json)
    kwargs = dict(label_map_path=label_map, eval_file_pattern=records["val"], val_json=val_json,
                  eval_every_epochs=1, verbose=False)
    first = training.train(cfg, model_dir, records["train"], strategy, label_map_path=label_map, verbose=False)
    assert first["global_step"] == 2 and first["restored_from"] is None
    longer = training.train(config_lib.replace(cfg, **{"train.total_steps": 3}), model_dir, records["train"],
                            strategy, **kwargs)  # resume
    assert longer["restored_from"] == f"{model_dir}/checkpoints/ckpt-2" and longer["global_step"] == 3

    assert [loss_log.parse_loss_line(line)[1] for line in _lines(f"{model_dir}/{run_dir.LOSS_LOG}")] == [1, 2, 3]
    assert run_dir.load_config(model_dir).train.total_steps == 3
    assert json.loads("\n".join(_lines(f"{model_dir}/{run_dir.LABEL_MAP_FILE}")))
    assert run_dir.latest_checkpoint(model_dir) == f"{model_dir}/checkpoints/ckpt-3"
    assert tf.io.gfile.glob(f"{model_dir}/{run_dir.TENSORBOARD_DIR}/train/events.*")
    eval_dir = f"{model_dir}/{run_dir.EVAL_DIR}"
    metrics = json.loads("\n".join(_lines(f"{eval_dir}/{METRICS_FILE}")))
    assert metrics["num_images"] == 2 and "bbox/AP" in metrics["metrics"] and metrics["val_json"] == val_json
    assert isinstance(json.loads("\n".join(_lines(f"{eval_dir}/{DETECTIONS_FILE}"))), list)

    export_dir = export_saved_model(longer["model"], run_dir.load_config(model_dir), f"{model_dir}/export")
    assert tf.io.gfile.exists(f"{export_dir}/saved_model.pb")
    image = sorted(os.listdir(paths["val_images"]))[0]
    written, done = predict_files(Predictor.from_saved_model(export_dir), [os.path.join(paths["val_images"], image)],
                                  f"{model_dir}/predictions")
    assert done == 1 and len(written) == 2 and all(w.startswith("ram://") and tf.io.gfile.exists(w) for w in written)
    assert not any(name.startswith("ram") for name in os.listdir(tmp_path))


def test_worker_scratch_dir_is_fixed_per_run_and_task():
    a = distribute.worker_scratch_dir("runs/r50", "worker", 1)
    assert a == distribute.worker_scratch_dir(os.path.abspath("runs/r50"), "worker", 1)  # found again
    assert a != distribute.worker_scratch_dir("runs/r50", "worker", 2)
    assert a != distribute.worker_scratch_dir("runs/other", "worker", 1)
    assert distribute.worker_scratch_dir("gs://bucket/run", "worker", 1).startswith(os.path.dirname(a))


@pytest.mark.parametrize("script, args", [
    ("run_standalone_train.sh", ["gs://bucket/records", "gs://bucket/run", "none"]),
    ("run_distribute_train.sh", ["--multi_worker", "gs://bucket/records", "gs://bucket/run", "none"]),
    ("run_eval.sh", ["gs://bucket/run", "gs://bucket/records", "VAL_JSON"]),
])
def test_scripts_pass_a_url_model_dir_to_python_and_log_locally(script, args, tmp_path):
    # PYTHON=echo prints the command instead of running it: what matters is what the script does around it.
    val_json = tmp_path / "instances_val.json"
    val_json.write_text("{}")
    args = [str(val_json) if a == "VAL_JSON" else a for a in args]
    tf_config = '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}'
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / script), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHON="echo", TF_CONFIG=tf_config))
    assert proc.returncode == 0, proc.stderr
    assert "--model_dir=gs://bucket/run" in proc.stdout
    assert not (tmp_path / "gs:").exists()  # no local folder named after the URL
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert len(logs) == 1 and "--model_dir=gs://bucket/run" in (tmp_path / logs[0]).read_text()
