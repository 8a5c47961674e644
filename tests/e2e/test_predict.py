"""predict.py / predictor.py: pictures and JSON per image, bad files reported and skipped.

A tiny random-weight model (score threshold 0 so it detects something) is saved as a model directory the
way train.py writes one (config.json + checkpoints/ckpt-N); predict.py runs on it in a subprocess.
"""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_util

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import run_dir
from maskrcnn_tf.model import build_model
from maskrcnn_tf.predictor import Predictor
from maskrcnn_tf.programs import launch
from tests.conftest import REPO_ROOT
from tests.e2e.synthetic import tiny_test_config

CATEGORY_IDS = (3, 7, 9)
CLASS_NAMES = ("rectangle", "ellipse", "triangle")
TOLERANCE = 1e-4  # boxes/scores of the subprocess vs this process (same graph, same weights)
SIZES = {"a.png": (90, 150), "b.jpg": (120, 70)}
CHECKPOINT_STEP = 7


def _image(size, seed):
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
    cv2.rectangle(image, (w // 8, h // 6), (w // 2, h // 2), (230, 60, 60), -1)
    return image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    cfg = tiny_test_config(**{"model.detection.score_threshold": 0.0, "data.category_ids": CATEGORY_IDS,
                              "data.class_names": CLASS_NAMES})
    model = build_model(cfg)
    directory = tmp / "run"
    os.makedirs(directory)
    config_lib.save_json(cfg, str(directory / run_dir.CONFIG_FILE))
    manager = tf.train.CheckpointManager(run_dir.make_checkpoint(model), str(directory / run_dir.CHECKPOINT_DIR),
                                         max_to_keep=1, checkpoint_name="ckpt")
    manager.save(checkpoint_number=CHECKPOINT_STEP)
    for seed, (name, size) in enumerate(SIZES.items()):
        cv2.imwrite(str(tmp / name), _image(size, seed)[..., ::-1])  # cv2 writes BGR
    (tmp / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")  # JPEG magic, broken data
    return tmp


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_predict_cli_writes_png_and_json_and_skips_bad_file(model_dir):
    out = model_dir / "out"
    images = [str(model_dir / "a.png"), str(model_dir / "bad.jpg"), str(model_dir / "b.jpg")]
    run = _run([str(REPO_ROOT / "predict.py"), f"--model_dir={model_dir / 'run'}", f"--output_dir={out}",
                "--score_threshold=0.0"] + [f"--image={p}" for p in images], cwd=model_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"skipped {model_dir / 'bad.jpg'}" in run.stderr and "not a decodable image" in run.stderr
    assert sorted(os.listdir(out)) == ["a.json", "a.png", "b.json", "b.png"]

    predictor = Predictor.from_model_dir(str(model_dir / "run"))
    for name, (h, w) in SIZES.items():
        stem = os.path.splitext(name)[0]
        picture = cv2.imread(str(out / f"{stem}.png"))[..., ::-1]
        original = cv2.imread(str(model_dir / name))[..., ::-1]  # OpenCV: PIL's pixels (accurate IDCT)
        assert picture.shape == (h, w, 3)
        assert (picture != original).any()  # detections were drawn
        record = json.loads((out / f"{stem}.json").read_text())
        assert (record["height"], record["width"]) == (h, w) and record["image"].endswith(name)

        expected = predictor.predict(original)
        detections = record["detections"]
        assert len(detections) == len(expected["scores"]) > 0  # threshold 0 keeps them all
        for det, box, score, cid, cls, mask in zip(detections, expected["boxes"], expected["scores"],
                                                   expected["category_ids"], expected["classes"],
                                                   expected["masks"]):
            y1, x1, y2, x2 = box
            np.testing.assert_allclose(det["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=TOLERANCE)  # COCO xywh
            assert abs(det["score"] - score) < TOLERANCE
            assert det["category_id"] == cid and cid in CATEGORY_IDS
            assert det["category_name"] == CLASS_NAMES[cls - 1] == CLASS_NAMES[CATEGORY_IDS.index(cid)]
            np.testing.assert_array_equal(mask_util.decode(det["segmentation"]), mask)  # RLE of the pasted mask


def test_jpeg_and_a_png_of_its_pil_pixels_give_identical_detections(model_dir, tmp_path):
    """predict.py's steps (Predictor.from_model_dir, predict_files) on b.jpg and on a lossless PNG holding
    PIL's decode of it (torchvision's and detectron2's pixels): the same JSON and drawing, bit for bit."""
    Image = pytest.importorskip("PIL.Image", reason="PIL (a torchvision dependency) is the reference decoder")
    from maskrcnn_tf.predictor import predict_files

    pil = np.asarray(Image.open(model_dir / "b.jpg").convert("RGB"))
    Image.fromarray(pil).save(tmp_path / "b_pil.png")
    predictor = Predictor.from_model_dir(str(model_dir / "run"))
    predict_files(predictor, [str(model_dir / "b.jpg"), str(tmp_path / "b_pil.png")], str(tmp_path / "out"),
                  score_threshold=0.0)
    jpeg, png = (json.loads((tmp_path / "out" / f"{stem}.json").read_text()) for stem in ("b", "b_pil"))
    assert len(jpeg["detections"]) > 0 and jpeg["detections"] == png["detections"]
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "b.png")),
                                  cv2.imread(str(tmp_path / "out" / "b_pil.png")))


def test_predict_cli_reports_a_missing_saved_model(model_dir):
    run = _run([str(REPO_ROOT / "predict.py"), f"--saved_model={model_dir / 'missing'}",
                f"--output_dir={model_dir / 'out2'}", f"--image={model_dir / 'bad.jpg'}"], cwd=model_dir)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "not a SavedModel" in run.stderr
    if not os.path.exists(launch.NVIDIA_DRIVER):
        # Without a GPU driver, TensorFlow's start-up lines (a cuInit "error ... (303)" among them) are
        # dropped: the error is the only line.
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_export_cli_reports_missing_checkpoint(tmp_path):
    config_lib.save_json(tiny_test_config(), str(tmp_path / run_dir.CONFIG_FILE))
    run = _run([str(REPO_ROOT / "export.py"), f"--model_dir={tmp_path}", f"--export_dir={tmp_path / 'e'}"],
               cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "no checkpoint" in run.stderr


def test_read_image_says_empty_file(tmp_path):
    from maskrcnn_tf.predictor import read_image

    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="^empty file$"):
        read_image(str(tmp_path / "empty.jpg"))
    (tmp_path / "one.png").write_bytes(cv2.imencode(".png", np.zeros((3, 5, 3), np.uint8))[1].tobytes())
    assert read_image(str(tmp_path / "one.png")).shape == (3, 5, 3)  # the check does not refuse real files



def test_coco_json_of_a_folder_loads_in_pycocotools_with_the_annotation_files_ids(model_dir, tmp_path):
    from pycocotools.coco import COCO

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in SIZES:
        (folder / name).write_bytes((model_dir / name).read_bytes())
    (folder / "notes.txt").write_text("not an image: not listed")
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({"images": [{"id": 42, "file_name": "sub/a.png", "height": 90, "width": 150},
                                                  {"id": 7, "file_name": "b.jpg", "height": 120, "width": 70}]}))
    out = tmp_path / "out"
    run = _run([str(REPO_ROOT / "predict.py"), f"--model_dir={model_dir / 'run'}", f"--output_dir={out}",
                f"--image={folder}", "--format=coco_json", f"--image_ids_from={annotations}",
                "--score_threshold=0.0"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 of 2 images done" in run.stdout and sorted(os.listdir(out)) == ["images.json", "results.json"]
    coco = COCO(str(out / "images.json"))
    results = coco.loadRes(str(out / "results.json"))  # pycocotools checks every image_id is known
    predictor = Predictor.from_model_dir(str(model_dir / "run"))
    for name, image_id in (("a.png", 42), ("b.jpg", 7)):
        anns = results.loadAnns(results.getAnnIds(imgIds=[image_id]))
        expected = predictor.predict(cv2.imread(str(model_dir / name))[..., ::-1])
        assert len(anns) == len(expected["scores"]) > 0
        for ann, box, mask, cid in zip(anns, expected["boxes"], expected["masks"], expected["category_ids"]):
            y1, x1, y2, x2 = box
            np.testing.assert_allclose(ann["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=TOLERANCE)
            assert ann["category_id"] == cid
            np.testing.assert_array_equal(results.annToMask(ann), mask)

    # An image the annotation file does not list: one line naming it, nothing written.
    annotations.write_text(json.dumps({"images": [{"id": 7, "file_name": "b.jpg"}]}))
    run = _run([str(REPO_ROOT / "predict.py"), f"--model_dir={model_dir / 'run'}", f"--output_dir={tmp_path / 'x'}",
                f"--image={folder}", "--format=coco_json", f"--image_ids_from={annotations}"], cwd=tmp_path)
    assert run.returncode == 1 and "a.png is not among its images (1 of 2 images missing)" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "x").exists()


def test_polygons_format_gives_the_masks_back_and_the_api_returns_the_same(model_dir, tmp_path):
    from maskrcnn_tf.polygons import multipolygon_to_mask

    out = tmp_path / "out"
    run = _run([str(REPO_ROOT / "predict.py"), f"--model_dir={model_dir / 'run'}", f"--output_dir={out}",
                f"--image={model_dir / 'a.png'}", "--format=polygons", "--score_threshold=0.0"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "a.json").read_text())
    predictor = Predictor.from_model_dir(str(model_dir / "run"))
    image = cv2.imread(str(model_dir / "a.png"))[..., ::-1]
    full = predictor.predict(image)
    api = predictor.predict(image, masks="polygons")
    assert len(record["detections"]) == len(full["masks"]) == len(api["polygons"]) > 0
    for detection, mask, geometry in zip(record["detections"], full["masks"], api["polygons"]):
        assert detection["segmentation"]["type"] == "MultiPolygon"
        np.testing.assert_array_equal(multipolygon_to_mask(detection["segmentation"], 90, 150), mask)
        np.testing.assert_array_equal(multipolygon_to_mask(geometry, 90, 150), mask)  # window-local, shifted
    bad = _run([str(REPO_ROOT / "predict.py"), f"--model_dir={model_dir / 'run'}", f"--output_dir={out}",
                f"--image={model_dir / 'a.png'}", "--format=svg"], cwd=tmp_path)
    assert bad.returncode == 1 and "--format" in bad.stderr and "Traceback" not in bad.stderr
