"""The architecture fields of torchvision's v2 detector, layer by layer, against torchvision's own modules
(torch as the executable oracle; weights copied with weights/layout.py's conversions):

- FPN with norm="batch_norm" = FeaturePyramidNetwork(norm_layer=nn.BatchNorm2d) + LastLevelMaxPool;
- RPNHead(num_convs=2) = RPNHead(conv_depth=2);
- BoxHead(num_convs, conv_dim, norm, num_fcs=1) = FastRCNNConvFCHead + FastRCNNPredictor, including
  the (C, H, W) flatten order of the first Linear;
- MaskHead(norm="batch_norm") = MaskRCNNHeads(norm_layer=nn.BatchNorm2d) + MaskRCNNPredictor;
- Backbone(norm="batch_norm") = torchvision's resnet50 with nn.BatchNorm2d;
each in inference (moving statistics) and in training (batch statistics, moving statistics updated with
torch's momentum 0.1), and "sync_batch_norm" under two replicas = one BatchNorm over both replicas' images.

BN layers get random affine parameters and running statistics, so a missing norm, a wrong epsilon, a
swapped mean/variance or a bias left on a conv before a norm all change the outputs.
Keras updates the moving variance with the biased batch variance, torch with the unbiased one: the
expected moving variance below is torch's with that factor n / (n - 1) taken out.
"""
import collections

import numpy as np
import pytest

from tests.torch_oracle import import_torchvision, resnet_features

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf.layers.backbone import Backbone  # noqa: E402
from maskrcnn_tf.layers.box_head import BoxHead  # noqa: E402
from maskrcnn_tf.layers.fpn import FPN  # noqa: E402
from maskrcnn_tf.layers.mask_head import MaskHead  # noqa: E402
from maskrcnn_tf.layers.rpn_head import RPNHead  # noqa: E402
from maskrcnn_tf.weights import layout, torchvision_mapping  # noqa: E402
from tests.conftest import two_replica_strategy  # noqa: E402

C_CHANNELS = (4, 6, 8, 10)  # C2..C5, deliberately different
FILTERS = 8
SIZE = 64  # input side: C2 is 16 x 16, ..., C5 2 x 2
TORCH_MOMENTUM = 0.1
REL_TOL = 1e-4  # of the largest magnitude of each compared output
# ResNet-50 in training mode: 53 BN layers normalise with batch statistics of 32..8192 values each, which
# amplifies float32 rounding (measured: up to ~6e-5 of the largest C4 value on an AVX-512 CPU).
BACKBONE_TRAINING_REL_TOL = 3e-4


def _randomize(module, seed):
    """Random weights and biases, random BN affine parameters and running statistics (in place)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
    return module


def _numpy(t):
    return t.detach().numpy()


def _copy_bn(ours, bn):
    for variable, buffer in torchvision_mapping.BN_BUFFERS:
        getattr(ours, variable).assign(_numpy(getattr(bn, buffer)))


def _copy_conv(ours, conv, kernel_fn=layout.conv_kernel):
    ours.kernel.assign(kernel_fn(_numpy(conv.weight)))
    assert (conv.bias is None) == (not ours.use_bias), ours.name  # no bias exactly before a norm
    if conv.bias is not None:
        ours.bias.assign(_numpy(conv.bias))


def _close(actual, expected, what, rel_tol=REL_TOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel_tol * scale, err_msg=what)


def _assert_moving_statistics(ours, bn, old_mean, old_var, count, what):
    """ours (Keras BN) after one training call = torch's bn after one train-mode forward, with torch's
    unbiased variance update turned into Keras' biased one (module docstring)."""
    _close(ours.moving_mean.numpy(), _numpy(bn.running_mean), f"{what} moving mean")
    batch_var_unbiased = (_numpy(bn.running_var) - (1 - TORCH_MOMENTUM) * old_var) / TORCH_MOMENTUM
    expected = (1 - TORCH_MOMENTUM) * old_var + TORCH_MOMENTUM * batch_var_unbiased * (count - 1) / count
    _close(ours.moving_variance.numpy(), expected, f"{what} moving variance")
    # And the update really moved them (the test would prove nothing otherwise).
    assert np.abs(ours.moving_mean.numpy() - old_mean).max() > 1e-3, what


# ------------------------------------------------------------------------------------------------ FPN


def _c_features(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return {f"C{l}": rng.normal(size=(batch, SIZE // 2**l, SIZE // 2**l, c)).astype(np.float32)
            for l, c in zip((2, 3, 4, 5), C_CHANNELS)}


def _torch_fpn():
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    return _randomize(FeaturePyramidNetwork(list(C_CHANNELS), FILTERS, extra_blocks=LastLevelMaxPool(),
                                            norm_layer=torch.nn.BatchNorm2d), seed=1)


def _our_fpn(reference, norm="batch_norm"):
    fpn = FPN(num_filters=FILTERS, norm=norm)
    fpn(_c_features())
    for i in range(4):
        _copy_conv(fpn.lateral_convs[i], reference.inner_blocks[i][0])
        _copy_bn(fpn.lateral_norms[i], reference.inner_blocks[i][1])
        _copy_conv(fpn.output_convs[i], reference.layer_blocks[i][0])
        _copy_bn(fpn.output_norms[i], reference.layer_blocks[i][1])
    return fpn


def _torch_fpn_outputs(reference, features):
    x = collections.OrderedDict((str(i), torch.from_numpy(features[f"C{l}"]).permute(0, 3, 1, 2))
                                for i, l in enumerate((2, 3, 4, 5)))
    out = reference(x)
    return {f"P{l}": _numpy(v.permute(0, 2, 3, 1)) for l, v in zip(range(2, 7), out.values())}


def _fpn_norm_state(reference):
    return [(_numpy(b[1].running_mean).copy(), _numpy(b[1].running_var).copy())
            for b in list(reference.inner_blocks) + list(reference.layer_blocks)]


def _assert_fpn_statistics(fpn, reference, old, features):
    norms = fpn.lateral_norms + fpn.output_norms
    blocks = list(reference.inner_blocks) + list(reference.layer_blocks)
    for i, (ours, block, (mean, var)) in enumerate(zip(norms, blocks, old)):
        level = 2 + i % 4
        batch, height, width, _ = features[f"C{level}"].shape
        _assert_moving_statistics(ours, block[1], mean, var, batch * height * width, ours.name)


def test_fpn_with_batch_norm_equals_torchvision_in_inference_and_training():
    reference = _torch_fpn()
    fpn = _our_fpn(reference)
    features = _c_features()
    assert not any(conv.use_bias for conv in fpn.lateral_convs + fpn.output_convs)
    reference.eval()
    with torch.no_grad():
        expected = _torch_fpn_outputs(reference, features)
    ours = fpn({k: tf.constant(v) for k, v in features.items()}, training=False)
    for key in expected:
        _close(ours[key], expected[key], f"inference {key}")

    old = _fpn_norm_state(reference)
    reference.train()
    with torch.no_grad():
        expected = _torch_fpn_outputs(reference, features)
    ours = fpn({k: tf.constant(v) for k, v in features.items()}, training=True)
    for key in expected:
        _close(ours[key], expected[key], f"training {key}")
    _assert_fpn_statistics(fpn, reference, old, features)


def test_sync_batch_norm_takes_statistics_over_both_replicas():
    """Two replicas, one image each: sync_batch_norm equals torchvision's BN over both images (outputs and
    moving statistics); plain batch_norm takes each replica's own image and differs."""
    strategy = two_replica_strategy()
    features = _c_features(batch=2, seed=3)
    reference = _torch_fpn().train()
    old = _fpn_norm_state(reference)
    with torch.no_grad():
        expected = _torch_fpn_outputs(reference, features)

    def per_replica(ctx):
        i = ctx.replica_id_in_sync_group
        return {k: tf.constant(v)[i:i + 1] for k, v in features.items()}

    results = {}
    for norm in ("sync_batch_norm", "batch_norm"):
        with strategy.scope():
            fpn = _our_fpn(_torch_fpn(), norm=norm)
        inputs = strategy.experimental_distribute_values_from_function(per_replica)
        outputs = strategy.run(tf.function(lambda x, fpn=fpn: fpn(x, training=True)), args=(inputs,))
        results[norm] = (fpn, {k: np.concatenate([t.numpy() for t in strategy.experimental_local_results(v)])
                               for k, v in outputs.items()})
    fpn, ours = results["sync_batch_norm"]
    for key in expected:
        _close(ours[key], expected[key], f"sync {key}")
    _assert_fpn_statistics(fpn, reference, old, features)
    _, per_image = results["batch_norm"]
    assert np.abs(per_image["P2"] - expected["P2"]).max() > 1e-2 * np.abs(expected["P2"]).max()


# --------------------------------------------------------------------------------------------- heads


def test_rpn_head_with_two_convs_equals_torchvision():
    from torchvision.models.detection.rpn import RPNHead as TorchRPNHead

    num_anchors = 3
    reference = _randomize(TorchRPNHead(FILTERS, num_anchors, conv_depth=2), seed=2).eval()
    head = RPNHead(num_anchors_per_location=num_anchors, num_filters=FILTERS, num_convs=2)
    rng = np.random.default_rng(4)
    pyramid = {f"P{l}": rng.normal(size=(2, 64 // 2**l, 64 // 2**l, FILTERS)).astype(np.float32)
               for l in range(2, 7)}
    head({k: tf.constant(v) for k, v in pyramid.items()})
    assert [c.name for c in [head.conv] + head.more_convs] == ["conv", "conv2"]
    _copy_conv(head.conv, reference.conv[0][0])
    _copy_conv(head.more_convs[0], reference.conv[1][0])
    _copy_conv(head.objectness, reference.cls_logits)
    head.box_deltas.kernel.assign(layout.box_code_order(layout.conv_kernel(_numpy(reference.bbox_pred.weight)), 3))
    head.box_deltas.bias.assign(layout.box_code_order(_numpy(reference.bbox_pred.bias)))
    scores, deltas = head({k: tf.constant(v) for k, v in pyramid.items()})
    with torch.no_grad():
        logits, boxes = reference([torch.from_numpy(v).permute(0, 3, 1, 2) for v in pyramid.values()])
    for key, expected_scores, expected_boxes in zip(pyramid, logits, boxes):
        _close(scores[key], _numpy(expected_scores.permute(0, 2, 3, 1)), f"objectness {key}")
        _close(deltas[key], layout.box_code_order(_numpy(expected_boxes.permute(0, 2, 3, 1)), 3), f"deltas {key}")


NUM_CLASSES = 3  # K; torchvision's heads have K + 1 outputs
NUM_ROIS = 6


def test_conv_fc_box_head_with_batch_norm_equals_torchvision():
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor

    conv_dim, fc_dim = 16, 32
    body = _randomize(FastRCNNConvFCHead((FILTERS, 7, 7), [conv_dim, conv_dim], [fc_dim],
                                         norm_layer=torch.nn.BatchNorm2d), seed=5)
    predictor = _randomize(FastRCNNPredictor(fc_dim, NUM_CLASSES + 1), seed=6)
    head = BoxHead(num_classes=NUM_CLASSES, num_fcs=1, fc_dim=fc_dim, num_convs=2, conv_dim=conv_dim,
                   norm="batch_norm")
    rois = np.random.default_rng(7).normal(size=(1, NUM_ROIS, 7, 7, FILTERS)).astype(np.float32)
    head(tf.constant(rois))
    for i in range(2):
        _copy_conv(head.convs[i], body[i][0])
        _copy_bn(head.conv_norms[i], body[i][1])
    linear = body[3]  # 0, 1: Conv2dNormActivation, 2: Flatten, 3: Linear, 4: ReLU
    head.fcs[0].kernel.assign(layout.dense_kernel_after_nchw_flatten(_numpy(linear.weight), conv_dim, 7, 7))
    head.fcs[0].bias.assign(_numpy(linear.bias))
    head.classifier.kernel.assign(layout.dense_kernel(_numpy(predictor.cls_score.weight)))
    head.classifier.bias.assign(_numpy(predictor.cls_score.bias))
    head.box_regressor.kernel.assign(layout.dense_kernel(layout.box_code_order(_numpy(predictor.bbox_pred.weight))))
    head.box_regressor.bias.assign(layout.box_code_order(_numpy(predictor.bbox_pred.bias)))
    x = torch.from_numpy(rois[0]).permute(0, 3, 1, 2)
    for training in (False, True):
        old = [(_numpy(body[i][1].running_mean).copy(), _numpy(body[i][1].running_var).copy()) for i in range(2)]
        body.train(training)
        with torch.no_grad():
            expected_logits, expected_deltas = predictor(body(x))
        logits, deltas = head(tf.constant(rois), training=training)
        _close(logits[0], _numpy(expected_logits), f"class logits, training={training}")
        _close(deltas[0], layout.box_code_order(_numpy(expected_deltas), 1), f"box deltas, training={training}")
        if training:
            for i, (mean, var) in enumerate(old):
                _assert_moving_statistics(head.conv_norms[i], body[i][1], mean, var, NUM_ROIS * 49, f"conv{i + 1}")


def test_mask_head_with_batch_norm_equals_torchvision():
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    filters = 16
    body = _randomize(MaskRCNNHeads(FILTERS, [filters, filters], 1, norm_layer=torch.nn.BatchNorm2d), seed=8)
    predictor = _randomize(MaskRCNNPredictor(filters, filters, NUM_CLASSES + 1), seed=9)
    head = MaskHead(num_classes=NUM_CLASSES, num_convs=2, num_filters=filters, norm="batch_norm")
    features = np.random.default_rng(10).normal(size=(1, NUM_ROIS, 14, 14, FILTERS)).astype(np.float32)
    classes = np.array([[1, 3, 2, 2, 1, 3]], np.int32)
    head(tf.constant(features), tf.constant(classes))
    for i in range(2):
        _copy_conv(head.convs[i], body[i][0])
        _copy_bn(head.conv_norms[i], body[i][1])
    _copy_conv(head.deconv, predictor.conv5_mask, layout.deconv_kernel)
    head.predictor.kernel.assign(layout.conv_kernel(_numpy(predictor.mask_fcn_logits.weight)[1:]))
    head.predictor.bias.assign(_numpy(predictor.mask_fcn_logits.bias)[1:])
    x = torch.from_numpy(features[0]).permute(0, 3, 1, 2)
    for training in (False, True):
        old = [(_numpy(body[i][1].running_mean).copy(), _numpy(body[i][1].running_var).copy()) for i in range(2)]
        body.train(training)
        with torch.no_grad():
            all_logits = _numpy(predictor(body(x)))  # [S, K + 1, 28, 28]
        expected = all_logits[np.arange(NUM_ROIS), classes[0]]
        _close(head(tf.constant(features), tf.constant(classes), training=training)[0], expected,
               f"mask logits, training={training}")
        if training:
            for i, (mean, var) in enumerate(old):
                _assert_moving_statistics(head.conv_norms[i], body[i][1], mean, var, NUM_ROIS * 196, f"conv{i + 1}")


def test_default_layers_keep_todays_variables():
    """norm="none", one RPN conv and no box convs add nothing: the variable names (checkpoint keys) and the
    biases are those of the layers before these fields existed."""
    fpn = FPN(num_filters=FILTERS)
    fpn({k: tf.constant(v) for k, v in _c_features(batch=1).items()})
    assert sorted(v.path.split("/", 1)[1] for v in fpn.weights) == sorted(
        f"{kind}_P{l}/{name}" for kind in ("lateral", "output") for l in (2, 3, 4, 5) for name in ("kernel", "bias"))
    box = BoxHead(num_classes=NUM_CLASSES)
    box(tf.zeros([1, 2, 7, 7, FILTERS]))
    assert [v.path.split("/", 1)[1] for v in box.weights] == [
        f"{layer}/{name}" for layer in ("fc1", "fc2", "classifier", "box_regressor") for name in ("kernel", "bias")]
    mask = MaskHead(num_classes=NUM_CLASSES, num_convs=2, num_filters=FILTERS)
    mask(tf.zeros([1, 2, 14, 14, FILTERS]), tf.ones([1, 2], tf.int32))
    assert [v.path.split("/", 1)[1] for v in mask.weights] == [
        f"{layer}/{name}" for layer in ("conv1", "conv2", "deconv", "predictor") for name in ("kernel", "bias")]
    rpn = RPNHead(num_anchors_per_location=3, num_filters=FILTERS)
    rpn({"P2": tf.zeros([1, 8, 8, FILTERS])})
    assert sorted(v.path.split("/", 1)[1] for v in rpn.weights) == sorted(
        f"{layer}/{name}" for layer in ("conv", "objectness", "box_deltas") for name in ("kernel", "bias"))


@pytest.mark.parametrize("norm", ["group_norm"])
def test_group_norm_has_32_groups_and_no_conv_bias(norm):
    head = MaskHead(num_classes=NUM_CLASSES, num_convs=1, num_filters=64, norm=norm)
    head(tf.zeros([1, 2, 14, 14, FILTERS]), tf.ones([1, 2], tf.int32))
    assert head.conv_norms[0].groups == 32 and head.conv_norms[0].epsilon == 1e-5
    assert not head.convs[0].use_bias


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="FPN: norm='layer_norm'; expected one of none, batch_norm"):
        FPN(norm="layer_norm")


# ------------------------------------------------------------------------------------------- backbone


def test_trainable_batch_norm_backbone_equals_torchvision_resnet50():
    """norm="batch_norm" (torchvision v2 from scratch: nn.BatchNorm2d, eps 1e-5, all stages trainable):
    inference = torchvision in eval mode, training = torchvision in train mode (batch statistics and the
    running statistics' update)."""
    resnet = _randomize(torchvision.models.resnet50(weights=None), seed=11)
    backbone = Backbone(name="resnet50", freeze_at=0, stride_in_3x3=True, norm_epsilon=1e-5, norm="batch_norm")
    torchvision_mapping.assign_torchvision_backbone(backbone, {k: _numpy(v) for k, v in resnet.state_dict().items()})
    norms = {layer.name: layer for layer in backbone.network.layers if layer.name.endswith("_bn")}
    assert all(n.trainable and n.momentum == 0.9 and n.epsilon == 1e-5 for n in norms.values())
    images = np.random.default_rng(12).normal(size=(2, 128, 128, 3)).astype(np.float32)

    def torch_features():
        return resnet_features(resnet, images)

    resnet.eval()
    expected = torch_features()
    ours = backbone(tf.constant(images), training=False)
    for key in expected:
        _close(ours[key], expected[key], f"inference {key}")

    watched = {"conv1_bn": resnet.bn1, "conv3_block1_0_bn": resnet.layer2[0].downsample[1],
               "conv5_block3_3_bn": resnet.layer4[2].bn3}
    counts = {"conv1_bn": 2 * 64 * 64, "conv3_block1_0_bn": 2 * 16 * 16, "conv5_block3_3_bn": 2 * 4 * 4}
    old = {name: (_numpy(bn.running_mean).copy(), _numpy(bn.running_var).copy()) for name, bn in watched.items()}
    resnet.train()
    expected = torch_features()
    ours = backbone(tf.constant(images), training=True)
    for key in expected:
        _close(ours[key], expected[key], f"training {key}", BACKBONE_TRAINING_REL_TOL)
    for name, bn in watched.items():
        _assert_moving_statistics(norms[name], bn, *old[name], counts[name], name)


def test_frozen_stages_keep_inference_batch_norm_and_sync_flag_is_set():
    backbone = Backbone(name="resnet50", freeze_at=2, norm="sync_batch_norm")
    norms = [layer for layer in backbone.network.layers if layer.name.endswith("_bn")]
    assert all(n.synchronized for n in norms)
    frozen = [n for n in norms if n.name.startswith(("conv1_", "conv2_"))]
    assert frozen and not any(n.trainable for n in frozen)
    assert all(n.trainable for n in norms if n not in frozen)
    assert Backbone(name="resnet50").get_config()["norm"] == "frozen"
    with pytest.raises(ValueError, match="tiny backbone"):
        Backbone(name="tiny", norm="batch_norm")
