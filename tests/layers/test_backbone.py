"""Backbone: caffe BGR weights -> RGB input, frozen BN, freeze_at, C2..C5 shapes, layer contract, mixed
precision, dynamic batch; the tiny GroupNorm backbone.

ResNet construction costs ~2 s, so the ResNet-50 reference and the backbone loaded from its weights file
are module-scoped fixtures (tests that change weights restore them).
"""
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.legacy.saving import legacy_h5_format

from maskrcnn_tf.layers import backbone as backbone_lib
from maskrcnn_tf.layers.backbone import Backbone
from maskrcnn_tf.weights.initial import load_backbone_weights

# The caffe means of keras.applications' ResNet weights in RGB order (= config.ModelConfig.pixel_mean).
CAFFE_MEAN_RGB = np.array([123.68, 116.779, 103.939], np.float32)
RESNET_CHANNELS = {"C2": 256, "C3": 512, "C4": 1024, "C5": 2048}
STRIDES = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}


def _rgb_images(batch=2, size=64):
    return np.random.default_rng(0).uniform(0, 255, size=(batch, size, size, 3)).astype(np.float32)


def _stage(path):
    """Stage of a variable from its keras.applications layer name: conv1_conv/kernel -> 1, conv3_block1_... -> 3."""
    layer_name = path.split("/")[-2]
    return int(layer_name[4]) if layer_name.startswith(("conv", "pool")) else None


@pytest.fixture(scope="module")
def resnet50_reference(tmp_path_factory):
    """A randomly initialised keras.applications ResNet50 (non-trivial BN statistics) saved in both file formats."""
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for layer in reference.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Moving statistics away from (0, 1) so that loading them wrongly changes the outputs.
            layer.moving_mean.assign(rng.normal(0.0, 0.1, layer.moving_mean.shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape).astype(np.float32))
    folder = tmp_path_factory.mktemp("resnet50")
    path = str(folder / "resnet50_notop.weights.h5")
    reference.save_weights(path)
    # The Keras-applications download format (legacy h5, layer names + weight lists).
    legacy_path = str(folder / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    with h5py.File(legacy_path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    return reference, path, legacy_path


def _loaded(source, **kwargs):
    """A Backbone built, then filled from `source` (weights/initial.py), as a fresh training run does."""
    backbone = Backbone(**kwargs)
    load_backbone_weights(backbone, source)
    return backbone


@pytest.fixture(scope="module")
def resnet50(resnet50_reference):
    _, path, _ = resnet50_reference
    return _loaded(path, name="resnet50")


def test_weights_file_gives_rgb_backbone(resnet50_reference, resnet50):
    reference, _, _ = resnet50_reference
    rgb = _rgb_images()
    ours = resnet50(rgb - CAFFE_MEAN_RGB)["C5"].numpy()
    # keras.applications' own recipe: caffe preprocessing turns RGB into BGR minus the BGR mean.
    expected = reference(keras.applications.resnet50.preprocess_input(rgb.copy())).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-3 * scale)
    # Without the stem-kernel reversal the RGB input would be read as BGR: the test above could fail.
    not_swapped = reference(rgb - CAFFE_MEAN_RGB).numpy()
    assert np.abs(not_swapped - expected).max() > 1e-2 * scale


def test_imagenet_copies_keras_applications_weights_by_layer_and_reverses_the_stem(resnet50_reference, resnet50,
                                                                                 monkeypatch):
    # "imagenet" builds keras.applications' ResNet50 with weights="imagenet" (a download, not in tests: the
    # reference stands in for it) and copies it layer by layer: the same backbone as its weights file gives.
    reference, _, _ = resnet50_reference
    asked = []

    def application(**kwargs):
        asked.append(kwargs)
        return reference

    monkeypatch.setitem(backbone_lib.RESNETS, "resnet50", application)
    backbone = _loaded("imagenet", name="resnet50")
    assert asked == [{"include_top": False, "input_shape": (None, None, 3), "weights": None},
                     {"include_top": False, "input_shape": (None, None, 3), "weights": "imagenet"}]
    for a, b in zip(resnet50.weights, backbone.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_resnet50_shapes_128_and_dynamic_batch(resnet50):
    size = 128
    outputs = resnet50(_rgb_images(1, size))
    for key, channels in RESNET_CHANNELS.items():
        assert outputs[key].shape == (1, size // STRIDES[key], size // STRIDES[key], channels)
    # The network's batch (and spatial) dimensions are dynamic; the other tests call this same layer with
    # batch 2. (Tracing ResNet-50 in a tf.function is slow: the tiny test traces with a None batch.)
    for key, channels in RESNET_CHANNELS.items():
        assert tuple(resnet50.network.output[key].shape) == (None, None, None, channels)


def test_resnet50_freeze_at_2_and_frozen_bn_names(resnet50):
    trainable = {w.path for w in resnet50.trainable_weights}
    # Expected: kernel and bias of every conv in res3..res5 (keras.applications convs have biases),
    # nothing of the stem or res2, no BatchNorm gamma/beta.
    expected = {w.path for layer in resnet50.network.layers if isinstance(layer, keras.layers.Conv2D)
                for w in layer.weights if _stage(w.path) >= 3}
    assert trainable == expected
    assert len(expected) == 2 * (4 * 3 + 1 + 6 * 3 + 1 + 3 * 3 + 1)  # (kernel, bias) x convs of res3..res5
    # Keras propagates trainable=True to every sublayer; the backbone must re-freeze.
    resnet50.trainable = False
    assert resnet50.trainable_weights == []
    resnet50.trainable = True
    assert {w.path for w in resnet50.trainable_weights} == expected


def test_resnet50_frozen_bn_under_gradient_step(resnet50):
    snapshot = resnet50.get_weights()
    try:
        images = _rgb_images(2, 32) - CAFFE_MEAN_RGB
        bn_variables = [w for layer in resnet50.network.layers if isinstance(layer, keras.layers.BatchNormalization)
                        for w in layer.weights]
        assert len(bn_variables) == 4 * 53  # gamma, beta, moving mean, moving variance of 53 BN layers
        bn_before = [w.numpy() for w in bn_variables]
        stem_before = resnet50.network.get_layer("conv1_conv").kernel.numpy()
        res5_before = resnet50.network.get_layer("conv5_block3_3_conv").kernel.numpy()

        with tf.GradientTape() as tape:
            out_train = resnet50(images, training=True)
            loss = tf.reduce_mean(tf.square(out_train["C5"]))
        grads = tape.gradient(loss, resnet50.trainable_weights)
        keras.optimizers.SGD(learning_rate=0.1).apply_gradients(zip(grads, resnet50.trainable_weights))
        for before, after in zip(bn_before, bn_variables):
            np.testing.assert_array_equal(before, after.numpy())
        np.testing.assert_array_equal(stem_before, resnet50.network.get_layer("conv1_conv").kernel.numpy())
        # The step did happen (the test above could fail).
        assert not np.array_equal(res5_before, resnet50.network.get_layer("conv5_block3_3_conv").kernel.numpy())

        # training=True uses the moving statistics too (batch statistics would differ).
        out_train = resnet50(images, training=True)
        out_infer = resnet50(images, training=False)
        for key in out_train:
            np.testing.assert_array_equal(out_train[key].numpy(), out_infer[key].numpy())
    finally:
        resnet50.set_weights(snapshot)


def test_resnet50_folded_batchnorm_equals_the_keras_network_with_gradients(resnet50):
    # The default call folds each conv + frozen BN into one convolution; fold_batchnorm=False runs the
    # Keras network layer by layer. Same function: outputs and the gradients of every trainable weight.
    images = tf.constant(_rgb_images(2, 64) - CAFFE_MEAN_RGB)

    def outputs_and_gradients():
        with tf.GradientTape() as tape:
            outputs = resnet50(images)
            loss = sum(tf.reduce_mean(tf.square(v)) for v in outputs.values())
        return outputs, tape.gradient(loss, resnet50.trainable_weights)

    assert resnet50.fold_batchnorm
    folded, folded_gradients = outputs_and_gradients()
    resnet50.fold_batchnorm = False
    try:
        plain, plain_gradients = outputs_and_gradients()
    finally:
        resnet50.fold_batchnorm = True
    for key in plain:
        scale = np.abs(plain[key].numpy()).max()
        np.testing.assert_allclose(folded[key].numpy(), plain[key].numpy(), rtol=1e-4, atol=1e-4 * scale)
    assert len(folded_gradients) == len(resnet50.trainable_weights) == 84
    for a, b in zip(folded_gradients, plain_gradients):
        b = b.numpy()
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-3, atol=1e-4 * np.abs(b).max())


def test_resnet50_recomputed_stages_give_the_same_gradients(resnet50):
    # recompute=True (default) runs res3..res5 (above freeze_at=2) under tf.recompute_grad in training:
    # same outputs and gradients, and the backward pass holds a second forward of those stages (more
    # Conv2D ops in the traced graph: the 13 blocks of res3..res5 have 3 convs each plus 3 shortcuts).
    images = tf.constant(_rgb_images(2, 64) - CAFFE_MEAN_RGB)

    def run():
        @tf.function
        def outputs_and_gradients(images):
            with tf.GradientTape() as tape:
                outputs = resnet50(images, training=True)
                loss = sum(tf.reduce_mean(tf.square(v)) for v in outputs.values())
            return outputs, tape.gradient(loss, resnet50.trainable_weights)

        graph = outputs_and_gradients.get_concrete_function(images).graph
        num_convs = sum(op.type == "Conv2D" for op in graph.get_operations())
        return outputs_and_gradients(images), num_convs

    assert resnet50.recompute and resnet50.freeze_at == 2
    (recomputed, recomputed_gradients), recomputed_convs = run()
    resnet50.recompute = False
    try:
        (kept, kept_gradients), kept_convs = run()
    finally:
        resnet50.recompute = True
    assert recomputed_convs - kept_convs == 13 * 3 + 3
    for key in kept:
        np.testing.assert_allclose(recomputed[key].numpy(), kept[key].numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(recomputed_gradients, kept_gradients):
        b = b.numpy()
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_resnet50_layer_contract_and_legacy_h5_file(resnet50_reference, resnet50):
    _, path, legacy_path = resnet50_reference
    config = resnet50.get_config()
    assert config["name"] == "resnet50" and "weights" not in config  # the layer never reads a file
    # Rebuild from the config, then load the same weights from the Keras-applications legacy .h5 file
    # instead of copying them (a copy is tested on the tiny backbone): every weight and output must match.
    # A config written before the loading moved out of the layer names a file: accepted and not read.
    clone = Backbone.from_config(dict(config, weights=path + ".gone"))
    load_backbone_weights(clone, legacy_path)
    for a, b in zip(resnet50.weights, clone.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    images = _rgb_images(1, 32) - CAFFE_MEAN_RGB
    out, out_clone = resnet50(images), clone(images)
    for key in out:
        np.testing.assert_array_equal(out[key].numpy(), out_clone[key].numpy())
    assert {w.path for w in clone.trainable_weights} == {w.path for w in resnet50.trainable_weights}


def test_resnet101_levels_and_freeze_at_3():
    # No forward pass (slow): the symbolic outputs tell the levels.
    backbone = Backbone(name="resnet101", freeze_at=3)
    outputs = backbone.network.output
    assert {k: v.shape[1:] for k, v in outputs.items()} == {k: (None, None, c) for k, c in RESNET_CHANNELS.items()}
    # C4 is the output of res4's last block: block 23 in ResNet-101.
    assert outputs["C4"]._keras_history.operation.name == "conv4_block23_out"
    stages = {_stage(w.path) for w in backbone.trainable_weights}
    assert stages == {4, 5}
    assert not any("_bn/" in w.path for w in backbone.trainable_weights)


@pytest.fixture
def mixed_float16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy(previous)


def test_resnet50_mixed_float16(mixed_float16):
    backbone = Backbone(name="resnet50", freeze_at=0)
    outputs = backbone(_rgb_images(2, 32) - CAFFE_MEAN_RGB)
    assert all(v.dtype == tf.float16 for v in outputs.values())
    assert all(np.isfinite(v.numpy()).all() for v in outputs.values())
    assert all(w.dtype == "float32" for w in backbone.weights)
    assert backbone.network.get_layer("conv3_block1_1_conv").compute_dtype == "float16"


# ------------------------------------------------------------------------------------------ tiny

TINY_WIDTH = 8


def test_tiny_shapes_groupnorm_and_freeze_at():
    size = 128
    for freeze_at, frozen_stages in ((0, set()), (1, {1}), (3, {1, 2, 3})):
        backbone = Backbone(name="tiny", tiny_width=TINY_WIDTH, freeze_at=freeze_at)
        trainable_stages = {_stage(w.path) for w in backbone.trainable_weights}
        assert trainable_stages == {1, 2, 3, 4, 5} - frozen_stages
    # GroupNorm, no BatchNorm (documented: tiny trains from scratch).
    kinds = {type(layer).__name__ for layer in backbone.network.layers}
    assert "GroupNormalization" in kinds and "BatchNormalization" not in kinds
    outputs = backbone(_rgb_images(2, size))
    for i, key in enumerate(("C2", "C3", "C4", "C5")):
        assert outputs[key].shape == (2, size // STRIDES[key], size // STRIDES[key], TINY_WIDTH * 2**i)


def test_tiny_trains_is_batch_independent_and_dynamic_batch():
    backbone = Backbone(name="tiny", tiny_width=TINY_WIDTH, freeze_at=0)
    images = _rgb_images(2) / 64.0
    fn = tf.function(backbone.__call__, input_signature=[tf.TensorSpec((None, 64, 64, 3), tf.float32)])
    assert fn.get_concrete_function().structured_outputs["C5"].shape.as_list() == [None, 2, 2, 8 * TINY_WIDTH]
    assert fn(images)["C5"].shape == (2, 2, 2, 8 * TINY_WIDTH)
    with tf.GradientTape() as tape:
        loss = sum(tf.reduce_mean(tf.square(v)) for v in backbone(images, training=True).values())
    grads = tape.gradient(loss, backbone.trainable_weights)
    assert all(g is not None for g in grads)
    # GroupNorm statistics are per image: image 0 alone gives the same features as in the batch of 2.
    alone = backbone(images[:1])["C5"].numpy()
    np.testing.assert_allclose(alone, backbone(images)["C5"].numpy()[:1], rtol=1e-5, atol=1e-5)


def test_tiny_contract_weights_file_and_mixed_dtype(tmp_path):
    kwargs = dict(name="tiny", freeze_at=1, tiny_width=TINY_WIDTH)
    backbone = Backbone(**kwargs)
    images = _rgb_images(1)
    out = backbone(images)
    config = backbone.get_config()
    assert {k: config[k] for k in kwargs} == kwargs
    clone = Backbone.from_config(config)
    clone.set_weights(backbone.get_weights())
    for key, value in clone(images).items():
        np.testing.assert_array_equal(value.numpy(), out[key].numpy())
    # A weights file of a tiny network loads as is (no BGR reversal: tiny has no caffe weights).
    path = str(tmp_path / "tiny.weights.h5")
    backbone.network.save_weights(path)
    loaded = _loaded(path, name="tiny", tiny_width=TINY_WIDTH)
    np.testing.assert_array_equal(loaded(images)["C5"].numpy(), out["C5"].numpy())
    # A dtype argument (not only the global policy) reaches the inner network.
    half = Backbone(name="tiny", tiny_width=TINY_WIDTH, dtype="mixed_float16")
    assert all(v.dtype == tf.float16 for v in half(images).values())
    assert all(w.dtype == "float32" for w in half.weights)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="name"):
        Backbone(name="vgg16")
    with pytest.raises(ValueError, match="freeze_at"):
        Backbone(name="tiny", freeze_at=6)
    with pytest.raises(ValueError, match="the tiny backbone has no ImageNet weights"):
        _loaded("imagenet", name="tiny")
