"""End to end against torchvision: its maskrcnn_resnet50_fpn with seeded random weights, saved with torch.save,
read back without torch (weights/torch_pickle.py), imported with weights/torchvision_mapping.py into the
torchvision_maskrcnn_r50_fpn preset, both run on the same real COCO photos.

The torchvision model is made non-trivial the way trained weights are: BN statistics calibrated on the
images and then perturbed at random, run with eps 0 (as torchvision runs COCO_V1), RPN objectness and
class logits scaled so that proposals are well separated and photos give confident detections.
Both sides put every image on one 512 x 512 canvas: torchvision by size_divisible=512 (its batch padding),
ours by image_size; resize short side 384, long side <= 512 (the preset's rule, smaller for speed).
The second test runs each photo alone through ours with model.orientation_canvases on and through
torchvision padding to multiples of 128: both put a lying photo on 384 x 512 and a standing one on
512 x 384 (ours slices its 512 x 512 input to that canvas), so the orientation path must give
torchvision's detections too.
"""

import numpy as np
import pytest

from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf import config as config_lib  # noqa: E402
from maskrcnn_tf import model as model_lib  # noqa: E402
from maskrcnn_tf.data import transforms  # noqa: E402
from maskrcnn_tf.weights import torch_pickle, torchvision_mapping  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.numpy_reference import box_iou  # noqa: E402

CANVAS = 512
SHORT_SIDE, LONG_SIDE = 384, 512
# torchvision's batch padding that gives our orientation canvases (SHORT_SIDE x CANVAS, CANVAS x SHORT_SIDE).
ORIENTATION_DIVISIBLE = 128
NUM_CLASSES = 91  # torchvision's COCO heads: background + ids 1..90
# Detections compared (agreement far beyond what AP can see, yet loose enough for float32 summation order):
# torchvision's scoring >= 0.3 need one of ours with the same class,
# box IoU >= 0.99 and a score within 0.01; their 28 x 28 mask probabilities before pasting within 1e-3.
MIN_SCORE, MIN_IOU, MAX_SCORE_DIFF, MAX_MASK_DIFF = 0.3, 0.99, 0.01, 1e-3
# Logit scales that make random heads behave like trained ones (chosen so that the test photos give
# a few tens of detections above MIN_SCORE and well separated objectness).
CLASS_LOGIT_SCALE = 5.0
OBJECTNESS_SCALE = 10.0
# Two landscape photos and a portrait one (the canvas holds both orientations).
IMAGES = ("coco_2img/images/train2017/000000391895.jpg", "coco_2img/images/val2017/000000397133.jpg",
          "coco_val2017_10/images/000000074646.jpg")


def _images():
    """uint8 RGB photos from ../shared/data, or generated smooth images of the same sizes when absent."""
    paths = [SHARED_DATA / p for p in IMAGES]
    if all(p.exists() for p in paths):
        return [tf.io.decode_jpeg(p.read_bytes(), channels=3).numpy() for p in paths]
    rng = np.random.default_rng(0)
    images = []
    for h, w in ((360, 640), (427, 640), (640, 480)):
        coarse = rng.uniform(0, 255, (h // 40 + 1, w // 40 + 1, 3))
        images.append(np.clip(tf.image.resize(coarse[None], (h, w)).numpy()[0] + rng.normal(0, 8, (h, w, 3)),
                              0, 255).astype(np.uint8))
    return images


def _torchvision_model(images):
    """maskrcnn_resnet50_fpn with random weights made non-trivial (module docstring), eval mode."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                  min_size=SHORT_SIDE, max_size=LONG_SIDE, size_divisible=CANVAS)
    norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.2)
            norm.momentum = 1.0  # one training-mode pass sets the running statistics to the batch's
        model.train()
        batch = model.transform([torch.from_numpy(i).permute(2, 0, 1).float() / 255.0 for i in images])[0]
        model.backbone.body(batch.tensors)
        model.eval()
        for norm in norms:
            norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.5, 2.0))
            norm.running_mean.add_(0.1 * norm.running_var.sqrt() * torch.randn_like(norm.running_mean))
            norm.eps = 0.0  # as torchvision's overwrite_eps(model, 0.0) for the COCO_V1 weights
        model.rpn.head.cls_logits.weight.mul_(OBJECTNESS_SCALE)
        model.roi_heads.box_predictor.cls_score.weight.mul_(CLASS_LOGIT_SCALE)
    return model


def _torchvision_detections(model, images):
    """Per image: boxes [N, 4] [y1, x1, y2, x2] resized-image pixels, labels, scores, mask probs [N, 28, 28]
    (roi_heads' output, before the masks are pasted and boxes mapped back to the original image)."""
    seen = []

    def keep_copy(module, inputs, outputs):  # transform.postprocess later pastes the masks in place
        seen.extend(dict(boxes=r["boxes"].numpy()[:, [1, 0, 3, 2]], labels=r["labels"].numpy(),
                         scores=r["scores"].numpy(), masks=r["masks"].numpy()[:, 0].copy()) for r in outputs[0])

    hook = model.roi_heads.register_forward_hook(keep_copy)
    with torch.no_grad():
        model([torch.from_numpy(i).permute(2, 0, 1).float() / 255.0 for i in images])
    hook.remove()
    return seen


def _our_inputs(cfg, images):
    batch, infos = [], []
    for image in images:
        info = transforms.resize_geometry(tf.shape(image)[:2], cfg.model.image_size, (1.0, 1.0),
                                          tf.zeros([2], tf.int64), mode=cfg.model.resize_mode,
                                          short_side=cfg.model.resize_short_side,
                                          max_long_side=cfg.model.resize_max_long_side)
        normalized = transforms.normalize_image(image, cfg.model.pixel_mean, cfg.model.pixel_std)
        resized = transforms.resize_and_crop_image(normalized, info)
        batch.append(tf.image.pad_to_bounding_box(resized, 0, 0, *cfg.model.image_size))
        infos.append(info)
    return {"images": tf.stack(batch), "image_info": tf.stack(infos)}


def _iou(box, boxes):
    """box [4], boxes [N, 4] -> [N] float64."""
    return box_iou(box[None], boxes)[0]


def _our_model(reference, tmp_path, orientation_canvases):
    """The preset on the test's canvas with the reference's weights, saved by torch and read without it."""
    checkpoint = tmp_path / "maskrcnn_random.pth"
    torch.save(reference.state_dict(), checkpoint)
    cfg = config_lib.replace(config_lib.get_preset("torchvision_maskrcnn_r50_fpn"), **{
        "model.image_size": (CANVAS, CANVAS), "model.resize_short_side": SHORT_SIDE,
        "model.resize_max_long_side": LONG_SIDE, "model.orientation_canvases": orientation_canvases})
    ours = model_lib.build_model(cfg)
    torchvision_mapping.assign_torchvision_weights(ours, torch_pickle.load_state_dict(str(checkpoint)))
    return cfg, ours


@pytest.mark.slow
def test_imported_torchvision_maskrcnn_gives_torchvision_detections(tmp_path):
    images = _images()
    reference = _torchvision_model(images)
    expected = _torchvision_detections(reference, images)
    cfg, ours = _our_model(reference, tmp_path, orientation_canvases=False)
    outputs = {k: v.numpy() for k, v in ours(_our_inputs(cfg, images), training=False).items()}
    _assert_same_detections(expected, outputs)


@pytest.mark.slow
def test_orientation_canvases_give_torchvision_detections(tmp_path):
    images = _images()
    reference = _torchvision_model(images)
    reference.transform.size_divisible = ORIENTATION_DIVISIBLE
    expected = [_torchvision_detections(reference, [image])[0] for image in images]
    cfg, ours = _our_model(reference, tmp_path, orientation_canvases=True)
    assert ours.inference_canvases == ((SHORT_SIDE, CANVAS), (CANVAS, SHORT_SIDE))
    per_image = []
    for image in images:
        inputs = _our_inputs(cfg, [image])
        assert inputs["images"].shape[1:3] == (CANVAS, CANVAS)  # the full canvas goes in, call slices it
        per_image.append({k: v.numpy() for k, v in ours(inputs, training=False).items()})
    outputs = {k: np.concatenate([o[k] for o in per_image]) for k in per_image[0]}
    _assert_same_detections(expected, outputs)


def _assert_same_detections(expected, outputs):
    """expected: _torchvision_detections' list; outputs: our model's output dict of the same images."""
    total = 0
    for i, ref in enumerate(expected):
        n = int(outputs["num_detections"][i])
        boxes, scores = outputs["detection_boxes"][i, :n], outputs["detection_scores"][i, :n]
        classes, masks = outputs["detection_classes"][i, :n], outputs["detection_masks"][i, :n]
        confident = np.flatnonzero(ref["scores"] >= MIN_SCORE)
        ious, score_diffs, mask_diffs = [], [], []
        for j in confident:
            same_class = np.flatnonzero(classes == ref["labels"][j])
            assert same_class.size, f"image {i}: no detection of class {ref['labels'][j]} (torchvision's {j})"
            overlap = _iou(ref["boxes"][j], boxes[same_class])
            k = same_class[np.argmax(overlap)]
            ious.append(overlap.max())
            score_diffs.append(abs(scores[k] - ref["scores"][j]))
            mask_diffs.append(np.abs(masks[k] - ref["masks"][j]).max())
        print(f"image {i}: {confident.size} torchvision detections >= {MIN_SCORE} (of {len(ref['scores'])}; "
              f"ours {n}), min IoU {min(ious, default=1):.6f}, max score diff {max(score_diffs, default=0):.2e}, "
              f"max mask prob diff {max(mask_diffs, default=0):.2e}")
        # And the other way: every confident detection of ours is one of torchvision's.
        for k in np.flatnonzero(scores >= MIN_SCORE):
            same_class = np.flatnonzero(ref["labels"] == classes[k])
            assert same_class.size and _iou(boxes[k], ref["boxes"][same_class]).max() >= MIN_IOU, (
                f"image {i}: our detection {k} (class {classes[k]}, score {scores[k]:.3f}) is not torchvision's")
        assert min(ious, default=1.0) >= MIN_IOU
        assert max(score_diffs, default=0.0) <= MAX_SCORE_DIFF
        assert max(mask_diffs, default=0.0) <= MAX_MASK_DIFF
        total += confident.size
    assert total >= 10, f"only {total} confident torchvision detections: the test would prove little"
