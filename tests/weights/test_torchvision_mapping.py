"""weights/torchvision_mapping.py: layouts checked against torchvision's own head modules (fc6 after an NCHW
flatten, [dx, dy, dw, dh] -> [dy, dx, dh, dw], the mask predictor without its background channel), old
checkpoint key names, and every bad-input error naming the key and the shapes, with the model left untouched.
The end-to-end equivalence is test_torchvision_equivalence.py."""
import numpy as np
import pytest

from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf import config as config_lib  # noqa: E402
from maskrcnn_tf import model as model_lib  # noqa: E402
from maskrcnn_tf import run_dir  # noqa: E402
from maskrcnn_tf.weights import torchvision_mapping  # noqa: E402

NUM_CLASSES = 91  # torchvision COCO heads


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                               num_classes=NUM_CLASSES).eval()
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ours():
    cfg = config_lib.replace(config_lib.get_preset("torchvision_maskrcnn_r50_fpn"), **{
        "model.image_size": (128, 128), "model.rpn.pre_nms_top_k_test": 50, "model.rpn.post_nms_top_k_test": 20,
        "model.detection.max_detections": 5})
    return model_lib.build_model(cfg)


def _snapshot(model):
    return {p: v.numpy().copy() for p, v in run_dir.variables_by_path(model).items()}


def test_heads_compute_what_torchvision_heads_compute(reference, ours):
    model, state_dict = reference
    torchvision_mapping.assign_torchvision_weights(ours, state_dict)  # num_batches_tracked keys ignored
    rng = np.random.default_rng(0)
    rois = rng.normal(size=(1, 6, 7, 7, 256)).astype(np.float32)  # [B, R, 7, 7, C]
    logits, deltas = ours.box_head(tf.constant(rois))
    with torch.no_grad():
        x = torch.from_numpy(rois[0]).permute(0, 3, 1, 2)  # NCHW
        tv_logits, tv_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(x))
    np.testing.assert_allclose(logits.numpy()[0], tv_logits.numpy(), rtol=0, atol=1e-4)
    tv_deltas = tv_deltas.numpy().reshape(6, NUM_CLASSES, 4)[..., [1, 0, 3, 2]].reshape(6, -1)
    np.testing.assert_allclose(deltas.numpy()[0], tv_deltas, rtol=0, atol=1e-4)

    mask_rois = rng.normal(size=(1, 3, 14, 14, 256)).astype(np.float32)
    classes = np.array([[1, 17, 90]], np.int32)
    mask_logits = ours.mask_head(tf.constant(mask_rois), tf.constant(classes)).numpy()[0]
    with torch.no_grad():
        x = torch.from_numpy(mask_rois[0]).permute(0, 3, 1, 2)
        tv_masks = model.roi_heads.mask_predictor(model.roi_heads.mask_head(x)).numpy()  # [3, 91, 28, 28]
    np.testing.assert_allclose(mask_logits, tv_masks[np.arange(3), classes[0]], rtol=0, atol=1e-4)


def test_old_release_key_names_are_accepted(reference, ours):
    _, state_dict = reference
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for kind in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                key = key.replace(f"backbone.fpn.{kind}.{i}.0.", f"backbone.fpn.{kind}.{i}.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        renamed[key] = value
    assert "roi_heads.mask_head.mask_fcn1.weight" in renamed and "rpn.head.conv.weight" in renamed
    values, _ = torchvision_mapping.torchvision_variables(renamed, NUM_CLASSES - 1)
    expected, _ = torchvision_mapping.torchvision_variables(state_dict, NUM_CLASSES - 1)
    assert values.keys() == expected.keys()
    for path in values:
        np.testing.assert_array_equal(values[path], expected[path], err_msg=path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update({"roi_heads.keypoint_head.0.weight": np.zeros((2, 2), np.float32)}),
     r"key roi_heads\.keypoint_head\.0\.weight \(shape \(2, 2\)\) has no place in this model"),
    (lambda d: d.pop("backbone.fpn.layer_blocks.2.0.bias"), r"key backbone\.fpn\.layer_blocks\.2\.0\.bias is missing"),
    (lambda d: d.update({"rpn.head.conv.0.0.weight": np.zeros((256, 256, 1, 1), np.float32)}),
     r"rpn\.head\.conv\.0\.0\.weight: expected shape \(3, 3, 256, 256\) .*found \(1, 1, 256, 256\)"),
    (lambda d: d.update({k: v[:81] for k, v in d.items() if "cls_score" in k}),
     r"cls_score\.weight: expected shape \(91, D\) for 90 classes \+ background, found \(81, 1024\)"),
    (lambda d: [d.pop(k) for k in list(d) if k.startswith("roi_heads.mask_")],
     r"has no mask head .* include_mask=True"),
])
def test_bad_checkpoints_name_the_key_and_leave_the_model_untouched(reference, ours, change, message):
    _, state_dict = reference
    broken = dict(state_dict)
    change(broken)
    before = _snapshot(ours)
    with pytest.raises(ValueError, match=message):
        torchvision_mapping.assign_torchvision_weights(ours, broken)
    after = _snapshot(ours)
    assert all(np.array_equal(before[p], after[p]) for p in before)
