"""The reference-convention fields: defaults are today's behaviour, older config.json files load with them, bad
values name the field, and the two reference presets carry their sources' settings."""
import pytest

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets

# (dotted field, today's default) of every convention field added for the reference presets.
CONVENTION_DEFAULTS = {
    "model.backbone.stride_in_3x3": False, "model.backbone.norm_epsilon": 1.001e-5,
    "model.anchors.offset": 0.5, "model.anchors.round_base_anchors": False, "model.roi.aligned": True,
    "model.roi.torchvision_level_mapper": False,
    "model.detection.min_box_size": 0.0, "model.resize_mode": "fit", "model.resize_short_side": 800,
    "model.resize_max_long_side": 1333,
}


def _get(cfg, dotted):
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def test_config_json_without_the_convention_fields_loads_with_todays_defaults():
    d = config_lib.to_dict(presets.coco_r50_fpn_1x())
    for dotted in CONVENTION_DEFAULTS:
        *parents, leaf = dotted.split(".")
        node = d
        for name in parents:
            node = node[name]
        del node[leaf]
    cfg = config_lib.from_dict(d)
    assert cfg == presets.coco_r50_fpn_1x()
    for dotted, default in CONVENTION_DEFAULTS.items():
        assert _get(cfg, dotted) == default, dotted


@pytest.mark.parametrize("field,value,message", [
    ("model.backbone.norm_epsilon", -1e-5, "model.backbone.norm_epsilon"),
    ("model.anchors.offset", 1.0, "0.5 = cell centre, 0.0 = cell corner"),
    ("model.roi.sampling_ratio", -1, "or 0 \\(adaptive\\)"),
    ("model.detection.min_box_size", -1.0, "model.detection.min_box_size"),
    ("model.resize_mode", "shortest", "fit \\| short_side"),
    ("model.resize_short_side", 2000, "0 < short side <= max long side"),
])
def test_validate_names_the_convention_field(field, value, message):
    cfg = config_lib.replace(config_lib.get_preset("torchvision_maskrcnn_r50_fpn"), **{field: value})
    with pytest.raises(ValueError, match=message):
        config_lib.validate(cfg)


def test_torchvision_preset_has_torchvision_settings():
    m = config_lib.get_preset("torchvision_maskrcnn_r50_fpn").model
    assert (m.num_classes, m.backbone.stride_in_3x3, m.backbone.norm_epsilon) == (90, True, 0.0)
    assert (m.anchors.offset, m.anchors.round_base_anchors, m.roi.aligned,
            m.roi.sampling_ratio) == (0.0, True, False, 2)
    assert (m.rpn.min_box_size, m.detection.min_box_size, m.detection.score_threshold) == (1e-3, 1e-2, 0.05)
    assert m.roi.torchvision_level_mapper
    # torchvision's rpn.py and roi_heads.fastrcnn_loss: smooth_l1_loss(beta=1 / 9).
    assert (m.rpn.box_loss_beta, m.roi.box_loss_beta) == pytest.approx((1 / 9, 1 / 9))
    assert (m.rpn.pre_nms_top_k_test, m.rpn.post_nms_top_k_test, m.rpn.post_nms_top_k_train) == (1000, 1000, 2000)
    assert m.pixel_mean == pytest.approx([255 * v for v in (0.485, 0.456, 0.406)])
    assert m.pixel_std == pytest.approx([255 * v for v in (0.229, 0.224, 0.225)])
    assert (m.resize_mode, m.resize_short_side, m.resize_max_long_side, m.image_size) == (
        "short_side", 800, 1333, (1344, 1344))


def test_detectron2_preset_model_conventions():
    cfg = config_lib.get_preset("detectron2_r50_fpn_1x")
    m = cfg.model
    assert (m.backbone.stride_in_3x3, m.backbone.norm_epsilon) == (False, 1e-5)
    assert (m.anchors.offset, m.anchors.round_base_anchors, m.roi.aligned,
            m.roi.sampling_ratio) == (0.0, False, True, 0)
    assert m.pixel_std == (1.0, 1.0, 1.0) and m.resize_mode == "short_side"
    assert m.pixel_mean == pytest.approx((123.675, 116.28, 103.53))  # detectron2's BGR means, in RGB order
