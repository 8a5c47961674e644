"""Config: presets validate, overrides, JSON round trip, and bad settings name the field."""
import dataclasses

import pytest

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_validate_and_round_trip_through_json(name, tmp_path):
    cfg = config_lib.get_preset(name)
    config_lib.validate(cfg)
    path = tmp_path / "config.json"
    config_lib.save_json(cfg, str(path))
    assert config_lib.load_json(str(path)) == cfg


def test_standard_preset_matches_design_table():
    # docs/design.md section 10 (detectron2 / torchvision values).
    m = presets.coco_r50_fpn_1x().model
    assert m.image_size == (1024, 1024) and m.backbone.name == "resnet50" and m.backbone.freeze_at == 2
    assert m.anchors.sizes == (32, 64, 128, 256, 512) and m.anchors.aspect_ratios == (0.5, 1.0, 2.0)
    assert (m.rpn.positive_iou, m.rpn.negative_iou, m.rpn.batch_size_per_image) == (0.7, 0.3, 256)
    assert (m.rpn.pre_nms_top_k_train, m.rpn.post_nms_top_k_train) == (2000, 1000)
    assert (m.roi.num_samples, m.roi.foreground_fraction, m.roi.max_mask_rois) == (512, 0.25, 128)
    assert (m.detection.score_threshold, m.detection.nms_iou, m.detection.max_detections) == (0.05, 0.5, 100)


def test_replace_dotted_names_and_lists_become_tuples():
    cfg = config_lib.replace(presets.tiny(), **{"model.image_size": [128, 192], "train.total_steps": 7})
    assert cfg.model.image_size == (128, 192) and cfg.train.total_steps == 7
    with pytest.raises(ValueError, match="unknown field 'model.imagesize'"):
        config_lib.replace(cfg, **{"model.imagesize": (128, 128)})


@pytest.mark.parametrize("field,value,message", [
    ("model.image_size", (100, 128), "model.image_size"),
    ("model.backbone.name", "vgg16", "resnet50 | resnet101 | tiny"),
    ("model.num_classes", 0, "model.num_classes"),
    ("model.roi.roi_align_backend", "cuda", "crop_and_resize | gather"),
    ("train.precision", "float16", "mixed_float16"),
    ("model.anchors.sizes", (32, 64), "one per level"),
])
def test_validate_names_the_field_and_allowed_values(field, value, message):
    cfg = config_lib.replace(presets.tiny(), **{field: value})
    with pytest.raises(ValueError, match=message):
        config_lib.validate(cfg)


def test_learning_rate_scales_linearly_with_batch():
    cfg = presets.coco_r50_fpn_1x()
    assert config_lib.learning_rate(cfg) == pytest.approx(0.02)  # batch 16 = reference
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_batch_size=8))
    assert config_lib.learning_rate(cfg) == pytest.approx(0.01)


def test_config_json_of_an_older_run_without_a_newer_field_loads_with_its_default():
    # Run directories written before train.recompute_backbone existed keep loading (eval/export/resume).
    d = config_lib.to_dict(presets.tiny())
    del d["train"]["recompute_backbone"]
    cfg = config_lib.from_dict(d)
    assert cfg.train.recompute_backbone == "auto"  # on for CPU hosts (device_defaults.py)
    assert cfg == presets.tiny()


def test_config_json_with_the_removed_heads_mask_size_loads():
    # Run directories written before heads.mask_size was dropped (it could only be 2 * mask_output_size).
    d = config_lib.to_dict(presets.tiny())
    d["model"]["heads"]["mask_size"] = 28
    assert config_lib.from_dict(d) == presets.tiny()
    # Only where it lived: the same name elsewhere, or any other unknown field, is still refused.
    d["model"]["roi"]["mask_size"] = 28
    with pytest.raises(ValueError, match="unknown field 'mask_size' in RoIConfig"):
        config_lib.from_dict(d)


def test_parse_overrides_reads_json_values_and_bare_strings():
    parsed = config_lib.parse_overrides(["train.total_steps=10", "model.image_size=[128, 96]",
                                         "train.schedule=cosine", "data.seed = 3"])
    assert parsed == {"train.total_steps": 10, "model.image_size": [128, 96], "train.schedule": "cosine",
                      "data.seed": 3}
    cfg = config_lib.replace(config_lib.get_preset("tiny"), **parsed)
    assert (cfg.train.total_steps, cfg.model.image_size, cfg.train.schedule) == (10, (128, 96), "cosine")
    with pytest.raises(ValueError, match="expected dotted.field=value"):
        config_lib.parse_overrides(["train.total_steps"])
