"""model.orientation_canvases: a batch of lying (or standing) images runs on the smaller landscape (or
portrait) canvas, and gives exactly what a model built for that canvas gives on the sliced input.

tests/weights/test_torchvision_equivalence.py checks the same path against torchvision's detections.
"""
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.model import build_model, inference_canvases
from tests.e2e.synthetic import tiny_test_config

CANVAS, SHORT_SIDE = 256, 128
LANDSCAPE, PORTRAIT = (SHORT_SIDE, CANVAS), (CANVAS, SHORT_SIDE)


def _config(image_size=(CANVAS, CANVAS), orientation_canvases=True):
    # train.seed: the anchor and RoI sampling of compute_losses draw stateless, keyed by the seed.
    return tiny_test_config(**{"model.image_size": image_size, "model.resize_mode": "short_side",
                               "model.resize_short_side": SHORT_SIDE, "model.resize_max_long_side": CANVAS,
                               "model.orientation_canvases": orientation_canvases, "train.seed": 1})


def _batch(valid_sizes, seed=0):
    """Images on the full canvas with smooth random content in each valid (h, w) extent, zeros beyond
    (as the pipeline pads), and their image_info (scale 1, no offset)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((len(valid_sizes), CANVAS, CANVAS, 3), np.float32)
    infos = []
    for i, (h, w) in enumerate(valid_sizes):
        coarse = rng.uniform(-100, 100, (1, h // 16 + 1, w // 16 + 1, 3))
        images[i, :h, :w] = tf.image.resize(coarse, (h, w)).numpy()[0] + rng.normal(0, 10, (h, w, 3))
        infos.append([[h, w], [h, w], [1, 1], [0, 0]])
    return {"images": tf.constant(images), "image_info": tf.constant(infos, tf.float32)}


def _sliced(batch, canvas):
    return {"images": batch["images"][:, :canvas[0], :canvas[1]], "image_info": batch["image_info"]}


def _assert_equal_outputs(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-5, err_msg=key)


def test_canvases_of_the_config():
    preset = config_lib.get_preset("torchvision_maskrcnn_r50_fpn")  # 1344 x 1344, short side 800
    assert inference_canvases(preset.model) == ()  # off unless asked for
    on = config_lib.replace(preset, **{"model.orientation_canvases": True}).model
    assert inference_canvases(on) == ((832, 1344), (1344, 832))  # 800 rounded up to 64
    assert inference_canvases(_config().model) == (LANDSCAPE, PORTRAIT)
    assert inference_canvases(_config(orientation_canvases=False).model) == ()
    assert inference_canvases(config_lib.replace(_config(), **{"model.resize_mode": "fit"}).model) == ()
    # A landscape canvas already as low as the short side keeps only the portrait one (a square).
    assert inference_canvases(_config(image_size=(SHORT_SIDE, CANVAS)).model) == ((SHORT_SIDE, SHORT_SIDE),)
    with pytest.raises(ValueError, match="model.orientation_canvases"):
        config_lib.validate(_config(orientation_canvases="yes"))


@pytest.mark.parametrize("valid_sizes, canvas", [
    ([(96, 256), (128, 200)], LANDSCAPE),  # both lie: the landscape canvas holds them
    ([(256, 120), (200, 128)], PORTRAIT),  # both stand
    ([(128, 128)], LANDSCAPE),  # fits both: the first canvas
    ([(96, 256), (256, 96)], (CANVAS, CANVAS)),  # mixed: the full canvas
])
def test_batch_runs_on_the_smallest_canvas_that_holds_it(valid_sizes, canvas):
    model = build_model(_config())
    assert model.inference_canvases == (LANDSCAPE, PORTRAIT)
    on_canvas = build_model(_config(image_size=canvas, orientation_canvases=False))
    on_canvas.set_weights(model.get_weights())
    batch = _batch(valid_sizes)
    expected = on_canvas(_sliced(batch, canvas), training=False)
    _assert_equal_outputs(model(batch, training=False), expected)
    # Graph mode (as the SavedModel runs it): the same branch, the same detections.
    in_graph = tf.function(lambda b: model(b, training=False))(batch)
    _assert_equal_outputs(in_graph, tf.function(lambda b: on_canvas(b, training=False))(_sliced(batch, canvas)))
    assert int(tf.reduce_sum(expected["num_detections"])) > 0


def test_training_keeps_the_full_canvas():
    model = build_model(_config())
    full = build_model(_config(orientation_canvases=False))
    full.set_weights(model.get_weights())
    batch = _batch([(96, 256), (128, 200)])
    batch.update(gt_boxes=tf.constant([[[10, 10, 60, 90]], [[20, 30, 100, 150]]], tf.float32),
                 gt_classes=tf.constant([[1], [2]], tf.int32),
                 gt_masks=tf.ones([2, 1, 28, 28], tf.float32))
    losses = model.compute_losses(batch)
    expected = full.compute_losses(batch)
    for name in expected:
        np.testing.assert_allclose(losses[name].numpy(), expected[name].numpy(), rtol=1e-6, err_msg=name)


def test_saved_model_serves_on_the_orientation_canvas(tmp_path):
    # A lying and a standing photo through the exported image_tensor signature equal the in-process
    # serving of models built for their canvases (no orientation canvases there).
    from maskrcnn_tf.export import ServingModule, export_saved_model

    cfg = _config()
    model = build_model(cfg)
    export_dir = str(tmp_path / "saved_model")
    export_saved_model(model, cfg, export_dir)
    serve = tf.saved_model.load(export_dir).signatures["image_tensor"]
    rng = np.random.default_rng(3)
    for size, canvas in (((100, 200), LANDSCAPE), ((200, 100), PORTRAIT)):
        on_canvas_cfg = _config(image_size=canvas, orientation_canvases=False)
        on_canvas = build_model(on_canvas_cfg)
        on_canvas.set_weights(model.get_weights())
        image = tf.constant(rng.integers(0, 255, (1, *size, 3), dtype=np.uint8))
        serving = ServingModule(on_canvas, on_canvas_cfg)  # held: its tf.functions keep only a weak self
        expected = serving.serve_tensor(image)
        got = serve(images=image)
        assert int(expected["num_detections"][0]) > 0
        _assert_equal_outputs({k: got[k] for k in expected}, expected)
