"""import_weights.py end to end: a torchvision checkpoint (seeded random weights, saved with torch.save) ->
model directory -> predict.py and export.py accept it -> the SavedModel, in a fresh process, gives
torchvision's detections. Bad input: one-line errors naming the file, exit status 1, no model directory.

Kept small: one 320 x 320 image (a real COCO photo from ../shared/data when present, else generated),
torchvision's transform set to 320 / 320 and our canvas to 320 x 320, so both see the same pixels.
"""
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, SHARED_DATA
from tests.numpy_reference import box_iou
from tests.torch_oracle import import_torch

torch = import_torch()
torchvision = pytest.importorskip("torchvision")

IMAGE_SIDE = 320
SMALL_CANVAS = [f"--params_override=model.image_size=[{IMAGE_SIDE},{IMAGE_SIDE}]",
                f"--params_override=model.resize_short_side={IMAGE_SIDE}",
                f"--params_override=model.resize_max_long_side={IMAGE_SIDE}"]
# Class logits x this: random heads then give confident, varied scores on a photo.
LOGIT_SCALE = 3.0
SCORE_FLOOR = 0.3  # the agreement rule: every torchvision detection scoring >= this
COCO_IDS_UNUSED = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids 1..90 that COCO 2017 has no category for


def _run(*args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def _image() -> np.ndarray:
    """uint8 [320, 320, 3] RGB: the centre square of a real COCO photo, or seeded blobs when absent."""
    import cv2

    photo = SHARED_DATA / "coco_val2017_10" / "images" / "000000074646.jpg"
    if photo.exists():
        bgr = cv2.imread(str(photo))
        side = min(bgr.shape[:2])
        return np.ascontiguousarray(cv2.resize(bgr[:side, :side], (IMAGE_SIDE, IMAGE_SIDE),
                                               interpolation=cv2.INTER_AREA)[:, :, ::-1])
    rng = np.random.default_rng(0)
    image = np.full((IMAGE_SIDE, IMAGE_SIDE, 3), 90, np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, IMAGE_SIDE - 80, 2)
        image[y:y + rng.integers(30, 80), x:x + rng.integers(30, 80)] = rng.integers(0, 255, 3)
    return image


def torchvision_reference_model():
    """maskrcnn_resnet50_fpn (91 classes) as its COCO_V1 weights run (FrozenBatchNorm2d, eps 0) with seeded
    random weights and scaled class logits, its transform set to the test's 320 px. Its BatchNorm layers
    keep torchvision's initial statistics (mean 0, var 1): random statistics with eps 0 are
    test_torchvision_equivalence.py's subject; here the point is the command-line path (the published
    file's layout, import, predict.py, export.py, a fresh SavedModel process)."""
    from tests.weights.test_published_layouts import frozen_bn_maskrcnn

    model = frozen_bn_maskrcnn(seed=0, num_classes=91)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(LOGIT_SCALE)
    model.transform.min_size, model.transform.max_size = (IMAGE_SIDE,), IMAGE_SIDE
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(work dir, torchvision model, image, model_dir, checkpoint) after a successful import_weights.py run
    of a file in the layout of the published COCO_V1 file (docs/design.md section 15: legacy torch.save
    stream, old key names, "-<SHA-256 prefix>.pth" name)."""
    from tests.weights.test_published_layouts import coco_v1_state_dict, write_coco_v1_file

    work = tmp_path_factory.mktemp("import")
    model = torchvision_reference_model()
    checkpoint = write_coco_v1_file(str(work), "maskrcnn_tv", coco_v1_state_dict(model))
    image = _image()
    np.save(work / "image.npy", image)
    import cv2

    cv2.imwrite(str(work / "image.png"), image[:, :, ::-1])
    model_dir = work / "run"
    result = _run(str(REPO_ROOT / "import_weights.py"), "--source=torchvision",
                  f"--checkpoint={checkpoint}", f"--model_dir={model_dir}", *SMALL_CANVAS)
    assert result.returncode == 0, result.stderr[-2000:]
    prefix = checkpoint[-len("12345678.pth"):-len(".pth")]
    assert result.stdout.splitlines()[-1] == (
        f"import_weights: {checkpoint} -> {model_dir / 'checkpoints' / 'ckpt-0'}: torchvision Mask R-CNN, 90 classes; "
        "BatchNorm eps 0 (assumed: torchvision's COCO_V1 and models fine-tuned from it run with 0; a model trained "
        "from an ImageNet backbone runs with 1e-5: --params_override=model.backbone.norm_epsilon=1e-5); "
        f"SHA-256 prefix {prefix} verified"), result.stdout
    return work, model, image, model_dir, checkpoint


def _torchvision_detections(model, image):
    with torch.no_grad():
        out = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])[0]
    return {k: v.numpy() for k, v in out.items()}


def test_faster_rcnn_checkpoint_gives_a_box_only_config():
    """torchvision's fasterrcnn_resnet50_fpn keys: no mask head -> include_mask False, and every key maps
    (no unused or missing key; shapes are checked when the model is built)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from maskrcnn_tf.weights import importer, torchvision_mapping

    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                               num_classes=91).state_dict().items()}
    assert not torchvision_mapping.has_mask_head(state)
    cfg = importer.import_config("torchvision", include_mask=False)
    assert cfg.model.include_mask is False and cfg.model.num_classes == 90
    values, _ = importer.SOURCES["torchvision"].variables(state, cfg)
    assert not any(path.startswith("mask_rcnn/mask_head/") for path in values)
    assert values["mask_rcnn/box_head/classifier/kernel"].shape == (1024, 91)


def test_run_directory_and_label_map(imported):
    _, _, _, model_dir, _ = imported
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "config.json", "label_map.json"]
    assert not [p for p in os.listdir(model_dir.parent) if p.startswith(".run.tmp")]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"]["num_classes"] == 90 and config["model"]["include_mask"] is True
    assert config["model"]["backbone"]["stride_in_3x3"] is True
    assert config["model"]["backbone"]["norm_epsilon"] == 0.0
    label_map = json.loads((model_dir / "label_map.json").read_text())
    # torchvision's classifier index i is COCO id i; the ten unused ids are torchvision's "N/A".
    assert [e["id"] for e in label_map] == list(range(1, 91))
    names = {e["id"]: e["name"] for e in label_map}
    assert (names[1], names[18], names[90]) == ("person", "dog", "toothbrush")
    assert {i for i, n in names.items() if n == "N/A"} == COCO_IDS_UNUSED
    coco_json = SHARED_DATA / "coco_tiny" / "annotations" / "instances_val2017.json"
    if coco_json.exists():
        categories = {c["id"]: c["name"] for c in json.loads(coco_json.read_text())["categories"]}
        assert {i: n for i, n in names.items() if n != "N/A"} == categories


@pytest.mark.slow
def test_predict_export_and_saved_model_equal_torchvision(imported):
    work, model, image, model_dir, _ = imported
    reference = _torchvision_detections(model, image)

    out_dir = work / "predictions"
    result = _run(str(REPO_ROOT / "predict.py"), f"--model_dir={model_dir}", f"--image={work / 'image.png'}",
                  f"--output_dir={out_dir}", f"--score_threshold={SCORE_FLOOR}")
    assert result.returncode == 0, result.stderr[-2000:]
    predicted = json.loads((out_dir / "image.json").read_text())["detections"]
    confident = reference["scores"] >= SCORE_FLOOR
    assert confident.sum() >= 5, "the reference must give detections for the comparison to mean anything"
    # predict.py reports COCO category ids (torchvision's labels), not contiguous indices.
    assert sorted({d["category_id"] for d in predicted}) == sorted(set(reference["labels"][confident].tolist()))

    export_dir = work / "export" / "1"
    result = _run(str(REPO_ROOT / "export.py"), f"--model_dir={model_dir}", f"--export_dir={export_dir}",
                  "--no_pasted_masks")
    assert result.returncode == 0, result.stderr[-2000:]
    # A fresh process that only loads the SavedModel (no maskrcnn_tf import).
    script = (
        "import numpy as np, tensorflow as tf, sys\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "out = m.signatures['image_tensor'](images=tf.constant(np.load(sys.argv[2])[None]))\n"
        "np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})\n")
    result = _run("-c", script, str(export_dir), str(work / "image.npy"), str(work / "served.npz"), cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    served = np.load(work / "served.npz")
    n = int(served["num_detections"][0])
    boxes = served["detection_boxes"][0, :n][:, [1, 0, 3, 2]]  # [y1, x1, y2, x2] -> [x1, y1, x2, y2]
    scores, classes = served["detection_scores"][0, :n], served["detection_classes"][0, :n]

    compared = confident.copy()
    if len(reference["scores"]) == model.roi_heads.detections_per_img:
        # Both keep their top 100: candidates scoring within float rounding of the 100th can swap places
        # at the cut, so detections within 0.01 of the last kept score are not required to match.
        compared &= reference["scores"] > reference["scores"][-1] + 0.01
    assert compared.sum() >= 5
    ious = box_iou(reference["boxes"][compared], boxes)
    worst_iou, worst_score = 1.0, 0.0
    for i, (label, score) in enumerate(zip(reference["labels"][compared], reference["scores"][compared])):
        match = (classes == label) & (ious[i] >= 0.99) & (np.abs(scores - score) <= 0.01)
        assert match.any(), f"torchvision detection {i} (class {label}, score {score:.3f}) has no match"
        best = np.flatnonzero(match)[np.argmax(ious[i][match])]
        worst_iou, worst_score = min(worst_iou, ious[i, best]), max(worst_score, abs(scores[best] - score))
    print(f"SavedModel vs torchvision: {compared.sum()} detections matched, lowest IoU {worst_iou:.5f}, "
          f"largest score difference {worst_score:.2e}")


@pytest.mark.slow
def test_bad_inputs_exit_1_naming_the_file_and_leave_nothing(tmp_path, imported):
    work, model, _, _, checkpoint = imported
    state = model.state_dict()
    cases = {}

    torch.save(state, tmp_path / "current.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tmp_path / "current.pth").read_bytes()[:100000])
    cases["truncated"] = (truncated, "torchvision", r"not a torch\.save checkpoint")
    truncated_legacy = tmp_path / "truncated_legacy.pth"
    truncated_legacy.write_bytes(pathlib.Path(checkpoint).read_bytes()[:1000000])
    cases["truncated legacy"] = (truncated_legacy, "torchvision", r"truncated")
    text = tmp_path / "notes.pth"
    text.write_text("hello\n")
    cases["non-zip"] = (text, "torchvision", r"not a torch\.save checkpoint")
    # The published name on other bytes: refused before anything is read, unless --no_verify_hash.
    renamed = tmp_path / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    renamed.write_bytes(pathlib.Path(checkpoint).read_bytes())
    cases["hash"] = (renamed, "torchvision", r"its SHA-256 is [0-9a-f]{64}, but the file name says it starts with "
                                             r"bf2d0c1e: a truncated or tampered download")

    marker = tmp_path / "created_by_pickle"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(1, np.float32)}, "x": Payload()}, f, protocol=2)
    cases["global"] = (evil, "detectron2", r"refused to load: the pickle names global (posix|os)\.mkdir")

    keypoint = dict(state)
    keypoint["roi_heads.keypoint_predictor.kps_score_lowres.weight"] = torch.zeros(512, 17, 4, 4)
    # Named like a published file whose hash it does not have: --no_verify_hash gets it to the key check.
    keypoint_path = tmp_path / "keypointrcnn_resnet50_fpn_coco-fc266e95.pth"
    torch.save(keypoint, keypoint_path)
    cases["keypoint"] = (keypoint_path, "torchvision",
                         r"the checkpoint is torchvision's keypoint R-CNN \(keypointrcnn_resnet50_fpn: .*\); "
                         r"maskrcnn_tf imports torchvision's Mask R-CNN and Faster R-CNN \(v1 and v2\) only",
                         "--no_verify_hash")
    body = "backbone.body."
    classifier = {key[len(body):]: value for key, value in state.items() if key.startswith(body)}
    classifier["fc.weight"], classifier["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(classifier, tmp_path / "resnet50_imagenet.pth")
    cases["classifier"] = (tmp_path / "resnet50_imagenet.pth", "torchvision",
                           r"an ImageNet classification network \(fc\.weight; as a backbone: "
                           r"train\.py --pretrained=FILE\)")

    r101 = dict(state)
    for block in range(6, 23):  # ResNet-101's layer3 has 23 blocks, ResNet-50's 6
        for i, width in ((1, 256), (2, 256), (3, 1024)):
            r101[f"backbone.body.layer3.{block}.conv{i}.weight"] = torch.zeros(width, 1024 if i == 1 else 256, 1, 1)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                r101[f"backbone.body.layer3.{block}.bn{i}.{buffer}"] = torch.ones(width)
    torch.save(r101, tmp_path / "r101.pth")
    cases["r101"] = (tmp_path / "r101.pth", "torchvision", r"backbone\.body\.layer3\.\d+\.\w+\.weight")

    classes21 = dict(state)
    classes21["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(21, 1024)
    torch.save(classes21, tmp_path / "voc.pth")
    cases["classes"] = (tmp_path / "voc.pth", "torchvision",
                        r"cls_score\.weight: expected shape \(91, D\).*found \(21, 1024\)")

    for name, (path, source, pattern, *flags) in cases.items():
        model_dir = tmp_path / f"run_{name}"
        result = _run(str(REPO_ROOT / "import_weights.py"), f"--source={source}", f"--checkpoint={path}",
                      f"--model_dir={model_dir}", *SMALL_CANVAS, *flags)
        assert result.returncode == 1, (name, result.stderr[-1000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), (name, result.stderr[-1000:])
        assert re.search(pattern, lines[0]), (name, lines[0])
        assert "Traceback" not in result.stderr, name
        assert not model_dir.exists(), name
        assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], name
    assert not marker.exists()


def test_existing_model_dir_is_refused(imported):
    _, _, _, model_dir, checkpoint = imported
    result = _run(str(REPO_ROOT / "import_weights.py"), "--source=torchvision",
                  f"--checkpoint={checkpoint}", f"--model_dir={model_dir}")
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert pathlib.Path(model_dir, "config.json").exists()


@pytest.mark.slow
def test_detectron2_model_zoo_pickle_imports_with_coco_label_map(tmp_path):
    """A detectron2 model-zoo .pkl in the documented 2019-2020 layout (the full mask_rcnn_R_50_FPN key set
    and the five cell_anchors buffers, named model_final_<MD5 prefix>.pkl) -> 80 COCO classes in id order;
    the buffers are checked, the summary line says so; the written checkpoint restores into the model
    eval/export/predict build (run_dir)."""
    import hashlib

    from maskrcnn_tf import run_dir
    from maskrcnn_tf.data import coco_classes
    from tests.weights.test_detectron2_pickle import r50_fpn_state_dict, write_model_zoo_pickle

    state_dict = r50_fpn_state_dict(np.random.default_rng(7))
    written = tmp_path / "written.pkl"
    write_model_zoo_pickle(written, state_dict)
    md5 = hashlib.md5(written.read_bytes()).hexdigest()[:6]
    checkpoint = tmp_path / f"model_final_{md5}.pkl"
    written.rename(checkpoint)
    model_dir = tmp_path / "d2_run"
    result = _run(str(REPO_ROOT / "import_weights.py"), "--source=detectron2", f"--checkpoint={checkpoint}",
                  f"--model_dir={model_dir}", "--params_override=model.image_size=[128,128]",
                  "--params_override=model.resize_short_side=128", "--params_override=model.resize_max_long_side=128")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == (
        f"import_weights: {checkpoint} -> {model_dir / 'checkpoints' / 'ckpt-0'}: detectron2 Mask R-CNN, 80 classes; "
        f"BatchNorm eps 1e-05 (detectron2's FrozenBatchNorm2d); MD5 prefix {md5} verified; buffers checked: "
        "5 cell_anchors"), result.stdout
    label_map = json.loads((model_dir / "label_map.json").read_text())
    assert [(e["id"], e["name"]) for e in label_map] == list(coco_classes.COCO_CATEGORIES)
    assert [e["contiguous_id"] for e in label_map] == list(range(1, 81))
    cfg, model = run_dir.restore_model(str(model_dir))
    assert cfg.model.num_classes == 80 and cfg.model.backbone.norm_epsilon == 1e-5
    assert cfg.data.category_ids[-1] == 90 and cfg.data.class_names[0] == "person"
    # Background is detectron2's last cls_score row and our column 0.
    np.testing.assert_array_equal(model.box_head.classifier.kernel.numpy()[:, 0],
                                  state_dict["roi_heads.box_predictor.cls_score.weight"][80])
    # The stem kernel takes RGB: detectron2's BGR input channels reversed.
    stem = state_dict["backbone.bottom_up.stem.conv1.weight"]  # [out, in (BGR), kh, kw]
    np.testing.assert_array_equal(model.backbone.network.get_layer("conv1_conv").kernel.numpy(),
                                  stem.transpose(2, 3, 1, 0)[:, :, ::-1])
    # train.py --init_checkpoint=MODEL_DIR restores every variable of a model of the same config.
    from maskrcnn_tf import checkpointing
    from maskrcnn_tf.model import build_model

    restored, skipped = checkpointing.load_matching_weights(build_model(cfg), str(model_dir))
    assert not skipped and len(restored) == len(model.variables)
