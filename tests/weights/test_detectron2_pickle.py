"""weights/detectron2_pickle.py + detectron2_mapping.py: a model-zoo style pickle the test writes.

The key set is mask_rcnn_R_50_FPN's, read from detectron2's source (facebookresearch/detectron2):
detectron2/modeling/backbone/resnet.py (BasicStem.conv1, res2..res5 BottleneckBlocks conv1..conv3 +
shortcut, each Conv2d with a FrozenBatchNorm2d `norm` and no bias, stride in conv1), backbone/fpn.py
(fpn_lateral{2..5}, fpn_output{2..5}, LastLevelMaxPool), proposal_generator/rpn.py (StandardRPNHead
conv / objectness_logits / anchor_deltas), roi_heads/box_head.py (FastRCNNConvFCHead fc1, fc2 after
flatten), roi_heads/fast_rcnn.py (FastRCNNOutputLayers cls_score K + 1 with background last, bbox_pred
K * 4), roi_heads/mask_head.py (MaskRCNNConvUpsampleHead mask_fcn1..4, deconv, predictor).
The oracle is detectron2's forward written with torch.nn.functional on the same state dict (BGR input,
NCHW); our model runs on RGB NHWC.
"""
import os
import pickle

import numpy as np
import pytest

from tests.torch_oracle import import_torch  # noqa: E402

torch = import_torch()
F = torch.nn.functional

from maskrcnn_tf import config as config_lib  # noqa: E402
from maskrcnn_tf.model import build_model  # noqa: E402
from maskrcnn_tf.weights import detectron2_mapping, detectron2_pickle  # noqa: E402

NUM_CLASSES = 80
R50_BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths of res2..res5; outputs are 4x
FROZEN_BN_EPS = 1e-5  # detectron2 FrozenBatchNorm2d (the detectron2_r50_fpn_1x preset's norm_epsilon)
IMAGE_SIZE = 64


def _conv_norm(sd, rng, prefix, out_ch, in_ch, k):
    sd[f"{prefix}.weight"] = rng.normal(0, np.sqrt(2.0 / (in_ch * k * k)), (out_ch, in_ch, k, k))
    sd[f"{prefix}.norm.weight"] = rng.uniform(0.3, 0.8, out_ch)
    sd[f"{prefix}.norm.bias"] = rng.normal(0, 0.1, out_ch)
    sd[f"{prefix}.norm.running_mean"] = rng.normal(0, 0.1, out_ch)
    sd[f"{prefix}.norm.running_var"] = rng.uniform(0.5, 1.5, out_ch)


def _conv(sd, rng, prefix, out_ch, in_ch, k, std=None):
    sd[f"{prefix}.weight"] = rng.normal(0, std or np.sqrt(1.0 / (in_ch * k * k)), (out_ch, in_ch, k, k))
    sd[f"{prefix}.bias"] = rng.normal(0, 0.05, out_ch)


def r50_fpn_state_dict(rng, blocks=R50_BLOCKS, mask=True, num_classes=NUM_CLASSES):
    """Random float32 arrays under every key of detectron2's mask_rcnn_R_50_FPN (module docstring)."""
    sd = {}
    _conv_norm(sd, rng, "backbone.bottom_up.stem.conv1", 64, 3, 7)
    in_ch = 64
    for stage, (num_blocks, width) in enumerate(zip(blocks, STAGE_WIDTHS), start=2):
        out_ch = width * 4
        for b in range(num_blocks):
            p = f"backbone.bottom_up.res{stage}.{b}"
            if b == 0:
                _conv_norm(sd, rng, f"{p}.shortcut", out_ch, in_ch, 1)
            _conv_norm(sd, rng, f"{p}.conv1", width, in_ch if b == 0 else out_ch, 1)
            _conv_norm(sd, rng, f"{p}.conv2", width, width, 3)
            _conv_norm(sd, rng, f"{p}.conv3", out_ch, width, 1)
        in_ch = out_ch
    for level, ch in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        _conv(sd, rng, f"backbone.fpn_lateral{level}", 256, ch, 1)
        _conv(sd, rng, f"backbone.fpn_output{level}", 256, 256, 3)
    _conv(sd, rng, "proposal_generator.rpn_head.conv", 256, 256, 3)
    _conv(sd, rng, "proposal_generator.rpn_head.objectness_logits", 3, 256, 1)
    _conv(sd, rng, "proposal_generator.rpn_head.anchor_deltas", 12, 256, 1)
    for name, shape in (("box_head.fc1", (1024, 256 * 7 * 7)), ("box_head.fc2", (1024, 1024)),
                        ("box_predictor.cls_score", (num_classes + 1, 1024)),
                        ("box_predictor.bbox_pred", (num_classes * 4, 1024))):
        sd[f"roi_heads.{name}.weight"] = rng.normal(0, np.sqrt(1.0 / shape[1]), shape)
        sd[f"roi_heads.{name}.bias"] = rng.normal(0, 0.05, shape[0])
    if mask:
        for i in range(1, 5):
            _conv(sd, rng, f"roi_heads.mask_head.mask_fcn{i}", 256, 256, 3)
        sd["roi_heads.mask_head.deconv.weight"] = rng.normal(0, 0.05, (256, 256, 2, 2))  # [in, out, kh, kw]
        sd["roi_heads.mask_head.deconv.bias"] = rng.normal(0, 0.05, 256)
        _conv(sd, rng, "roi_heads.mask_head.predictor", num_classes, 256, 1)
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


D2_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # configs/Base-RCNN-FPN.yaml: one size per level P2..P6
D2_ASPECT_RATIOS = (0.5, 1.0, 2.0)  # config/defaults.py ANCHOR_GENERATOR.ASPECT_RATIOS
MODEL_ZOO_AUTHOR = "Detectron2 Model Zoo"  # what DetectionCheckpointer logs for model-zoo files (issue #1811)


def detectron2_cell_anchors(sizes=D2_ANCHOR_SIZES, aspect_ratios=D2_ASPECT_RATIOS):
    """The anchor_generator.cell_anchors buffers, computed as detectron2's DefaultAnchorGenerator does
    (modeling/anchor_generator.py generate_cell_anchors, then .float()): one [A, 4] per level."""
    import math

    buffers = {}
    for level, size in enumerate(sizes):
        anchors = []
        for ratio in aspect_ratios:
            w = math.sqrt(size ** 2.0 / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        buffers[f"proposal_generator.anchor_generator.cell_anchors.{level}"] = torch.tensor(anchors).float().numpy()
    return buffers


def model_zoo_model(state_dict, pixel_stats=False):
    """The "model" dict of a 2019-2020 model-zoo file (docs/design.md section 15): the weights and the five
    cell_anchors buffers; pixel_stats adds pixel_mean / pixel_std [3, 1, 1] (BGR), which checkpoints
    written between detectron2 9ced00a1 (2020-04) and 3c0509e6 (2021-02) carry."""
    model = dict(state_dict)
    model.update(detectron2_cell_anchors())
    if pixel_stats:
        model["pixel_mean"] = np.array([103.530, 116.280, 123.675], np.float32).reshape(3, 1, 1)
        model["pixel_std"] = np.ones((3, 1, 1), np.float32)
    return model


def write_model_zoo_pickle(path, state_dict, buffers=True, matching_heuristics=None, protocol=2):
    """A detectron2 model-zoo .pkl as documented in docs/design.md section 15: a pickle of {"model": {name:
    np.ndarray}, "__author__": str} (the two keys DetectionCheckpointer requires), the model dict with its
    cell_anchors buffers unless buffers=False; matching_heuristics, when given, is the optional flag."""
    top = {"model": model_zoo_model(state_dict) if buffers else dict(state_dict), "__author__": MODEL_ZOO_AUTHOR}
    if matching_heuristics is not None:
        top["matching_heuristics"] = matching_heuristics
    with open(path, "wb") as f:
        pickle.dump(top, f, protocol=protocol)
    return top["model"]


# ---------------------------------------------------------------- detectron2's forward, in torch


def _t(sd, key):
    return torch.from_numpy(sd[key])


def _d2_conv_norm(sd, prefix, x, stride=1, padding=0, relu=True):
    y = F.conv2d(x, _t(sd, f"{prefix}.weight"), stride=stride, padding=padding)
    scale = _t(sd, f"{prefix}.norm.weight") * torch.rsqrt(_t(sd, f"{prefix}.norm.running_var") + FROZEN_BN_EPS)
    shift = _t(sd, f"{prefix}.norm.bias") - _t(sd, f"{prefix}.norm.running_mean") * scale
    y = y * scale[None, :, None, None] + shift[None, :, None, None]
    return F.relu(y) if relu else y


def d2_features(sd, bgr):
    """detectron2 ResNet (stride in the 1x1 conv, STRIDE_IN_1X1=True) + FPN + LastLevelMaxPool."""
    x = _d2_conv_norm(sd, "backbone.bottom_up.stem.conv1", bgr, stride=2, padding=3)
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    features = {}
    for stage, num_blocks in enumerate(R50_BLOCKS, start=2):
        for b in range(num_blocks):
            p = f"backbone.bottom_up.res{stage}.{b}"
            stride = 2 if (b == 0 and stage > 2) else 1
            shortcut = _d2_conv_norm(sd, f"{p}.shortcut", x, stride=stride, relu=False) if b == 0 else x
            y = _d2_conv_norm(sd, f"{p}.conv1", x, stride=stride)
            y = _d2_conv_norm(sd, f"{p}.conv2", y, padding=1)
            y = _d2_conv_norm(sd, f"{p}.conv3", y, relu=False)
            x = F.relu(y + shortcut)
        features[stage] = x
    pyramid, top_down = {}, None
    for level in (5, 4, 3, 2):
        lateral = F.conv2d(features[level], _t(sd, f"backbone.fpn_lateral{level}.weight"),
                           _t(sd, f"backbone.fpn_lateral{level}.bias"))
        if top_down is not None:
            lateral = lateral + F.interpolate(top_down, scale_factor=2, mode="nearest")
        top_down = lateral
        pyramid[level] = F.conv2d(lateral, _t(sd, f"backbone.fpn_output{level}.weight"),
                                  _t(sd, f"backbone.fpn_output{level}.bias"), padding=1)
    pyramid[6] = F.max_pool2d(pyramid[5], kernel_size=1, stride=2)
    return pyramid


@pytest.fixture(scope="module")
def d2_checkpoint(tmp_path_factory):
    state_dict = r50_fpn_state_dict(np.random.default_rng(0))
    path = tmp_path_factory.mktemp("d2") / "model_final_test.pkl"
    written = write_model_zoo_pickle(path, state_dict)
    return path, written


@pytest.fixture(scope="module")
def d2_model(d2_checkpoint):
    path, _ = d2_checkpoint
    cfg = config_lib.replace(config_lib.get_preset("detectron2_r50_fpn_1x"), **{
        "model.image_size": (IMAGE_SIZE, IMAGE_SIZE), "model.backbone.weights": None,
        "model.rpn.pre_nms_top_k_test": 50, "model.rpn.post_nms_top_k_test": 20,
        "model.detection.max_detections": 10, "model.detection.pre_nms_top_k": 50})
    model = build_model(cfg)
    detectron2_mapping.assign_detectron2_weights(model, detectron2_pickle.load_state_dict(str(path)))
    return model


def _close(ours, reference, rtol=2e-4):
    reference = np.asarray(reference)
    scale = np.abs(reference).max()
    assert scale > 0
    np.testing.assert_allclose(ours, reference, atol=rtol * scale, rtol=0)


def test_reader_returns_every_array_unchanged(d2_checkpoint):
    path, state_dict = d2_checkpoint
    loaded = detectron2_pickle.load_state_dict(str(path))
    assert sorted(loaded) == sorted(state_dict)
    # 53 conv+norm layers, FPN, RPN, box, mask heads, and the five cell_anchors buffers
    assert len(loaded) == 5 * 53 + 4 * 4 + 6 + 8 + 12 + 5
    for key, value in state_dict.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_features_equal_detectron2_forward(d2_checkpoint, d2_model):
    """Backbone (BGR stem reversed for RGB input, stride placement, shortcuts) and FPN P2..P6."""
    _, sd = d2_checkpoint
    rgb = np.random.default_rng(1).normal(0, 30, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    ours = d2_model.fpn(d2_model.backbone(rgb))
    bgr_nchw = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(0, 3, 1, 2)))
    with torch.no_grad():
        reference = d2_features(sd, bgr_nchw)
    for level in (2, 3, 4, 5, 6):
        _close(ours[f"P{level}"].numpy(), reference[level].numpy().transpose(0, 2, 3, 1))


def test_rpn_head_equals_detectron2(d2_checkpoint, d2_model):
    _, sd = d2_checkpoint
    x = np.random.default_rng(2).normal(0, 1, (1, 8, 8, 256)).astype(np.float32)
    scores, deltas = d2_model.rpn_head({"P3": x})
    with torch.no_grad():
        hidden = F.relu(F.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                 _t(sd, "proposal_generator.rpn_head.conv.weight"),
                                 _t(sd, "proposal_generator.rpn_head.conv.bias"), padding=1))
        logits = F.conv2d(hidden, _t(sd, "proposal_generator.rpn_head.objectness_logits.weight"),
                          _t(sd, "proposal_generator.rpn_head.objectness_logits.bias"))
        anchor_deltas = F.conv2d(hidden, _t(sd, "proposal_generator.rpn_head.anchor_deltas.weight"),
                                 _t(sd, "proposal_generator.rpn_head.anchor_deltas.bias"))
    _close(scores["P3"].numpy(), logits.numpy().transpose(0, 2, 3, 1))
    # detectron2: channel a * 4 + k is [dx, dy, dw, dh][k] of anchor a (rpn.py's view(N, A, 4, H, W)).
    theirs = anchor_deltas.numpy().transpose(0, 2, 3, 1).reshape(1, 8, 8, 3, 4)
    _close(deltas["P3"].numpy().reshape(1, 8, 8, 3, 4), theirs[..., [1, 0, 3, 2]])


def test_box_head_equals_detectron2(d2_checkpoint, d2_model):
    _, sd = d2_checkpoint
    roi_features = np.random.default_rng(3).normal(0, 1, (1, 5, 7, 7, 256)).astype(np.float32)
    class_logits, box_deltas = d2_model.box_head(roi_features)
    with torch.no_grad():
        x = torch.from_numpy(roi_features[0].transpose(0, 3, 1, 2).copy()).flatten(1)  # NCHW flatten
        for fc in ("fc1", "fc2"):
            x = F.relu(F.linear(x, _t(sd, f"roi_heads.box_head.{fc}.weight"), _t(sd, f"roi_heads.box_head.{fc}.bias")))
        scores = F.linear(x, _t(sd, "roi_heads.box_predictor.cls_score.weight"),
                          _t(sd, "roi_heads.box_predictor.cls_score.bias")).numpy()
        bbox = F.linear(x, _t(sd, "roi_heads.box_predictor.bbox_pred.weight"),
                        _t(sd, "roi_heads.box_predictor.bbox_pred.bias")).numpy()
    class_logits, box_deltas = class_logits.numpy()[0], box_deltas.numpy()[0].reshape(5, NUM_CLASSES + 1, 4)
    _close(class_logits[:, 0], scores[:, NUM_CLASSES])  # background: detectron2's last column
    _close(class_logits[:, 1:], scores[:, :NUM_CLASSES])
    np.testing.assert_array_equal(box_deltas[:, 0], 0.0)
    _close(box_deltas[:, 1:], bbox.reshape(5, NUM_CLASSES, 4)[..., [1, 0, 3, 2]])


def test_mask_head_equals_detectron2(d2_checkpoint, d2_model):
    _, sd = d2_checkpoint
    rng = np.random.default_rng(4)
    features = rng.normal(0, 1, (1, 3, 14, 14, 256)).astype(np.float32)
    classes = np.array([[1, 17, 80]], np.int32)
    ours = d2_model.mask_head(features, classes).numpy()[0]
    prefix = "roi_heads.mask_head"
    with torch.no_grad():
        x = torch.from_numpy(features[0].transpose(0, 3, 1, 2).copy())
        for i in range(1, 5):
            x = F.relu(F.conv2d(x, _t(sd, f"{prefix}.mask_fcn{i}.weight"), _t(sd, f"{prefix}.mask_fcn{i}.bias"),
                                padding=1))
        x = F.relu(F.conv_transpose2d(x, _t(sd, f"{prefix}.deconv.weight"), _t(sd, f"{prefix}.deconv.bias"), stride=2))
        logits = F.conv2d(x, _t(sd, f"{prefix}.predictor.weight"), _t(sd, f"{prefix}.predictor.bias")).numpy()
    for roi, cls in enumerate(classes[0]):
        _close(ours[roi], logits[roi, cls - 1])  # detectron2's mask channel k is contiguous class k + 1


def _build(include_mask=True):
    cfg = config_lib.replace(config_lib.get_preset("detectron2_r50_fpn_1x"), **{
        "model.image_size": (IMAGE_SIZE, IMAGE_SIZE), "model.backbone.weights": None,
        "model.include_mask": include_mask, "model.rpn.pre_nms_top_k_test": 50,
        "model.rpn.post_nms_top_k_test": 20, "model.detection.max_detections": 10,
        "model.detection.pre_nms_top_k": 50})
    return build_model(cfg)


def test_faster_rcnn_checkpoint_fills_a_box_only_model():
    sd = r50_fpn_state_dict(np.random.default_rng(5), mask=False)
    assert not detectron2_mapping.has_mask_head(sd)
    model = _build(include_mask=False)
    detectron2_mapping.assign_detectron2_weights(model, sd)
    kernel = model.box_head.classifier.kernel.numpy()
    np.testing.assert_array_equal(kernel[:, 0], sd["roi_heads.box_predictor.cls_score.weight"][NUM_CLASSES])


def test_wrong_architectures_name_the_key(d2_model):
    rng = np.random.default_rng(6)
    keypoint = r50_fpn_state_dict(rng)
    keypoint["roi_heads.keypoint_head.conv_fcn1.weight"] = np.zeros((512, 256, 3, 3), np.float32)
    keypoint_error = r"key roi_heads\.keypoint_head\.conv_fcn1\.weight \(shape \(512, 256, 3, 3\)\)"
    with pytest.raises(ValueError, match=keypoint_error):
        detectron2_mapping.assign_detectron2_weights(d2_model, keypoint)
    r101 = r50_fpn_state_dict(rng, blocks=(3, 4, 23, 3))
    with pytest.raises(ValueError, match=r"backbone\.bottom_up\.res4\.6\.conv1\.weight: the model has no variable"):
        detectron2_mapping.assign_detectron2_weights(d2_model, r101)
    voc = r50_fpn_state_dict(rng, num_classes=20)
    with pytest.raises(ValueError, match=r"cls_score\.weight: expected shape \(81, D\).*found \(21, 1024\)"):
        detectron2_mapping.assign_detectron2_weights(d2_model, voc)
    wide = r50_fpn_state_dict(rng)
    wide["backbone.fpn_output3.weight"] = np.zeros((256, 256, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"backbone\.fpn_output3\.weight: expected shape \(3, 3, 256, 256\).*"
                                         r"found \(5, 5, 256, 256\)"):
        detectron2_mapping.assign_detectron2_weights(d2_model, wide)


def test_disallowed_global_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.ones(2, np.float32)}, "__author__": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pkl: refused to load: the pickle names global (posix|os)\.mkdir"):
        detectron2_pickle.load_state_dict(str(path))
    assert not marker.exists()
    objects = tmp_path / "objects.pkl"
    with open(objects, "wb") as f:
        pickle.dump({"model": {"w": np.array([1, "a"], dtype=object)}}, f, protocol=2)
    with pytest.raises(ValueError, match=r"objects\.pkl: .*object dtype"):
        detectron2_pickle.load_state_dict(str(objects))
    truncated = tmp_path / "truncated.pkl"
    good = pickle.dumps({"model": {"w": np.ones(100, np.float32)}}, protocol=2)
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pkl: not a readable detectron2 checkpoint"):
        detectron2_pickle.load_state_dict(str(truncated))


def test_detectron2_training_checkpoint_pth_is_read_through_torch_pickle(tmp_path):
    """detectron2's own checkpoints (.pth: torch.save of {"model": ..., "iteration": ...}) read the same."""
    state_dict = {"backbone.fpn_lateral2.weight": np.random.default_rng(8).normal(size=(4, 3, 1, 1)).astype(np.float32),
                  "roi_heads.box_predictor.cls_score.bias": np.arange(5, dtype=np.float32)}
    path = tmp_path / "model_0004999.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}, "iteration": 4999}, path)
    loaded = detectron2_pickle.load_state_dict(str(path))
    assert sorted(loaded) == sorted(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(loaded[key], value)
