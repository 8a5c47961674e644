"""The detectron2_r50_fpn_1x preset: detectron2's mask_rcnn_R_50_FPN_1x recipe (values copied from its
configs/Base-RCNN-FPN.yaml and config/defaults.py), detectron2_r101_fpn_3x's differences from it
(mask_rcnn_R_101_FPN_3x.yaml), and config.differences, which train.py prints."""
import pytest

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.optimizer import build_schedule


def test_solver_settings_are_detectron2s():
    cfg = config_lib.get_preset("detectron2_r50_fpn_1x")
    t, d = cfg.train, cfg.data
    assert (d.train_batch_size, t.base_learning_rate,
            t.reference_batch_size) == (16, 0.02, 16)  # IMS_PER_BATCH, BASE_LR
    assert (t.momentum, t.weight_decay, t.weight_decay_type) == (0.9, 1e-4, "coupled")  # MOMENTUM, WEIGHT_DECAY
    assert (t.clip_grad_norm, t.precision, t.seed) == (0.0, "float32", None)  # CLIP_GRADIENTS, AMP, SEED -1
    assert (d.flip_probability, d.scale_jitter) == (0.5, (0.8, 1.0))  # RANDOM_FLIP; 640..800 of 800
    # The learning rate at iterations where detectron2's WarmupMultiStepLR is known by hand: linear warmup
    # from 0.02 / 1000 over 1000 iterations, then x0.1 at 60000 and 80000 (STEPS), 90000 iterations.
    schedule = build_schedule(cfg)
    assert t.total_steps == 90000
    for step, rate in [(0, 0.02 * 0.001), (500, 0.02 * (0.001 + 0.999 * 0.5)), (1000, 0.02), (59999, 0.02),
                       (60000, 0.002), (79999, 0.002), (80000, 0.0002), (89999, 0.0002)]:
        assert float(schedule(step)) == pytest.approx(rate, rel=1e-6), step


def test_model_settings_are_detectron2s():
    m = config_lib.get_preset("detectron2_r50_fpn_1x").model
    assert (m.rpn.positive_iou, m.rpn.negative_iou, m.rpn.batch_size_per_image, m.rpn.positive_fraction) == (
        0.7, 0.3, 256, 0.5)
    assert (m.rpn.pre_nms_top_k_train, m.rpn.post_nms_top_k_train) == (2000, 1000)  # Base-RCNN-FPN.yaml
    assert (m.rpn.pre_nms_top_k_test, m.rpn.post_nms_top_k_test, m.rpn.nms_iou) == (1000, 1000, 0.7)
    assert (m.rpn.box_loss_beta, m.roi.box_loss_beta) == (0.0, 0.0)  # SMOOTH_L1_BETA 0: L1
    assert (m.roi.num_samples, m.roi.foreground_fraction, m.roi.foreground_iou) == (512, 0.25, 0.5)
    assert (m.roi.background_iou_low, m.roi.background_iou_high) == (0.0, 0.5)
    assert m.roi.max_mask_rois >= int(512 * 0.25)  # every foreground RoI gets a mask loss, as detectron2
    assert (m.heads.num_fcs, m.heads.fc_dim, m.heads.mask_num_convs, m.heads.mask_num_filters) == (2, 1024, 4, 256)
    assert (m.roi.box_output_size, m.roi.mask_output_size) == (7, 14)  # 28x28 masks: one stride-2 deconv
    assert (m.detection.score_threshold, m.detection.nms_iou, m.detection.max_detections) == (0.05, 0.5, 100)
    assert (m.backbone.name, m.backbone.freeze_at) == ("resnet50", 2)
    assert (m.resize_mode, m.resize_short_side, m.resize_max_long_side) == ("short_side", 800, 1333)
    config_lib.validate(config_lib.get_preset("detectron2_r50_fpn_1x"))


def test_differences_name_each_changed_field_with_both_values():
    base = config_lib.get_preset("detectron2_r50_fpn_1x")
    cfg = config_lib.replace(base, **{"train.weight_decay_type": "decoupled", "data.train_batch_size": 8,
                                      "model.num_classes": 3})
    assert config_lib.differences(base, cfg, ignore=config_lib.DATASET_FIELDS) == [
        "data.train_batch_size: 16 -> 8", "train.weight_decay_type: 'coupled' -> 'decoupled'"]
    assert "model.num_classes: 80 -> 3" in config_lib.differences(base, cfg)
    assert config_lib.differences(base, base) == []


def test_r101_3x_differs_from_r50_1x_in_depth_and_schedule_only():
    """detectron2's mask_rcnn_R_101_FPN_3x.yaml = Base-RCNN-FPN.yaml + RESNETS.DEPTH 101, SOLVER.STEPS
    (210000, 250000), MAX_ITER 270000 (MODEL.WEIGHTS R-101.pkl is the ImageNet init: keras' ResNet101 here)."""
    r50, r101 = config_lib.get_preset("detectron2_r50_fpn_1x"), config_lib.get_preset("detectron2_r101_fpn_3x")
    assert config_lib.differences(r50, r101) == [
        "model.backbone.name: 'resnet50' -> 'resnet101'", "train.total_steps: 90000 -> 270000",
        f"train.decay_fractions: {(2 / 3, 8 / 9)!r} -> {(210000 / 270000, 250000 / 270000)!r}"]
    config_lib.validate(r101)
    schedule = build_schedule(r101)
    for step, rate in [(0, 0.02 * 0.001), (1000, 0.02), (209999, 0.02), (210000, 0.002), (249999, 0.002),
                       (250000, 0.0002), (269999, 0.0002)]:
        assert float(schedule(step)) == pytest.approx(rate, rel=1e-6), step
