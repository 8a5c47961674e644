"""End-to-end tests of MaskRCNN: output contract, train step, empty gt, precision, jit, distribution."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.model import LOSS_NAMES, build_model
from maskrcnn_tf.optimizer import build_optimizer
from tests.conftest import two_replica_strategy
from tests.e2e.synthetic import TWO_IMAGES, make_batch, tiny_test_config


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def exhaustive_sampling_config(**overrides):
    """Sampling that takes every candidate, so results do not depend on the random draw.

    RPN: 4092 anchors at 128x128 ((32^2 + 16^2 + 8^2 + 4^2 + 2^2) * 3), so 8192 samples with half
    positive take every labelled anchor. RoIs: 48 proposals + 4 gt <= 64 samples, all may be foreground.
    Losses are sums, so the order of the samples does not matter either.
    """
    return tiny_test_config(**{
        "model.rpn.batch_size_per_image": 8192,
        "model.roi.num_samples": 64,
        "model.roi.foreground_fraction": 1.0,
        "model.roi.max_mask_rois": 64,
        **overrides,
    })


def _compiled(cfg, jit_compile=False):
    model = build_model(cfg)
    model.compile(optimizer=build_optimizer(cfg, model), jit_compile=jit_compile)
    return model


def test_inference_output_contract():
    cfg = tiny_test_config()
    model = build_model(cfg)
    data, _ = make_batch(cfg, TWO_IMAGES)
    out = model({"images": data["images"], "image_info": data["image_info"]}, training=False)
    d = cfg.model.detection.max_detections
    assert out["num_detections"].dtype == tf.int32 and out["num_detections"].shape == (2,)
    assert out["detection_boxes"].shape == (2, d, 4) and out["detection_boxes"].dtype == tf.float32
    assert out["detection_scores"].shape == (2, d)
    assert out["detection_classes"].shape == (2, d) and out["detection_classes"].dtype == tf.int32
    assert out["detection_masks"].shape == (2, d, 28, 28)
    n = out["num_detections"].numpy()
    for b in range(2):
        classes = out["detection_classes"].numpy()[b]
        scores = out["detection_scores"].numpy()[b]
        assert np.all(classes[: n[b]] >= 1) and np.all(classes[: n[b]] <= cfg.model.num_classes)
        assert np.all(classes[n[b]:] == 0) and np.all(out["detection_boxes"].numpy()[b, n[b]:] == -1)
        assert np.all(np.diff(scores[: n[b]]) <= 0)  # sorted by score
        assert np.all(scores[: n[b]] >= cfg.model.detection.score_threshold)
    masks = out["detection_masks"].numpy()
    assert masks.min() >= 0 and masks.max() <= 1


def test_one_train_step_gives_finite_named_losses_and_updates_weights():
    cfg = tiny_test_config()
    model = _compiled(cfg)
    data, _ = make_batch(cfg, TWO_IMAGES)
    stages = ("backbone", "fpn", "rpn_head", "box_head", "mask_head")
    before = {name: [v.numpy().copy() for v in getattr(model, name).trainable_variables] for name in stages}
    logs = model.train_on_batch(data, return_dict=True)
    assert set(logs) == set(LOSS_NAMES)
    assert all(np.isfinite(v) for v in logs.values())
    assert logs["total_loss"] == pytest.approx(logs["rpn_loss"] + logs["rcnn_loss"], rel=1e-5)
    assert logs["rcnn_loss"] == pytest.approx(
        logs["rcnn_cls_loss"] + logs["rcnn_reg_loss"] + logs["rcnn_mask_loss"], rel=1e-5)
    # Every stage got a gradient: some weights of each changed.
    for name in stages:
        after = getattr(model, name).trainable_variables
        assert any(not np.allclose(v.numpy(), b) for v, b in zip(after, before[name])), name


def test_empty_gt_gives_zero_box_and_mask_losses():
    cfg = tiny_test_config()
    model = _compiled(cfg)
    data, _ = make_batch(cfg, [[], []])
    logs = model.test_on_batch(data, return_dict=True)
    assert logs["rpn_reg_loss"] == 0.0 and logs["rcnn_reg_loss"] == 0.0 and logs["rcnn_mask_loss"] == 0.0
    # Only background targets: the classification losses are still there and finite.
    assert logs["rpn_cls_loss"] > 0 and logs["rcnn_cls_loss"] > 0 and np.isfinite(logs["total_loss"])


def test_records_without_masks_skip_the_mask_loss():
    cfg = tiny_test_config()
    model = _compiled(cfg)
    data, _ = make_batch(cfg, TWO_IMAGES)
    with_masks = model.test_on_batch(data, return_dict=True)
    data["has_masks"] = np.zeros([2], np.int32)
    without = model.test_on_batch(data, return_dict=True)
    assert with_masks["rcnn_mask_loss"] > 0 and without["rcnn_mask_loss"] == 0.0
    assert without["rcnn_cls_loss"] == pytest.approx(with_masks["rcnn_cls_loss"], rel=0.5)


def test_box_only_model_has_no_mask_output():
    cfg = tiny_test_config(**{"model.include_mask": False})
    model = _compiled(cfg)
    data, _ = make_batch(cfg, TWO_IMAGES)
    assert "detection_masks" not in model(data, training=False)
    logs = model.train_on_batch(data, return_dict=True)
    assert logs["rcnn_mask_loss"] == 0.0 and np.isfinite(logs["total_loss"])


def test_mixed_float16_train_step_is_finite_and_boxes_stay_float32():
    cfg = tiny_test_config(**{"train.precision": "mixed_float16"})
    model = _compiled(cfg)
    assert model.backbone.compute_dtype == "float16" and model.proposal_generator.compute_dtype == "float32"
    data, _ = make_batch(cfg, TWO_IMAGES)
    logs = model.train_on_batch(data, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    out = model(data, training=False)
    assert out["detection_boxes"].dtype == tf.float32 and out["detection_masks"].dtype == tf.float32
    assert all(v.dtype == "float32" for v in model.trainable_variables)


def test_crop_and_resize_model_declines_jit_and_gather_model_accepts_it():
    from keras.src.trainers.trainer import model_supports_jit

    assert not model_supports_jit(build_model(tiny_test_config()))
    assert model_supports_jit(build_model(tiny_test_config(**{"model.roi.roi_align_backend": "gather"})))


def test_gather_train_step_under_jit_matches_plain_graph():
    cfg = exhaustive_sampling_config(**{"model.roi.roi_align_backend": "gather"})
    data, _ = make_batch(cfg, TWO_IMAGES)
    plain = build_model(cfg)
    jitted = build_model(cfg)
    jitted.set_weights(plain.get_weights())
    jitted.static_shapes = True  # XLA needs static shapes; compile(jit_compile=True) would say so itself
    step = lambda model: tf.function(model.compute_losses, jit_compile=model is jitted)  # noqa: E731
    reference = {k: float(v) for k, v in step(plain)(data).items()}
    compiled = {k: float(v) for k, v in step(jitted)(data).items()}
    for name in LOSS_NAMES:
        assert compiled[name] == pytest.approx(reference[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("backend", ["crop_and_resize", "gather"])
def test_trimmed_padding_gives_the_losses_and_gradients_of_static_shapes(backend):
    # 2 instances per image padded to N = 8, and at most 4 foreground RoIs per image get a mask loss of
    # room 64: the trimmed path drops 6 gt columns and ~60 mask rows, which must not change anything.
    cfg = exhaustive_sampling_config(**{"model.roi.roi_align_backend": backend, "data.max_instances": 8})
    data, _ = make_batch(cfg, TWO_IMAGES)
    assert data["gt_classes"].shape == (2, 8)
    trimmed = build_model(cfg)
    static = build_model(cfg)
    static.set_weights(trimmed.get_weights())
    static.static_shapes = True
    assert trimmed._trims_padding() and not static._trims_padding()

    def losses_and_gradients(model):
        @tf.function
        def step(batch):
            with tf.GradientTape() as tape:
                values = model.compute_losses(batch)
            return values, tape.gradient(values["total_loss"], model.trainable_variables)
        values, gradients = step(data)
        return {k: float(v) for k, v in values.items()}, [g.numpy() for g in gradients]

    trimmed_losses, trimmed_gradients = losses_and_gradients(trimmed)
    static_losses, static_gradients = losses_and_gradients(static)
    assert static_losses["rcnn_mask_loss"] > 0 and static_losses["rpn_reg_loss"] > 0
    for name in LOSS_NAMES:
        assert trimmed_losses[name] == pytest.approx(static_losses[name], rel=1e-5, abs=1e-7), name
    for a, b in zip(trimmed_gradients, static_gradients):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(b).max()))


def test_mirrored_two_replicas_give_the_same_update_as_one_device():
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs the 2 logical CPU devices that tests/conftest.py configures")
    # The default crop_and_resize RoIAlign: its gradient is deterministic (ops/roi_align.py). With
    # TensorFlow's own CropAndResizeGradImage, which loses updates between threads now and then, this
    # comparison failed in 1 of ~10 CI runs.
    cfg = exhaustive_sampling_config(**{"train.weight_decay": 0.0, "train.warmup_steps": 0,
                                        "train.momentum": 0.0, "data.train_batch_size": 2})
    data, _ = make_batch(cfg, TWO_IMAGES)
    dataset = tf.data.Dataset.from_tensors(data)

    single = _compiled(cfg)
    initial = single.get_weights()
    single.fit(dataset, epochs=1, verbose=0)

    strategy = two_replica_strategy()
    with strategy.scope():
        mirrored = _compiled(cfg)
        mirrored.set_weights(initial)
    mirrored.fit(dataset, epochs=1, verbose=0)  # global batch 2 = one image per replica

    resolved = 0
    for a, b, w0 in zip(single.get_weights(), mirrored.get_weights(), initial):
        update_a, update_b = a - w0, b - w0
        # Weights equal to 1e-5 relative (norm of the difference over norm of the weight). The
        # updates themselves agree to 5%: replicas only change the order of float32 sums (measured
        # 1e-5 typical, 1e-3 on the mask head's small first-step update, and once 1.2e-2 on a
        # zero-initialised bias whose update, norm 4.5e-5, is a sum of terms of both signs, so the
        # order shows more), while a wrong loss normalisation over replicas would be off by 50-100%.
        # An update is only known to the rounding of the weight it was added to (one float32 ulp,
        # 2**-23 relative, per element): a CI run saw a conv kernel of norm ~5 move by 5.6e-7 and the
        # two updates differ by 2.6e-8, all of it in the last bit of the weights.
        ulp_noise = 2.0**-23 * np.linalg.norm(w0)
        if np.abs(w0).max() > 0:  # zero-initialised biases: weight == update, checked below
            assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a)
        assert np.linalg.norm(update_b - update_a) <= 5e-2 * np.linalg.norm(update_a) + ulp_noise
        resolved += np.linalg.norm(update_a) > 1000 * ulp_noise
    assert resolved > 10  # the 5% check above bit on enough variables to catch a wrong normaliser


@pytest.mark.parametrize("field,value,message", [
    ("model.image_size", (100, 100), "multiple of 64"),
    ("model.backbone.name", "vgg", "resnet50 | resnet101 | tiny"),
    ("model.num_classes", 0, "model.num_classes"),
])
def test_bad_config_fails_at_build_time_with_the_field_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        build_model(config_lib.replace(tiny_test_config(), **{field: value}))


@pytest.mark.parametrize("key,shape,message", [
    ("images", (2, 96, 128, 3), r"images has shape \(2, 96, 128, 3\); the model expects \[B, 128, 128, 3\]"),
    ("gt_classes", (2, 5), "gt_classes has 5 instances per image but gt_boxes has 4"),
    ("gt_boxes", (2, 4, 5), r"gt_boxes has shape \(2, 4, 5\)"),
])
def test_batch_that_breaks_the_contract_names_the_key(key, shape, message):
    cfg = tiny_test_config()
    model = build_model(cfg)
    data, _ = make_batch(cfg, TWO_IMAGES)
    data[key] = np.zeros(shape, data[key].dtype)
    with pytest.raises(ValueError, match=message):
        model.compute_losses(data)
    del data["gt_masks"]
    with pytest.raises(ValueError, match="missing"):
        model.compute_losses(data)
