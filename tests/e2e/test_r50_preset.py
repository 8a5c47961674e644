"""The standard preset (ResNet-50-FPN, 1024x1024, full proposal counts) builds, infers and trains on CPU."""
import numpy as np
import pytest

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.model import LOSS_NAMES, build_model
from maskrcnn_tf.optimizer import build_optimizer
from tests.e2e.synthetic import make_batch


@pytest.mark.slow
def test_coco_r50_fpn_1x_infers_and_trains_one_step_at_1024():
    # weights=None: the test machine cannot download ImageNet weights (the file path is tested in
    # tests/layers/test_backbone.py).
    cfg = config_lib.replace(config_lib.coco_r50_fpn_1x(), **{"model.backbone.weights": None,
                                                              "data.train_batch_size": 1})
    model = build_model(cfg)
    assert model.backbone.name == "resnet50"
    data, _ = make_batch(cfg, [[(1, [100, 200, 400, 600]), (2, [500, 100, 900, 300])]])
    out = model({"images": data["images"], "image_info": data["image_info"]}, training=False)
    assert out["detection_boxes"].shape == (1, 100, 4) and out["detection_masks"].shape == (1, 100, 28, 28)
    model.compile(optimizer=build_optimizer(cfg, model))
    logs = model.train_on_batch(data, return_dict=True)
    assert set(logs) == set(LOSS_NAMES) and all(np.isfinite(v) for v in logs.values())
    assert logs["rcnn_mask_loss"] > 0 and logs["rpn_reg_loss"] > 0
