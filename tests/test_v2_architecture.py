"""The architecture fields (issue 25: norm in the FPN and heads, RPN conv depth, conv + FC box head,
trainable backbone BN) as configuration: the torchvision v2 preset sets exactly v2's differences from
v1, older config.json files load as today's architecture, bad values name the field, and a model built
with the v2 fields (tiny sizes) has the expected variables, round-trips through a .keras file and trains
with batch statistics in the FPN and box head."""
import dataclasses

import keras
import numpy as np
import pytest

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets
from maskrcnn_tf.model import build_model, dummy_inputs
from maskrcnn_tf.optimizer import build_optimizer
from tests.e2e.synthetic import TWO_IMAGES, make_batch, tiny_test_config

NEW_MODEL_FIELDS = {"fpn_norm": "none", "rpn_num_convs": 1}
NEW_HEAD_FIELDS = {"box_num_convs": 0, "box_conv_dim": 256, "box_norm": "none", "mask_norm": "none"}
NEW_BACKBONE_FIELDS = {"norm": "frozen"}


def test_v2_preset_differs_from_v1_exactly_by_v2s_architecture():
    v1 = config_lib.get_preset("torchvision_maskrcnn_r50_fpn")
    v2 = config_lib.get_preset("torchvision_maskrcnn_r50_fpn_v2")
    # torchvision's maskrcnn_resnet50_fpn_v2 (mask_rcnn.py): nn.BatchNorm2d backbone (eps 1e-5, no
    # overwrite_eps), BN FPN, RPNHead(conv_depth=2), FastRCNNConvFCHead([256] * 4, [1024], BN), BN mask head.
    assert sorted(config_lib.differences(v1, v2)) == sorted([
        "model.backbone.norm_epsilon: 0.0 -> 1e-05",
        "model.fpn_norm: 'none' -> 'batch_norm'",
        "model.rpn_num_convs: 1 -> 2",
        "model.heads.num_fcs: 2 -> 1",
        "model.heads.box_num_convs: 0 -> 4",
        "model.heads.box_norm: 'none' -> 'batch_norm'",
        "model.heads.mask_norm: 'none' -> 'batch_norm'",
    ])
    h = v2.model.heads
    assert (h.box_conv_dim, h.fc_dim, h.mask_num_convs, h.mask_num_filters) == (256, 1024, 4, 256)
    assert v2.model.backbone.norm == "frozen" and v2.model.backbone.stride_in_3x3
    assert "47.4 box" in presets.torchvision_maskrcnn_r50_fpn_v2.__doc__
    assert "46.7 box" in presets.torchvision_maskrcnn_r50_fpn_v2.__doc__


def test_v2_recipe_preset_differs_from_the_v2_model_exactly_by_pr_5773s_recipe():
    v2 = config_lib.get_preset("torchvision_maskrcnn_r50_fpn_v2")
    recipe = config_lib.validate(config_lib.get_preset("coco_r50_fpn_v2_lsj"))
    # pytorch/vision PR #5773 (the v2 weights' "recipe"): 400 epochs of the 117266 annotated train2017
    # images at batch 64 -> 732912.5 steps, rounded to whole thousands; lr 0.1, x0.1 at epochs 352 and
    # 384; wd 4e-5; SyncBN everywhere; LSJ at 1024 (scale 0.1-2.0, flip); no pretrained backbone.
    assert sorted(config_lib.differences(v2, recipe)) == sorted([
        "model.image_size: (1344, 1344) -> (1024, 1024)",
        "model.resize_mode: 'short_side' -> 'fit'",
        "model.backbone.freeze_at: 2 -> 0",
        "model.backbone.norm: 'frozen' -> 'sync_batch_norm'",
        "model.fpn_norm: 'batch_norm' -> 'sync_batch_norm'",
        "model.heads.box_norm: 'batch_norm' -> 'sync_batch_norm'",
        "model.heads.mask_norm: 'batch_norm' -> 'sync_batch_norm'",
        "data.train_batch_size: 16 -> 64",
        "data.scale_jitter: (1.0, 1.0) -> (0.1, 2.0)",
        "train.total_steps: 90000 -> 733000",
        "train.base_learning_rate: 0.02 -> 0.1",
        "train.reference_batch_size: 16 -> 64",
        "train.weight_decay: 0.0001 -> 4e-05",
        "train.decay_fractions: (0.6666666666666666, 0.8888888888888888) -> (0.88, 0.96)",
        "train.precision: 'float32' -> 'mixed_float16'",
    ])
    assert recipe.model.backbone.weights is None and recipe.train.weight_decay_type == "coupled"
    assert config_lib.learning_rate(recipe) == 0.1
    assert presets.coco_r50_fpn_v2_lsj(epochs=100).train.total_steps == 183000  # 183228.1 -> 183000
    with pytest.raises(ValueError, match="epochs=0"):
        presets.coco_r50_fpn_v2_lsj(epochs=0)


@pytest.mark.parametrize("preset", ["tiny", "torchvision_maskrcnn_r50_fpn", "coco_r50_fpn_1x"])
def test_config_json_written_before_the_architecture_fields_loads_as_today(preset):
    d = config_lib.to_dict(config_lib.get_preset(preset))
    for name in NEW_MODEL_FIELDS:
        del d["model"][name]
    for name in NEW_HEAD_FIELDS:
        del d["model"]["heads"][name]
    for name in NEW_BACKBONE_FIELDS:
        del d["model"]["backbone"][name]
    cfg = config_lib.from_dict(d)
    assert cfg == config_lib.get_preset(preset)
    assert {k: getattr(cfg.model, k) for k in NEW_MODEL_FIELDS} == NEW_MODEL_FIELDS
    assert {k: getattr(cfg.model.heads, k) for k in NEW_HEAD_FIELDS} == NEW_HEAD_FIELDS
    assert cfg.model.backbone.norm == "frozen"


@pytest.mark.parametrize("field,value,message", [
    ("model.fpn_norm", "batchnorm",
     r"model\.fpn_norm='batchnorm'.*none \| batch_norm \| sync_batch_norm \| group_norm"),
    ("model.heads.box_norm", "bn", r"model\.heads\.box_norm"),
    ("model.heads.mask_norm", "layer_norm", r"model\.heads\.mask_norm"),
    ("model.rpn_num_convs", 0, r"model\.rpn_num_convs=0.*integer >= 1"),
    ("model.heads.box_num_convs", -1, r"model\.heads\.box_num_convs"),
    ("model.backbone.norm", "trainable", r"frozen \| batch_norm \| sync_batch_norm"),
    ("model.backbone.norm", "batch_norm", r"frozen for the tiny backbone"),
])
def test_validate_names_bad_architecture_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config_lib.replace(presets.tiny(), **{field: value}))


def _v2_tiny_config():
    return tiny_test_config(**{
        "model.fpn_norm": "batch_norm", "model.rpn_num_convs": 2, "model.heads.box_num_convs": 2,
        "model.heads.box_conv_dim": 16, "model.heads.box_norm": "batch_norm", "model.heads.num_fcs": 1,
        "model.heads.mask_norm": "batch_norm", "model.heads.mask_num_convs": 2, "train.seed": 1})


def test_tiny_model_with_v2_heads_has_their_variables_saves_and_trains(tmp_path):
    keras.utils.set_random_seed(0)
    cfg = _v2_tiny_config()
    model = build_model(cfg)
    paths = {v.path for v in model.variables}
    for path in ("mask_rcnn/fpn/lateral_P2_norm/moving_mean", "mask_rcnn/fpn/output_P5_norm/gamma",
                 "mask_rcnn/rpn_head/conv2/kernel", "mask_rcnn/rpn_head/conv2/bias",
                 "mask_rcnn/box_head/conv2/kernel", "mask_rcnn/box_head/conv2_norm/moving_variance",
                 "mask_rcnn/box_head/fc1/kernel", "mask_rcnn/mask_head/conv2_norm/beta"):
        assert path in paths, path
    for absent in ("mask_rcnn/fpn/lateral_P2/bias", "mask_rcnn/box_head/conv1/bias", "mask_rcnn/box_head/fc2/kernel",
                   "mask_rcnn/mask_head/conv1/bias"):
        assert absent not in paths, absent  # a conv before a norm has no bias; one FC
    assert model.box_head.fcs[0].kernel.shape == (7 * 7 * 16, cfg.model.heads.fc_dim)

    # Random moving statistics: a .keras file that dropped them would load different outputs.
    rng = np.random.default_rng(0)
    for v in model.variables:
        if "moving_" in v.path:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
    inputs = dummy_inputs(1, *cfg.model.image_size)
    inputs["images"] = rng.normal(size=inputs["images"].shape).astype(np.float32)
    expected = model(inputs, training=False)
    model.save(str(tmp_path / "v2.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "v2.keras"))
    assert loaded.config == cfg
    actual = loaded(inputs, training=False)
    for key in ("detection_boxes", "detection_scores", "detection_masks"):
        np.testing.assert_allclose(actual[key].numpy(), expected[key].numpy(), atol=1e-5, err_msg=key)

    # One training step: finite losses, and the FPN and box head BN layers moved their moving statistics
    # towards this batch (training mode reached them).
    data, _ = make_batch(cfg, TWO_IMAGES)
    fpn_mean = model.fpn.lateral_norms[0].moving_mean.numpy().copy()
    box_mean = model.box_head.conv_norms[0].moving_mean.numpy().copy()
    mask_means = [v.numpy().copy() for v in model.mask_head.weights if v.path.endswith("moving_mean")]
    model.compile(optimizer=build_optimizer(cfg, model))
    logs = model.train_on_batch(data, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert np.abs(model.fpn.lateral_norms[0].moving_mean.numpy() - fpn_mean).max() > 1e-3
    assert np.abs(model.box_head.conv_norms[0].moving_mean.numpy() - box_mean).max() > 1e-3
    # The mask head's too (its loss once called it without training=True: BatchNorm stayed in inference).
    moved = [v.numpy() for v in model.mask_head.weights if v.path.endswith("moving_mean")]
    assert len(moved) == 2 and all(np.abs(a - b).max() > 1e-3 for a, b in zip(moved, mask_means))


def test_dataclass_defaults_are_todays_architecture():
    m = config_lib.ModelConfig()
    assert (m.fpn_norm, m.rpn_num_convs, m.backbone.norm) == ("none", 1, "frozen")
    assert dataclasses.asdict(m.heads) == {"num_fcs": 2, "fc_dim": 1024, "box_num_convs": 0, "box_conv_dim": 256,
                                           "box_norm": "none", "mask_num_convs": 4, "mask_num_filters": 256,
                                           "mask_norm": "none"}


def test_start_up_line_says_which_batch_norms_run_over_how_many_images():
    from maskrcnn_tf.training import batch_norm_summary

    recipe = config_lib.get_preset("coco_r50_fpn_v2_lsj")
    line = batch_norm_summary(recipe, num_replicas=8)
    # SyncBN: statistics over the global batch of 64, whatever the replica count.
    assert line.count("sync_batch_norm over 64 image(s)") == 4 and "one image per statistic" not in line
    plain = config_lib.replace(recipe, **{"model.backbone.norm": "batch_norm", "model.fpn_norm": "batch_norm"})
    assert "backbone batch_norm over 8 image(s), FPN batch_norm over 8 image(s)" in batch_norm_summary(plain, 8)
    # One image per statistic (one replica, batch 1): allowed, as torchvision with 1 image per GPU, and said.
    single = config_lib.replace(recipe, **{"data.train_batch_size": 1})
    assert "over 1 image(s)" in batch_norm_summary(single, 1)
    assert "one image per statistic" in batch_norm_summary(single, 1)
    # Frozen backbone, no norm in FPN and heads (v1, detectron2): nothing to say.
    assert batch_norm_summary(config_lib.get_preset("torchvision_maskrcnn_r50_fpn"), 1) == ""
