"""The public API: `import maskrcnn_tf` stays light and exports what a user needs; `maskrcnn_tf.load`
opens a run directory or a .keras file and predicts on paths, bytes and arrays, one or many;
`model.save("x.keras")` / `keras.saving.load_model` round-trip with equal outputs."""
import os
import subprocess
import sys

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

import maskrcnn_tf
from maskrcnn_tf import config as config_lib
from maskrcnn_tf import export as export_lib
from maskrcnn_tf import run_dir
from maskrcnn_tf.model import MaskRCNN, build_model, dummy_inputs
from tests.conftest import REPO_ROOT
from tests.e2e.synthetic import tiny_test_config

CATEGORY_IDS = (3, 7, 9)
CLASS_NAMES = ("rectangle", "ellipse", "triangle")
IMAGE_SIZE = (90, 150)  # original pixels, not the 128x128 model input: boxes must come back in these
TOLERANCE = 1e-5  # the same weights through two loading paths run the same graph code


def _randomize(model, seed=3):
    """Non-initial weights everywhere (zero biases would hide a weight that is not saved or restored)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(np.asarray(v.numpy() + rng.normal(scale=0.05, size=v.shape), v.dtype))


def _image():
    rng = np.random.default_rng(0)
    h, w = IMAGE_SIZE
    image = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
    cv2.rectangle(image, (w // 8, h // 6), (w // 2, h // 2), (230, 60, 60), -1)
    return image


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One randomised tiny model written as a run directory (as train.py writes one) and a .keras file."""
    tmp = tmp_path_factory.mktemp("api")
    keras.utils.set_random_seed(0)
    # The backbone's initial weights name a file that is gone (as on another machine after training):
    # building, restoring and loading never read it (weights/initial.py runs only for a fresh run).
    cfg = tiny_test_config(**{"model.detection.score_threshold": 0.0, "data.category_ids": CATEGORY_IDS,
                              "data.class_names": CLASS_NAMES,
                              "model.backbone.weights": str(tmp / "gone" / "backbone.weights.h5")})
    model = build_model(cfg)
    _randomize(model)
    run = tmp / "run"
    os.makedirs(run)
    config_lib.save_json(cfg, str(run / run_dir.CONFIG_FILE))
    tf.train.CheckpointManager(run_dir.make_checkpoint(model), str(run / run_dir.CHECKPOINT_DIR),
                               max_to_keep=1, checkpoint_name="ckpt").save(checkpoint_number=1)
    model.save(str(tmp / "model.keras"))
    cv2.imwrite(str(tmp / "image.png"), _image()[..., ::-1])  # cv2 writes BGR
    return {"tmp": tmp, "run": run, "keras": tmp / "model.keras", "model": model, "cfg": cfg}


def test_import_is_light_and_exports_the_public_names():
    code = ("import sys, maskrcnn_tf; assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "print(sorted(maskrcnn_tf.__all__))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("load", "MaskRCNN", "build_model", "Config", "tiny", "coco_r50_fpn_1x", "get_preset"):
        assert name in run.stdout
    assert maskrcnn_tf.MaskRCNN is MaskRCNN and maskrcnn_tf.build_model is build_model
    assert maskrcnn_tf.tiny().model.backbone.name == "tiny"
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        maskrcnn_tf.nonexistent  # noqa: B018


def test_keras_save_and_load_model_give_equal_outputs(saved):
    model, cfg = saved["model"], saved["cfg"]
    loaded = keras.saving.load_model(str(saved["keras"]))
    assert isinstance(loaded, MaskRCNN) and loaded.config == cfg
    assert len(loaded.weights) == len(model.weights)
    height, width = cfg.model.image_size
    inputs = dict(dummy_inputs(1, height, width), images=tf.random.stateless_normal([1, height, width, 3], [1, 2]))
    expected, actual = model(inputs), loaded(inputs)
    assert int(expected["num_detections"][0]) > 0  # something to compare
    for key in expected:
        np.testing.assert_allclose(actual[key].numpy(), expected[key].numpy(), atol=TOLERANCE, err_msg=key)
    # A freshly built model differs: the equality above comes from the saved weights.
    fresh = build_model(cfg)(inputs)
    assert not np.allclose(fresh["detection_scores"].numpy(), expected["detection_scores"].numpy())


def test_save_without_a_config_says_what_to_use(saved, tmp_path):
    model = build_model(saved["cfg"])
    model.config = None  # as a MaskRCNN assembled by hand from layers
    with pytest.raises(NotImplementedError, match="build_model or save_weights"):
        model.save(str(tmp_path / "x.keras"))


def test_load_predicts_paths_bytes_and_arrays_one_or_many(saved):
    path = str(saved["tmp"] / "image.png")
    image = _image()
    detector = maskrcnn_tf.load(saved["run"])
    one = detector.predict(image)
    n = len(one["scores"])
    assert n > 0 and one["boxes"].shape == (n, 4) and one["masks"].shape == (n,) + IMAGE_SIZE
    # Boxes are in the original pixels of the 90x150 image (the model saw it resized into 128x128).
    assert one["boxes"][:, 2].max() <= IMAGE_SIZE[0] + 1e-3 and one["boxes"][:, 3].max() <= IMAGE_SIZE[1] + 1e-3
    # The Keras model on the same input, its boxes divided by the resize scale per axis: 150 wide fits
    # 128, so the image becomes round(90 * 128 / 150) = 77 rows by 128 columns.
    images, info = export_lib.preprocess_image(tf.constant(image), saved["cfg"])
    raw = saved["model"]({"images": images[None], "image_info": info[None]})
    scale = np.array([77 / 90, 128 / 150] * 2)
    expected_boxes = np.minimum(raw["detection_boxes"].numpy()[0, :n] / scale, IMAGE_SIZE * 2)
    np.testing.assert_allclose(one["boxes"], expected_boxes, atol=1e-3)
    assert set(one["category_ids"].tolist()) <= set(CATEGORY_IDS)
    assert one["category_names"] == [CLASS_NAMES[CATEGORY_IDS.index(c)] for c in one["category_ids"]]
    many = detector.predict([path, open(path, "rb").read(), image])
    assert isinstance(many, list) and len(many) == 3
    stacked = detector.predict(np.stack([image, image]))
    for result in many + stacked:
        for key in ("boxes", "scores", "category_ids", "masks"):
            np.testing.assert_allclose(result[key], one[key], atol=TOLERANCE, err_msg=key)
    # The .keras file gives the same detections as the run directory.
    from_keras = maskrcnn_tf.load(saved["keras"]).predict(path)
    for key in ("boxes", "scores", "category_ids", "masks"):
        np.testing.assert_allclose(from_keras[key], one[key], atol=TOLERANCE, err_msg=key)
    drawn = detector.draw(path, one, str(saved["tmp"] / "drawn.png"), score_threshold=0.0)
    assert drawn.shape == IMAGE_SIZE + (3,) and (drawn != image).any()
    assert os.path.getsize(saved["tmp"] / "drawn.png") > 0


def test_load_and_predict_name_the_bad_input(saved, tmp_path):
    with pytest.raises(ValueError, match=f"load: {tmp_path / 'missing'}: not found"):
        maskrcnn_tf.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a run directory"):
        maskrcnn_tf.load(tmp_path)
    detector = maskrcnn_tf.load(saved["run"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ValueError, match=rf"predict: image 1: {bad}: not a decodable image"):
        detector.predict([_image(), str(bad)])
    with pytest.raises(ValueError, match="predict: 3 bytes: not a decodable image"):
        detector.predict(b"abc")
    with pytest.raises(ValueError, match=r"uint8 \[h, w, 3\] RGB array, got ndarray float32"):
        detector.predict(np.zeros((4, 4, 3), np.float32))


def test_load_of_a_saved_model_equals_the_run_directory(saved):
    export_dir = str(saved["tmp"] / "saved_model")
    export_lib.export_saved_model(saved["model"], saved["cfg"], export_dir)
    with pytest.raises(ValueError, match="checkpoint= applies to run directories only"):
        maskrcnn_tf.load(export_dir, checkpoint="ckpt-1")
    image = _image()
    expected = maskrcnn_tf.load(saved["run"]).predict(image)
    actual = maskrcnn_tf.load(export_dir).predict([image])[0]
    assert actual["category_names"] == expected["category_names"]
    for key in ("boxes", "scores", "category_ids", "masks"):
        np.testing.assert_allclose(actual[key], expected[key], atol=TOLERANCE, err_msg=key)


def test_predict_pastes_only_what_it_returns_equal_to_the_graphs_paste(saved):
    # The window paste of each returned detection equals the serving graph's full-size paste bit for bit.
    detector = maskrcnn_tf.load(str(saved["run"]))
    module = export_lib.ServingModule(saved["model"], saved["cfg"], include_pasted_masks=True)
    image = _image()
    graph = {k: v.numpy() for k, v in module.serve_tensor(tf.constant(image[None])).items()}
    n = int(graph["num_detections"][0])
    everything = detector.predict(image)
    assert n > 3 and len(everything["scores"]) == n and everything["num_below_threshold"] == 0
    np.testing.assert_array_equal(everything["masks"], graph["detection_masks_pasted"][0, :n])
    assert everything["masks"].any()
    # A threshold returns (and pastes) the best detections only, and says how many it left out.
    threshold = float(np.sort(everything["scores"])[-3])
    best = detector.predict(image, score_threshold=threshold)
    assert len(best["scores"]) == 3 and best["num_below_threshold"] == n - 3
    for key in ("boxes", "scores", "classes", "category_ids", "masks", "mask_probabilities"):
        np.testing.assert_array_equal(best[key], everything[key][:3], err_msg=key)
    # RLE and box-local formats: the same masks encoded, or none pasted.
    from pycocotools import mask as mask_api

    rle = detector.predict(image, score_threshold=threshold, masks="rle")
    np.testing.assert_array_equal(np.moveaxis(mask_api.decode(rle["masks_rle"]), -1, 0), best["masks"])
    box = detector.predict(image, masks="box")
    assert "masks" not in box and "masks_rle" not in box and box["mask_probabilities"].shape == (n, 28, 28)
    with pytest.raises(ValueError, match="masks='outline'; expected one of full, rle, polygons, box"):
        detector.predict(image, masks="outline")


_HUGE_PHOTO = r"""
import json, resource, sys
import numpy as np
import maskrcnn_tf
detector = maskrcnn_tf.load(sys.argv[1])
detector.predict(np.zeros((64, 64, 3), np.uint8))  # traced and warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = detector.predict(np.full((4000, 6000, 3), 30, np.uint8))  # a 24-megapixel photo, nothing in it
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"detections": len(result["scores"]), "growth_mb": (after - before) / 1024}))
"""


def test_predict_memory_on_a_huge_photo_without_detections_is_bounded_by_the_image(saved, tmp_path):
    # Before: the graph pasted all max_detections slots at the photo's size whatever was found (an R50 on
    # a 6000 x 4000 photo with zero detections peaked at 8.6 GB). Now nothing is pasted for nothing found:
    # the growth is the 72 MB photo, its float copies for resizing and the model's own work (measured
    # on a 2-core AMD EPYC Zen 4: 571 MB; 7255 MB with the graph pasting every slot).
    cfg = config_lib.replace(saved["cfg"], **{"model.detection.score_threshold": 0.999,
                                              "model.detection.max_detections": 100})
    run = tmp_path / "run"
    os.makedirs(run)
    config_lib.save_json(cfg, str(run / run_dir.CONFIG_FILE))
    tf.train.CheckpointManager(run_dir.make_checkpoint(saved["model"]), str(run / run_dir.CHECKPOINT_DIR),
                               max_to_keep=1, checkpoint_name="ckpt").save(checkpoint_number=1)
    proc = subprocess.run([sys.executable, "-c", _HUGE_PHOTO, str(run)], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT),
                                                               TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["detections"] == 0
    # 100 pasted uint8 masks alone would be 2400 MB, their float32 work buffer 96 MB more.
    assert result["growth_mb"] < 1200, result
