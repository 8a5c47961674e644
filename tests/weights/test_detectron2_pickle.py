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
import dataclasses
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


class Zeros:
    """Stands in for the rng of the state-dict builders when only the shapes matter (recognising a model
    from its keys): normal() gives its mean, uniform() its low end; np.zeros costs no time or memory
    until written."""

    @staticmethod
    def normal(loc, scale, size):
        return np.zeros(size, np.float32) if loc == 0 else np.full(size, loc, np.float32)

    @staticmethod
    def uniform(low, high, size):
        return np.full(size, low, np.float32)


def r50_fpn_state_dict(rng, blocks=R50_BLOCKS, mask=True, num_classes=NUM_CLASSES, groups=1, width_per_group=64):
    """Random float32 arrays under every key of detectron2's mask_rcnn_R_50_FPN (module docstring); blocks
    (3, 4, 23, 3) gives mask_rcnn_R_101_FPN's. groups / width_per_group > 1 / other than 64: the ResNeXt of
    backbone/resnet.py (bottleneck width groups x width_per_group x 2**(stage - 2), 3x3 conv weight
    [width, width / groups, 3, 3], outputs 256 x 2**(stage - 2) as for a ResNet)."""
    sd = {}
    _conv_norm(sd, rng, "backbone.bottom_up.stem.conv1", 64, 3, 7)
    in_ch = 64
    for stage, (num_blocks, base_width) in enumerate(zip(blocks, STAGE_WIDTHS), start=2):
        out_ch = base_width * 4
        width = groups * width_per_group * 2 ** (stage - 2)
        for b in range(num_blocks):
            p = f"backbone.bottom_up.res{stage}.{b}"
            if b == 0:
                _conv_norm(sd, rng, f"{p}.shortcut", out_ch, in_ch, 1)
            _conv_norm(sd, rng, f"{p}.conv1", width, in_ch if b == 0 else out_ch, 1)
            _conv_norm(sd, rng, f"{p}.conv2", width, width // groups, 3)
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
    weight = _t(sd, f"{prefix}.weight")
    y = F.conv2d(x, weight, stride=stride, padding=padding, groups=x.shape[1] // weight.shape[1])
    scale = _t(sd, f"{prefix}.norm.weight") * torch.rsqrt(_t(sd, f"{prefix}.norm.running_var") + FROZEN_BN_EPS)
    shift = _t(sd, f"{prefix}.norm.bias") - _t(sd, f"{prefix}.norm.running_mean") * scale
    y = y * scale[None, :, None, None] + shift[None, :, None, None]
    return F.relu(y) if relu else y


def stage_blocks(sd):
    """res2..res5 block counts of a detectron2 state dict, read from its keys."""
    return tuple(len({key.split(".")[3] for key in sd if key.startswith(f"backbone.bottom_up.res{stage}.")})
                 for stage in range(2, 6))


def d2_features(sd, bgr):
    """detectron2 ResNet (stride in the 1x1 conv, STRIDE_IN_1X1=True; depth and 3x3 groups those of the
    state dict) + FPN + LastLevelMaxPool."""
    x = _d2_conv_norm(sd, "backbone.bottom_up.stem.conv1", bgr, stride=2, padding=3)
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    features = {}
    for stage, num_blocks in enumerate(stage_blocks(sd), start=2):
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


# ------------------------------------------- R101, and the models recognised from the keys (issue 26)

R101_BLOCKS = (3, 4, 23, 3)  # detectron2 ResNet.make_default_stages(depth=101)
R101_PRESET = "detectron2_r101_fpn_3x"
SUPPORTED = ("maskrcnn_tf imports detectron2's R50-FPN and R101-FPN with the 2-fc box head "
             "(detectron2_r50_fpn_1x, detectron2_r101_fpn_3x)")
# A small canvas and few proposals: building the model runs it once, and RoIAlign of 1000 proposals
# dominates that at this size.
SMALL = {"model.image_size": [IMAGE_SIZE, IMAGE_SIZE], "model.resize_short_side": IMAGE_SIZE,
         "model.resize_max_long_side": IMAGE_SIZE, "model.rpn.pre_nms_top_k_test": 50,
         "model.rpn.post_nms_top_k_test": 20, "model.detection.max_detections": 10,
         "model.detection.pre_nms_top_k": 50}


def _bn(sd, rng, prefix, channels, counter):
    sd[f"{prefix}.norm.weight"] = rng.uniform(0.3, 0.8, channels).astype(np.float32)
    sd[f"{prefix}.norm.bias"] = rng.normal(0, 0.1, channels).astype(np.float32)
    if counter is not None:  # BatchNorm: statistics (and a counter unless frozen); GroupNorm: none
        sd[f"{prefix}.norm.running_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
        sd[f"{prefix}.norm.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        sd[f"{prefix}.norm.num_batches_tracked"] = np.array(counter, np.int64)


def normed_heads_state_dict(sd, rng, norm="BN"):
    """An R-FPN state dict turned into one with norms in the FPN and heads, as detectron2 builds them
    (layers/wrappers.py Conv2d(norm=...) without bias; fpn.py use_bias = norm == ""):
    norm "BN": new_baselines/mask_rcnn_R_{50,101}_FPN_*ep_LSJ (SyncBN backbone and FPN, saving
    num_batches_tracked; NaiveSyncBatchNorm 4conv1fc box head and mask head; RPN conv_dims [-1, -1]:
    rpn_head.conv.conv0 / conv1); norm "GN": Misc/mask_rcnn_R_50_FPN_3x_gn (GroupNorm in the backbone,
    FPN, 4conv1fc box head and mask head; one RPN conv)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("backbone.bottom_up.") and ".norm.running_" in key and norm == "GN":
            continue
        out[key] = value
        if key.startswith("backbone.bottom_up.") and key.endswith(".norm.running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = np.array(1000, np.int64)
    counter = 1000 if norm == "BN" else None
    for level in (2, 3, 4, 5):
        for name in (f"backbone.fpn_lateral{level}", f"backbone.fpn_output{level}"):
            del out[f"{name}.bias"]
            _bn(out, rng, name, 256, counter)
    if norm == "BN":
        rpn = "proposal_generator.rpn_head.conv"
        for k in (0, 1):
            out[f"{rpn}.conv{k}.weight"] = out[f"{rpn}.weight"] if k == 0 else out[f"{rpn}.weight"].copy()
            out[f"{rpn}.conv{k}.bias"] = out[f"{rpn}.bias"]
        del out[f"{rpn}.weight"], out[f"{rpn}.bias"]
    for fc in ("fc1", "fc2"):
        for part in ("weight", "bias"):
            del out[f"roi_heads.box_head.{fc}.{part}"]
    for i in range(1, 5):
        out[f"roi_heads.box_head.conv{i}.weight"] = rng.normal(0, 0.02, (256, 256, 3, 3)).astype(np.float32)
        _bn(out, rng, f"roi_heads.box_head.conv{i}", 256, counter)
        del out[f"roi_heads.mask_head.mask_fcn{i}.bias"]
        _bn(out, rng, f"roi_heads.mask_head.mask_fcn{i}", 256, counter)
    out["roi_heads.box_head.fc1.weight"] = rng.normal(0, 0.01, (1024, 256 * 7 * 7)).astype(np.float32)
    out["roi_heads.box_head.fc1.bias"] = rng.normal(0, 0.01, 1024).astype(np.float32)
    return out


def cascade_state_dict(sd):
    """Misc/cascade_mask_rcnn_R_50_FPN_3x's box side (CascadeROIHeads: box_head.{0,1,2}, box_predictor.{0,1,2},
    class-agnostic bbox_pred [4, 1024])."""
    out = {k: v for k, v in sd.items() if not k.startswith(("roi_heads.box_head.", "roi_heads.box_predictor."))}
    for stage in range(3):
        for key, value in sd.items():
            if key.startswith(("roi_heads.box_head.", "roi_heads.box_predictor.")):
                head, rest = key[len("roi_heads."):].split(".", 1)
                out[f"roi_heads.{head}.{stage}.{rest}"] = value[:4] if ".bbox_pred." in key else value
    return out


def keypoint_state_dict(sd):
    """COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x's heads: the box head and a KRCNNConvDeconvUpsampleHead
    (conv_fcn1..8, score_lowres), person only, no mask head."""
    out = {k: v for k, v in sd.items() if not k.startswith("roi_heads.mask_head.")}
    for i in range(1, 9):
        out[f"roi_heads.keypoint_head.conv_fcn{i}.weight"] = np.zeros((512, 256 if i == 1 else 512, 3, 3), np.float32)
        out[f"roi_heads.keypoint_head.conv_fcn{i}.bias"] = np.zeros(512, np.float32)
    out["roi_heads.keypoint_head.score_lowres.weight"] = np.zeros((512, 17, 4, 4), np.float32)
    return out


@pytest.fixture(scope="module")
def r101_checkpoint(tmp_path_factory):
    """A mask_rcnn_R_101_FPN_3x model-zoo pickle (2019 layout: the weights and the five cell_anchors)."""
    state_dict = r50_fpn_state_dict(np.random.default_rng(10), blocks=R101_BLOCKS)
    path = tmp_path_factory.mktemp("d2_r101") / "model_final_r101.pkl"
    return path, write_model_zoo_pickle(path, state_dict)


def test_r101_model_zoo_pickle_imports_with_the_r101_preset_and_equals_detectron2(r101_checkpoint, tmp_path):
    """No --config: the R101 preset is recognised from res4's 23 blocks; the written model directory restores
    a ResNet-101 whose backbone + FPN equal detectron2's forward of the same state dict."""
    from maskrcnn_tf import run_dir
    from maskrcnn_tf.weights import importer

    path, sd = r101_checkpoint
    assert stage_blocks(sd) == R101_BLOCKS
    result = importer.import_checkpoint("detectron2", str(path), str(tmp_path / "r101"), SMALL)
    assert (result.preset, result.include_mask, result.num_classes) == (R101_PRESET, True, NUM_CLASSES)
    assert result.checked == ["5 cell_anchors"] and result.norm_epsilon == FROZEN_BN_EPS
    assert f"detectron2 Mask R-CNN ({R101_PRESET}), 80 classes" in result.summary(str(path))
    cfg, model = run_dir.restore_model(str(tmp_path / "r101"))
    assert cfg.model.backbone.name == "resnet101" and cfg.train.total_steps == 270000
    names = {layer.name for layer in model.backbone.network.layers}
    assert "conv4_block23_3_conv" in names and "conv4_block24_1_conv" not in names
    rgb = np.random.default_rng(11).normal(0, 30, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    ours = model.fpn(model.backbone(rgb))
    with torch.no_grad():
        reference = d2_features(sd, torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1].transpose(0, 3, 1, 2))))
    for level in (2, 3, 4, 5, 6):
        _close(ours[f"P{level}"].numpy(), reference[level].numpy().transpose(0, 2, 3, 1))


def test_a_file_of_the_other_depth_forced_into_a_preset_is_one_line(r101_checkpoint, tmp_path):
    from maskrcnn_tf.weights import importer

    path, _ = r101_checkpoint
    with pytest.raises(ValueError) as error:
        importer.import_checkpoint("detectron2", str(path), str(tmp_path / "r50"), SMALL,
                                   preset="detectron2_r50_fpn_1x")
    assert str(error.value) == (
        f"{path}: the checkpoint is a ResNet-101 (res2..res5 blocks 3, 4, 23, 3; 3x3 convs in 1 group of 64 "
        "channels at res2) with an FPN, a 2-fc box head and a mask head (detectron2 mask_rcnn_R_101_FPN_3x?) but "
        "--config=detectron2_r50_fpn_1x builds a resnet50 (res2..res5 blocks 3, 4, 6, 3); import it with "
        f"--config={R101_PRESET} (or without --config: it is recognised from its keys)")
    assert not (tmp_path / "r50").exists()
    r50 = r50_fpn_state_dict(Zeros, mask=False)
    r101_model = config_lib.get_preset(R101_PRESET).model
    with pytest.raises(ValueError, match=r"^the checkpoint is a ResNet-50 \(res2\.\.res5 blocks 3, 4, 6, 3; .*"
                                         r"a 2-fc box head \(detectron2 faster_rcnn_R_50_FPN_1x or 3x\?\) but "
                                         rf"--config={R101_PRESET} builds a resnet101 .*"
                                         r"--config=detectron2_r50_fpn_1x "):
        detectron2_mapping.check_architecture(r50, r101_model, R101_PRESET)
    # An override that builds the file's model is accepted, one that builds neither is named.
    detectron2_mapping.check_architecture(r50, dataclasses.replace(
        r101_model, backbone=dataclasses.replace(r101_model.backbone, name="resnet50")), R101_PRESET)
    with pytest.raises(ValueError, match=r"the overridden model is not one of detectron2's \(model\.backbone\.name="
                                         r"resnet101, model\.fpn_norm=none, .*model\.heads\.num_fcs=1, .*"
                                         rf"import it with --config={R101_PRESET} and without --params_override"):
        detectron2_mapping.check_architecture(
            r50_fpn_state_dict(Zeros, blocks=R101_BLOCKS), dataclasses.replace(
                r101_model, heads=dataclasses.replace(r101_model.heads, num_fcs=1)), R101_PRESET)


def test_the_preset_is_recognised_from_the_stage_depths():
    from maskrcnn_tf.weights import importer

    for blocks, mask, preset in ((R50_BLOCKS, True, "detectron2_r50_fpn_1x"), (R101_BLOCKS, False, R101_PRESET)):
        sd = model_zoo_model(r50_fpn_state_dict(Zeros, blocks=blocks, mask=mask))
        assert detectron2_mapping.preset_for(sd) == importer.preset_of("detectron2", sd) == preset
        found = detectron2_mapping.architecture(sd)
        assert (found.blocks, found.groups, found.width_per_group, found.box_fcs, found.mask) == (
            blocks, 1, 64, 2, mask)
        detectron2_mapping.check_architecture(sd, config_lib.get_preset(preset).model, preset)
    assert importer.SOURCES["detectron2"].presets == ("detectron2_r50_fpn_1x", R101_PRESET)
    with pytest.raises(ValueError, match=r"--config=torchvision_maskrcnn_r50_fpn: a detectron2 checkpoint imports "
                                         rf"into detectron2_r50_fpn_1x or {R101_PRESET}"):
        importer.import_config("detectron2", True, preset="torchvision_maskrcnn_r50_fpn")


def _refusal(sd):
    with pytest.raises(ValueError) as error:
        detectron2_mapping.check_architecture(sd, config_lib.get_preset("detectron2_r50_fpn_1x").model,
                                              "detectron2_r50_fpn_1x")
    message = str(error.value)
    assert "\n" not in message and message.endswith(f"; {SUPPORTED}"), message
    return message[:-len(f"; {SUPPORTED}")]


def test_models_no_preset_builds_are_named_in_one_line():
    """Stage depths, 3x3 groups and width per group, norms and head layout, with the model-zoo name they
    look like. Shapes only (zero weights): nothing is built."""
    rng = np.random.default_rng(12)
    r50 = r50_fpn_state_dict(Zeros)
    r101 = r50_fpn_state_dict(Zeros, blocks=R101_BLOCKS)
    lsj = " with a BatchNorm FPN, a 2-conv RPN head, a 4-conv + 1-fc box head with BatchNorm and a mask head " \
          "with BatchNorm (detectron2 new_baselines/mask_rcnn_R_{}_FPN_*ep_LSJ?)"
    cases = {
        "x101": (r50_fpn_state_dict(Zeros, blocks=R101_BLOCKS, groups=32, width_per_group=8),
                 "the checkpoint is a ResNeXt-101 32x8d (res2..res5 blocks 3, 4, 23, 3; 3x3 convs in 32 groups of 8 "
                 "channels at res2) with an FPN, a 2-fc box head and a mask head (detectron2 "
                 "mask_rcnn_X_101_32x8d_FPN_3x?)"),
        "lsj r50": (normed_heads_state_dict(r50, rng), "the checkpoint is a ResNet-50 (res2..res5 blocks 3, 4, 6, 3; "
                    "3x3 convs in 1 group of 64 channels at res2)" + lsj.format(50)),
        "lsj r101": (normed_heads_state_dict(r101, rng), "the checkpoint is a ResNet-101 (res2..res5 blocks 3, 4, 23, "
                     "3; 3x3 convs in 1 group of 64 channels at res2)" + lsj.format(101)),
        "gn": (normed_heads_state_dict(r50, rng, norm="GN"),
               "the checkpoint is a ResNet-50 (res2..res5 blocks 3, 4, 6, 3; 3x3 convs in 1 group of 64 channels at "
               "res2; GroupNorm in the backbone) with a GroupNorm FPN, a 4-conv + 1-fc box head with GroupNorm and a "
               "mask head with GroupNorm (detectron2 Misc/mask_rcnn_R_50_FPN_3x_gn?)"),
        "cascade": (cascade_state_dict(r50), "the checkpoint is a ResNet-50 (res2..res5 blocks 3, 4, 6, 3; 3x3 convs "
                    "in 1 group of 64 channels at res2) with an FPN, a 3-stage Cascade R-CNN box head and a mask head "
                    "(detectron2 Misc/cascade_mask_rcnn_R_50_FPN_*?)"),
        "keypoint": (keypoint_state_dict(r50), "the checkpoint is a ResNet-50 (res2..res5 blocks 3, 4, 6, 3; 3x3 "
                     "convs in 1 group of 64 channels at res2) with an FPN, a 2-fc box head and a keypoint head "
                     "(detectron2 keypoint_rcnn_R_50_FPN_1x or 3x?)"),
        "r152": (r50_fpn_state_dict(Zeros, blocks=(3, 8, 36, 3), mask=False), "the checkpoint is a ResNet-152 "
                 "(res2..res5 blocks 3, 8, 36, 3; 3x3 convs in 1 group of 64 channels at res2) with an FPN and a 2-fc "
                 "box head"),
    }
    for name, (sd, expected) in cases.items():
        assert _refusal(sd) == expected, name
        assert detectron2_mapping.preset_for(sd) == "detectron2_r50_fpn_1x", name  # refused by check_architecture
    # Not a detectron2 R-FPN at all (no backbone.bottom_up.res2..5): left to the key mapping's message.
    detectron2_mapping.check_architecture({"backbone.res2.0.conv1.weight": np.zeros(1, np.float32)},
                                          config_lib.get_preset("detectron2_r50_fpn_1x").model, "detectron2_r50_fpn_1x")


def test_model_zoo_files_no_preset_builds_end_in_one_line(tmp_path):
    """The pickles themselves: an LSJ-baseline file through import_checkpoint, a ResNeXt-101 32x8d file
    through import_weights.py (exit status 1, one error line naming the file, no traceback, no model
    directory). Zero weights: only the keys and shapes are read before the refusal."""
    import subprocess
    import sys

    from maskrcnn_tf.weights import importer
    from tests.conftest import REPO_ROOT

    lsj = tmp_path / "model_final_lsj.pkl"
    write_model_zoo_pickle(lsj, normed_heads_state_dict(r50_fpn_state_dict(Zeros), np.random.default_rng(13)))
    with pytest.raises(ValueError, match=rf"^{lsj}: the checkpoint is a ResNet-50 \(res2\.\.res5 blocks 3, 4, 6, 3; "
                                         r".*a 4-conv \+ 1-fc box head with BatchNorm .*_LSJ\?\); "
                                         r"maskrcnn_tf imports "):
        importer.import_checkpoint("detectron2", str(lsj), str(tmp_path / "lsj"))
    x101 = tmp_path / "model_final_x101.pkl"
    write_model_zoo_pickle(x101, r50_fpn_state_dict(Zeros, blocks=R101_BLOCKS, groups=32, width_per_group=8))
    model_dir = tmp_path / "x101"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "import_weights.py"), "--source=detectron2", f"--checkpoint={x101}",
         f"--model_dir={model_dir}"], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: {x101}: the checkpoint is a ResNeXt-101 32x8d (res2..res5 blocks 3, 4, 23, 3; 3x3 convs in 32 groups "
        "of 8 channels at res2) with an FPN, a 2-fc box head and a mask head (detectron2 mask_rcnn_X_101_32x8d_FPN_3x?)"
        f"; {SUPPORTED}"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not model_dir.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
