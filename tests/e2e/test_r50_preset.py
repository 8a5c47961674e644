"""The standard preset (ResNet-50-FPN, 1024x1024, full proposal counts) builds, infers and trains on CPU."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets
from maskrcnn_tf.model import LOSS_NAMES, build_model
from maskrcnn_tf.optimizer import build_optimizer
from tests.e2e.synthetic import make_batch


@pytest.mark.slow
def test_coco_r50_fpn_1x_infers_and_trains_one_step_at_1024():
    # weights=None: the test machine cannot download ImageNet weights (the file path is tested in
    # tests/layers/test_backbone.py).
    cfg = config_lib.replace(presets.coco_r50_fpn_1x(), **{"model.backbone.weights": None,
                                                              "data.train_batch_size": 1})
    model = build_model(cfg)
    assert model.backbone.name == "resnet50"
    assert cfg.train.recompute_backbone == "auto"  # device_defaults.py: on for a CPU-only host
    if not tf.config.list_logical_devices("GPU"):
        assert model.backbone.recompute is True  # the preset trains with recompute on a CPU
    data, _ = make_batch(cfg, [[(1, [100, 200, 400, 600]), (2, [500, 100, 900, 300])]])
    out = model({"images": data["images"], "image_info": data["image_info"]}, training=False)
    assert out["detection_boxes"].shape == (1, 100, 4) and out["detection_masks"].shape == (1, 100, 28, 28)
    model.compile(optimizer=build_optimizer(cfg, model))
    logs = model.train_on_batch(data, return_dict=True)
    assert set(logs) == set(LOSS_NAMES) and all(np.isfinite(v) for v in logs.values())
    assert logs["rcnn_mask_loss"] > 0 and logs["rpn_reg_loss"] > 0


def test_folded_batchnorm_gives_the_detections_of_the_plain_keras_network():
    # Issue 5's rule for every speed-up: the optimised inference path (conv + frozen BN folded into one
    # convolution, layers/backbone.py) returns the detections of the plain path (the Keras ResNet run
    # layer by layer) on the same weights and image, to 1e-4.
    size = 256
    cfg = config_lib.replace(presets.coco_r50_fpn_1x(), **{
        "model.backbone.weights": None, "model.image_size": (size, size),
        "model.detection.score_threshold": 0.0})
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    for layer in model.backbone.network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # statistics away from (0, 1)
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
            layer.beta.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
    data, _ = make_batch(cfg, [[(1, [30, 50, 100, 150])]])
    inputs = {"images": data["images"], "image_info": data["image_info"]}
    assert model.backbone.fold_batchnorm
    folded = {k: v.numpy() for k, v in tf.function(model)(inputs).items()}
    model.backbone.fold_batchnorm = False
    plain = {k: v.numpy() for k, v in tf.function(model)(inputs).items()}
    assert plain["num_detections"][0] == 100  # score threshold 0: the mask head runs on 100 boxes
    np.testing.assert_array_equal(folded["num_detections"], plain["num_detections"])
    np.testing.assert_array_equal(folded["detection_classes"], plain["detection_classes"])
    for key in ("detection_boxes", "detection_scores", "detection_masks"):
        scale = max(1.0, np.abs(plain[key]).max())
        np.testing.assert_allclose(folded[key], plain[key], rtol=1e-4, atol=1e-4 * scale, err_msg=key)
