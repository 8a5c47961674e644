"""SavedModel export: reloaded in a fresh process without maskrcnn_tf, it gives the Keras model's detections.

One tiny model (random weights, detection score threshold 0 so it still returns D detections) is exported
once per module; a subprocess that can only import TensorFlow runs every signature and saves the outputs.
The Keras side is computed independently here: the evaluation pipeline's transforms, a plain
`model(...)` call per image, and the NumPy back-mapping of evaluation/coco_results.
"""
import io
import json
import os
import subprocess
import sys
import textwrap

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.data import transforms
from maskrcnn_tf.evaluation.coco_results import map_boxes_to_original
from maskrcnn_tf.export import NOT_AN_IMAGE, export_saved_model
from maskrcnn_tf.model import build_model
from maskrcnn_tf.ops.masks import paste_masks
from maskrcnn_tf.predictor import Predictor
from tests.e2e.synthetic import tiny_test_config

# Non-identity label map: contiguous 1, 2, 3 -> dataset ids 3, 7, 9.
CATEGORY_IDS = (3, 7, 9)
CLASS_NAMES = ("rectangle", "ellipse", "triangle")
# Issue 4: "the same detections (to 1e-4) as the Keras model".
TOLERANCE = 1e-4
# Two image sizes (both differ from the 128 x 128 model input and from each other's aspect ratio).
SIZE_A, SIZE_B = (90, 150), (120, 70)

# Runs in a fresh interpreter with cwd=tmp_path and no PYTHONPATH: only TensorFlow is importable.
FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    class BlockMaskrcnn(importlib.abc.MetaPathFinder):
        # Even if maskrcnn_tf were pip-installed, the SavedModel must not need it.
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "maskrcnn_tf":
                raise ImportError("blocked: the SavedModel must not need maskrcnn_tf")
            return None

    sys.meta_path.insert(0, BlockMaskrcnn())
    try:
        import maskrcnn_tf  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    import tensorflow as tf

    export_dir, inputs_path, out_dir = sys.argv[1:4]
    inputs = np.load(inputs_path)
    loaded = tf.saved_model.load(export_dir)
    sig = loaded.signatures
    np.savez(out_dir + "/tensor.npz", **{k: v.numpy() for k, v in
             sig["image_tensor"](images=tf.constant(inputs["batch_ac"])).items()})
    encoded = tf.constant([inputs["png_a"].tobytes(), inputs["png_b"].tobytes()])
    np.savez(out_dir + "/bytes.npz", **{k: v.numpy() for k, v in sig["serving_default"](images=encoded).items()})
    np.savez(out_dir + "/bytes_box_masks.npz",
             **{k: v.numpy() for k, v in sig["serving_box_masks"](images=encoded).items()})
    np.savez(out_dir + "/tensor_box_masks.npz", **{k: v.numpy() for k, v in
             sig["image_tensor_box_masks"](images=tf.constant(inputs["batch_ac"])).items()})
    np.savez(out_dir + "/jpeg.npz", **{k: v.numpy() for k, v in
             sig["serving_default"](images=tf.constant([inputs["jpeg_b"].tobytes()])).items()})
    np.savez(out_dir + "/jpeg_pixels.npz", **{k: v.numpy() for k, v in
             sig["image_tensor"](images=tf.constant(inputs["jpeg_b_pixels"][None])).items()})
    empty = {"serving_default": sig["serving_default"](images=tf.zeros([0], tf.string)),
             "image_tensor": sig["image_tensor"](images=tf.zeros([0, 7, 9, 3], tf.uint8)),
             "serving_box_masks": sig["serving_box_masks"](images=tf.zeros([0], tf.string))}
    empty = {name: {k: [v.dtype.name] + v.shape.as_list() for k, v in out.items()} for name, out in empty.items()}
    try:
        sig["serving_default"](images=tf.constant([inputs["png_b"].tobytes(), b"%PDF-1.4 not an image"]))
        error = None
    except tf.errors.InvalidArgumentError as e:
        error = e.message
    meta = sig["metadata"]()
    meta = {"class_names": [s.decode() for s in meta["class_names"].numpy()],
            "category_ids": meta["category_ids"].numpy().tolist(),
            "config_json": meta["config_json"].numpy().decode()}
    report = {"maskrcnn_tf_importable": importable, "maskrcnn_tf_loaded": "maskrcnn_tf" in sys.modules,
              "error": error, "metadata": meta, "signatures": sorted(sig), "empty": empty}
    with open(out_dir + "/report.json", "w") as f:
        json.dump(report, f)
""")


def _shapes_image(size, seed):
    """uint8 RGB [h, w, 3]: dark noise with a bright rectangle and ellipse (something to detect)."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
    cv2.rectangle(image, (w // 8, h // 6), (w // 2, h // 2), (230, 60, 60), -1)
    cv2.ellipse(image, (3 * w // 4, 3 * h // 4), (w // 6, h // 8), 0, 0, 360, (60, 230, 60), -1)
    return image


def _keras_detections(model, cfg, image):
    """Reference for ONE uint8 image: pipeline transforms, model call, NumPy back-mapping and label map."""
    info = transforms.resize_geometry(tf.shape(image)[:2], cfg.model.image_size, (1.0, 1.0), tf.zeros([2], tf.int64))
    resized = transforms.resize_and_crop_image(
        transforms.normalize_image(image, cfg.model.pixel_mean, cfg.model.pixel_std), info)
    padded = tf.image.pad_to_bounding_box(resized, 0, 0, *cfg.model.image_size)
    out = model({"images": padded[None], "image_info": info[None]}, training=False)
    n = int(out["num_detections"][0])
    lookup = np.array((0,) + CATEGORY_IDS)
    return {
        "num": n,
        "boxes": map_boxes_to_original(out["detection_boxes"][0, :n].numpy(), info.numpy()),
        "scores": out["detection_scores"][0, :n].numpy(),
        "classes": lookup[out["detection_classes"][0, :n].numpy()],
        "masks": out["detection_masks"][0, :n].numpy(),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_test_config(**{"model.detection.score_threshold": 0.0, "data.category_ids": CATEGORY_IDS,
                              "data.class_names": CLASS_NAMES})
    # Module fixtures run before the per-test autouse seed: seed Keras' initialisers here, so the random
    # model does not depend on which tests ran earlier in this worker.
    keras.utils.set_random_seed(1)
    model = build_model(cfg)
    export_dir = str(tmp / "saved_model")
    export_saved_model(model, cfg, export_dir)

    images = {"a": _shapes_image(SIZE_A, 0), "b": _shapes_image(SIZE_B, 1), "c": _shapes_image(SIZE_A, 2)}
    reference = {name: _keras_detections(model, cfg, image) for name, image in images.items()}
    jpeg_b = cv2.imencode(".jpg", images["b"][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    np.savez(tmp / "inputs.npz", batch_ac=np.stack([images["a"], images["c"]]),
             png_a=np.frombuffer(cv2.imencode(".png", images["a"][..., ::-1])[1].tobytes(), np.uint8),
             png_b=np.frombuffer(cv2.imencode(".png", images["b"][..., ::-1])[1].tobytes(), np.uint8),
             jpeg_b=np.frombuffer(jpeg_b, np.uint8),
             jpeg_b_pixels=cv2.imdecode(np.frombuffer(jpeg_b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = tmp / "fresh.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    run = subprocess.run([sys.executable, str(script), export_dir, str(tmp / "inputs.npz"), str(tmp)],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {
        "cfg": cfg, "export_dir": export_dir, "images": images, "reference": reference,
        "tensor": dict(np.load(tmp / "tensor.npz")), "bytes": dict(np.load(tmp / "bytes.npz")),
        "bytes_box_masks": dict(np.load(tmp / "bytes_box_masks.npz")),
        "tensor_box_masks": dict(np.load(tmp / "tensor_box_masks.npz")),
        "jpeg_b": jpeg_b, "jpeg": dict(np.load(tmp / "jpeg.npz")),
        "jpeg_pixels": dict(np.load(tmp / "jpeg_pixels.npz")),
        "report": json.loads((tmp / "report.json").read_text()),
    }


def _assert_same_detections(outputs, b, ref):
    n = ref["num"]
    assert n > 0  # score threshold 0: random weights still detect
    assert int(outputs["num_detections"][b]) == n
    # Scores are sorted on both sides, so they agree row by row even where two rows swap.
    np.testing.assert_allclose(outputs["detection_scores"][b, :n], ref["scores"], atol=TOLERANCE)
    order = _rows_matching(outputs, b, ref)
    np.testing.assert_allclose(outputs["detection_boxes"][b, order], ref["boxes"], atol=TOLERANCE)
    np.testing.assert_array_equal(outputs["detection_classes"][b, order], ref["classes"])
    np.testing.assert_allclose(outputs["detection_masks"][b, order], ref["masks"], atol=TOLERANCE)
    # Padding rows: class 0, boxes -1 (docs/design.md sections 2 and 5).
    assert (outputs["detection_classes"][b, n:] == 0).all()
    assert (outputs["detection_boxes"][b, n:] == -1).all()


def _rows_matching(outputs, b, ref):
    """For each reference row, the output row with its class and box whose score ties it within TOLERANCE.

    Random weights give near-equal scores; the batched SavedModel and the per-image Keras call sum in
    different orders, so two rows whose scores differ by ~1e-7 may come out swapped. Any other change of
    order fails here.
    """
    scores, boxes = outputs["detection_scores"][b], outputs["detection_boxes"][b]
    classes, unused = outputs["detection_classes"][b], set(range(ref["num"]))
    order = []
    for i in range(ref["num"]):
        tied = [j for j in sorted(unused) if abs(scores[j] - ref["scores"][i]) <= TOLERANCE
                and classes[j] == ref["classes"][i] and np.abs(boxes[j] - ref["boxes"][i]).max() <= TOLERANCE]
        assert tied, f"image {b}: reference detection {i} (score {ref['scores'][i]:.6f}) has no tied twin"
        order.append(tied[0])
        unused.remove(tied[0])
    return np.array(order)


def test_fresh_process_has_no_maskrcnn_tf_and_all_signatures(exported):
    report = exported["report"]
    assert report["maskrcnn_tf_importable"] is False
    assert report["maskrcnn_tf_loaded"] is False
    assert report["signatures"] == ["image_tensor", "image_tensor_box_masks", "metadata", "serving_box_masks",
                                    "serving_default"]


def test_box_masks_signatures_are_the_full_outputs_without_pasting(exported):
    for full, box in ((exported["bytes"], exported["bytes_box_masks"]),
                      (exported["tensor"], exported["tensor_box_masks"])):
        assert sorted(box) == sorted(set(full) - {"detection_masks_pasted"})
        for key in box:
            np.testing.assert_array_equal(box[key], full[key])  # same graph: bit-identical


def test_empty_batch_gives_empty_outputs(exported):
    d = exported["cfg"].model.detection.max_detections
    m = exported["tensor"]["detection_masks"].shape[-1]
    expected = {"num_detections": ["int32", 0], "detection_boxes": ["float32", 0, d, 4],
                "detection_scores": ["float32", 0, d], "detection_classes": ["int32", 0, d],
                "detection_masks": ["float32", 0, d, m, m]}
    empty = exported["report"]["empty"]
    assert empty["serving_box_masks"] == expected
    for name in ("serving_default", "image_tensor"):
        assert empty[name] == dict(expected, detection_masks_pasted=["uint8", 0, d, 0, 0])


def test_image_tensor_matches_keras(exported):
    outputs, ref = exported["tensor"], exported["reference"]
    _assert_same_detections(outputs, 0, ref["a"])
    _assert_same_detections(outputs, 1, ref["c"])
    assert outputs["detection_masks_pasted"].shape[2:] == SIZE_A


def test_serving_default_two_sizes_in_one_batch_matches_keras(exported):
    outputs, ref = exported["bytes"], exported["reference"]
    _assert_same_detections(outputs, 0, ref["a"])
    _assert_same_detections(outputs, 1, ref["b"])
    # Boxes are in each image's own original pixels.
    for b, (h, w) in enumerate([SIZE_A, SIZE_B]):
        n = int(outputs["num_detections"][b])
        boxes = outputs["detection_boxes"][b, :n]
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= h).all() and (boxes[:, [1, 3]] <= w).all()


def test_dataset_category_ids(exported):
    for outputs in (exported["tensor"], exported["bytes"]):
        classes = outputs["detection_classes"]
        valid = np.arange(classes.shape[1])[None] < outputs["num_detections"][:, None]
        assert set(classes[valid].tolist()) <= set(CATEGORY_IDS)
    meta = exported["report"]["metadata"]
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["category_ids"] == list(CATEGORY_IDS)
    assert config_lib.from_dict(json.loads(meta["config_json"])) == exported["cfg"]


def test_pasted_masks_are_thresholded_paste_of_28x28_at_largest_size(exported):
    outputs = exported["bytes"]
    pasted = outputs["detection_masks_pasted"]
    largest = (max(SIZE_A[0], SIZE_B[0]), max(SIZE_A[1], SIZE_B[1]))  # (120, 150)
    assert pasted.dtype == np.uint8 and pasted.shape[2:] == largest
    expected = np.asarray(paste_masks(outputs["detection_masks"], outputs["detection_boxes"], largest)) >= 0.5
    for b, (h, w) in enumerate([SIZE_A, SIZE_B]):
        expected[b, :, h:, :] = False  # outside this image's own extent
        expected[b, :, :, w:] = False
    np.testing.assert_array_equal(pasted, expected.astype(np.uint8))
    assert pasted.max() == 1  # something was pasted, else the comparison proves little


def test_non_image_bytes_give_a_clear_error(exported):
    error = exported["report"]["error"]
    assert error is not None and NOT_AN_IMAGE in error
    assert "input] [1]" in error  # names the offending batch element


def test_predictor_from_saved_model_matches_keras(exported):
    predictor = Predictor.from_saved_model(exported["export_dir"])
    assert predictor.class_names == list(CLASS_NAMES) and predictor.category_ids == list(CATEGORY_IDS)
    result, ref = predictor.predict(exported["images"]["b"]), exported["reference"]["b"]
    np.testing.assert_allclose(result["boxes"], ref["boxes"], atol=TOLERANCE)
    np.testing.assert_array_equal(result["category_ids"], ref["classes"])
    np.testing.assert_array_equal(np.array(CATEGORY_IDS)[result["classes"] - 1], ref["classes"])
    assert result["masks"].shape == (ref["num"],) + SIZE_B and result["masks"].dtype == np.uint8


def test_serving_default_on_a_jpeg_equals_image_tensor_on_pils_pixels(exported):
    """The SavedModel decodes JPEG bytes to PIL's / OpenCV's pixels (accurate IDCT, not TF's default fast
    one): serving_default on the JPEG and image_tensor on OpenCV's decode of it (the fresh process has
    only TensorFlow) give the same outputs, bit for bit."""
    try:
        from PIL import Image
    except ImportError:  # PIL comes with torchvision (test extra); OpenCV alone is the reference then
        pass
    else:  # the pixels fed to image_tensor are PIL's (torchvision's and detectron2's reader)
        pil = np.asarray(Image.open(io.BytesIO(exported["jpeg_b"])).convert("RGB"))
        np.testing.assert_array_equal(
            cv2.imdecode(np.frombuffer(exported["jpeg_b"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1], pil)
    from_bytes, from_pixels = exported["jpeg"], exported["jpeg_pixels"]
    assert int(from_bytes["num_detections"][0]) > 0
    assert sorted(from_bytes) == sorted(from_pixels)
    for key in from_bytes:
        np.testing.assert_array_equal(from_bytes[key], from_pixels[key], err_msg=key)


# A 4000 x 3000 photo with D = 100 detections, pasted in a fresh process whose peak RSS is measured.
MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import keras, numpy as np, tensorflow as tf
    from maskrcnn_tf.export import ServingModule
    from maskrcnn_tf.model import build_model
    from tests.e2e.synthetic import tiny_test_config

    cfg = tiny_test_config(**{"model.detection.score_threshold": 0.0, "model.detection.max_detections": 100,
                              "model.detection.pre_nms_top_k": 300, "model.detection.nms_iou": 1.0,
                              "model.rpn.post_nms_top_k_test": 100})
    keras.utils.set_random_seed(1)
    module = ServingModule(build_model(cfg), cfg)
    peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    photo = tf.constant(np.random.default_rng(0).integers(0, 255, (1, 3000, 4000, 3), dtype=np.uint8))
    module.serve_tensor(photo[:, :300, :400])  # trace both signatures on a small image first
    module.serve_tensor_box_masks(photo[:, :300, :400])
    traced = peak_mb()
    module.serve_tensor_box_masks(photo)
    box = peak_mb()
    out = module.serve_tensor(photo)
    pasted = peak_mb()
    print(json.dumps({"traced": traced, "box": box, "pasted": pasted,
                      "num": int(out["num_detections"][0]), "shape": out["detection_masks_pasted"].shape.as_list(),
                      "foreground": int(tf.reduce_sum(tf.cast(out["detection_masks_pasted"], tf.int64)))}))
""")


@pytest.mark.slow
def test_pasting_memory_of_a_4000x3000_photo_with_100_detections_is_bounded(tmp_path):
    from tests.conftest import REPO_ROOT

    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    d, h, w = 100, 3000, 4000
    assert measured["num"] == d and measured["shape"] == [1, d, h, w] and measured["foreground"] > 0
    output_mb = d * h * w / 2**20  # the uint8 output: 1144 MB
    # Bound (export.py docstring): the output, its stacked copy, and a few float32 H x W buffers (46 MB
    # each). The former float32 D x H x W paste buffer alone was 4 x output_mb (4.6 GB).
    assert measured["pasted"] - measured["box"] < 2 * output_mb + 256, measured
    # The box-local signature has no D x H x W term: only preprocessing the photo (its float32 copy is
    # 137 MB) on top of the traced model.
    assert measured["box"] - measured["traced"] < 400, measured
