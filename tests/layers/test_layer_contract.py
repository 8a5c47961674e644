"""Every layer of maskrcnn_tf/layers through layer_contract.run_layer_test: config round trip with
non-default arguments, weight counts, float32 and mixed precision, jit where supported.

Weight counts follow from each layer's structure (written next to each case); inputs are tiny.
"""
import numpy as np
import tensorflow as tf

from maskrcnn_tf.layers.anchor_labeler import AnchorLabeler
from maskrcnn_tf.layers.backbone import Backbone
from maskrcnn_tf.layers.banded_conv import BandedConv2D
from maskrcnn_tf.layers.box_head import BoxHead
from maskrcnn_tf.layers.detection_generator import DetectionGenerator
from maskrcnn_tf.layers.fpn import FPN
from maskrcnn_tf.layers.mask_head import MaskHead
from maskrcnn_tf.layers.proposal_generator import ProposalGenerator
from maskrcnn_tf.layers.roi_align import MultilevelRoIAlign
from maskrcnn_tf.layers.roi_sampler import RoISampler
from maskrcnn_tf.layers.rpn_head import RPNHead
from tests.layers.layer_contract import run_layer_test

SIZE = 64  # image side in pixels
IMAGE_INFO = tf.constant([[[SIZE, SIZE], [SIZE, SIZE], [1, 1], [0, 0]]], tf.float32)  # [1, 4, 2]
# Layers build_model keeps in float32 (box math): under the mixed policy they are built with
# dtype="float32" and must give exactly the float32 outputs.
BOX_MATH = dict(mixed_kwargs={"dtype": "float32"}, mixed_output_dtypes="float32", mixed_atol=0.0)
SEED = tf.constant([1, 2], tf.int64)  # stateless sampling: the clone draws what the layer drew


def _rng(seed=0):
    return np.random.default_rng(seed)


def _normal(shape, seed=0, scale=1.0):
    return tf.constant(_rng(seed).normal(scale=scale, size=shape).astype(np.float32))


def _pyramid(channels=8, levels=range(2, 7), seed=0):
    return {f"P{l}": _normal([1, SIZE // 2**l, SIZE // 2**l, channels], seed + l) for l in levels}


def _boxes(count, seed=0):
    """float32 [1, count, 4] random [y1, x1, y2, x2] boxes 4..30 pixels inside the image."""
    rng = _rng(seed)
    corner = rng.uniform(0, SIZE - 32, size=(count, 2))
    return tf.constant(np.concatenate([corner, corner + rng.uniform(4, 30, size=(count, 2))], 1)[None],
                       tf.float32)


GT_BOXES = tf.constant([[[10, 10, 40, 30], [35, 35, 60, 62], [-1, -1, -1, -1]]], tf.float32)
GT_CLASSES = tf.constant([[1, 2, -1]], tf.int32)


def test_backbone_tiny():
    # Stem conv + GroupNorm (gamma, beta): 3 variables; each of the 8 blocks 2 x (conv + GN) = 6; the first
    # block of res3..res5 a projection conv + GN = 3 more: 3 + 48 + 9 = 60. freeze_at=2 freezes the stem
    # and res2's 2 blocks: 3 + 12 = 15 non-trainable, 45 trainable.
    run_layer_test(Backbone, init_kwargs=dict(name="tiny", tiny_width=8, freeze_at=2),
                   call_args=[_normal([1, SIZE, SIZE, 3])], expected_num_trainable_weights=45,
                   expected_num_non_trainable_weights=15, float32_output_dtypes="float32",
                   mixed_output_dtypes="float16")


def test_banded_conv():
    # kernel + bias.
    run_layer_test(BandedConv2D, init_kwargs=dict(filters=4, kernel_size=(3, 3), padding="same", activation="relu"),
                   call_args=[_normal([1, 16, 16, 3])], expected_num_trainable_weights=2)


def test_fpn():
    # 4 backbone levels x (lateral 1x1 + output 3x3 conv) x (kernel + bias) = 16.
    features = {f"C{l}": _normal([1, SIZE // 2**l, SIZE // 2**l, 2**l], l) for l in range(2, 6)}
    run_layer_test(FPN, init_kwargs=dict(num_filters=8), call_args=[features], expected_num_trainable_weights=16)


def test_rpn_head():
    # Shared 3x3 conv, objectness 1x1 and box-delta 1x1 convs, each kernel + bias = 6. Outputs float32.
    run_layer_test(RPNHead, init_kwargs=dict(num_anchors_per_location=2, num_filters=8),
                   call_args=[_pyramid()], expected_num_trainable_weights=6, mixed_output_dtypes="float32")


def test_box_head():
    # 1 hidden fc + classifier + box regressor, each kernel + bias = 6. Outputs float32.
    run_layer_test(BoxHead, init_kwargs=dict(num_classes=4, num_fcs=1, fc_dim=16),
                   call_args=[_normal([1, 3, 7, 7, 8])], expected_num_trainable_weights=6,
                   mixed_output_dtypes="float32")


def test_mask_head():
    # 2 convs + deconv + predictor, each kernel + bias = 8. Output logits float32.
    run_layer_test(MaskHead, init_kwargs=dict(num_classes=4, num_convs=2, num_filters=8),
                   call_args=[_normal([1, 3, 14, 14, 8]), tf.constant([[1, 4, 2]], tf.int32)],
                   expected_num_trainable_weights=8, mixed_output_dtypes="float32")


def test_multilevel_roi_align():
    # Weightless. The gather backend compiles, so jit is checked. Inputs are not cast under mixed precision
    # (boxes stay float32) and the output has the features' dtype: float32 here, float16 from a mixed FPN.
    run_layer_test(MultilevelRoIAlign, init_kwargs=dict(output_size=5, backend="gather"),
                   call_args=[_pyramid(), _boxes(6)], expected_num_trainable_weights=0,
                   mixed_output_dtypes="float32")


def test_proposal_generator():
    levels = range(2, 7)
    anchors = {f"P{l}": np.asarray(_boxes((SIZE // 2**l) ** 2, l)[0]) for l in levels}  # one anchor per cell
    scores = {f"P{l}": _normal([1, SIZE // 2**l, SIZE // 2**l, 1], l) for l in levels}
    deltas = {f"P{l}": _normal([1, SIZE // 2**l, SIZE // 2**l, 4], 10 + l, scale=0.1) for l in levels}
    run_layer_test(ProposalGenerator,
                   init_kwargs=dict(pre_nms_top_k_test=20, post_nms_top_k_test=12, nms_iou=0.6, min_box_size=1.0),
                   call_args=[scores, deltas, IMAGE_INFO], call_kwargs=dict(anchors=anchors),
                   expected_num_trainable_weights=0, **BOX_MATH)


def test_anchor_labeler():
    anchors = _boxes(200)[0]  # [A, 4]
    run_layer_test(AnchorLabeler, init_kwargs=dict(positive_iou=0.6, batch_size_per_image=32),
                   call_args=[anchors, GT_BOXES, GT_CLASSES], call_kwargs=dict(seed=SEED),
                   expected_num_trainable_weights=0, jit_same_outputs=False, **BOX_MATH)


def test_roi_sampler():
    proposals = _boxes(40)
    run_layer_test(RoISampler, init_kwargs=dict(num_samples=16, foreground_fraction=0.5),
                   call_args=[proposals, tf.ones([1, 40], tf.bool), GT_BOXES, GT_CLASSES],
                   call_kwargs=dict(seed=SEED), expected_num_trainable_weights=0, jit_same_outputs=False,
                   **BOX_MATH)


def test_detection_generator():
    num_rois, num_classes = 20, 3
    run_layer_test(DetectionGenerator, init_kwargs=dict(score_threshold=0.1, max_detections=7, pre_nms_top_k=50),
                   call_args=[_normal([1, num_rois, num_classes + 1], 1, 2.0),
                              _normal([1, num_rois, 4 * (num_classes + 1)], 2, 0.5), _boxes(num_rois),
                              tf.ones([1, num_rois], tf.bool), IMAGE_INFO],
                   expected_num_trainable_weights=0, **BOX_MATH)
