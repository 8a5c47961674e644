"""Layers of one shape start from different weights, and a seed repeats them (layers/initializers.py).

A shared Keras 3 initializer instance made without a seed gives the same values on every call, so two
same-shaped convs would start identical (and its seed, drawn at import time, ignored set_random_seed:
the seeded-run test of tests/e2e/test_seeded_training.py failed that way)."""
import keras
import numpy as np

from maskrcnn_tf.model import build_model
from tests.e2e.synthetic import tiny_test_config


def _kernels(model, *paths):
    variables = {v.path: v.numpy() for v in model.variables}
    return [variables[p] for p in paths]


def test_same_shaped_layers_start_different_and_a_seed_repeats_them():
    cfg = tiny_test_config(**{"model.heads.box_num_convs": 3, "model.heads.box_conv_dim": 16})
    paths = ("conv2_block1_1_conv/kernel", "conv2_block1_2_conv/kernel", "mask_rcnn/mask_head/conv1/kernel",
             "mask_rcnn/mask_head/conv2/kernel", "mask_rcnn/box_head/conv2/kernel", "mask_rcnn/box_head/conv3/kernel")
    keras.utils.set_random_seed(3)
    first = _kernels(build_model(cfg), *paths)
    for a, b in zip(first[::2], first[1::2]):
        assert a.shape == b.shape and not np.array_equal(a, b)
    keras.utils.set_random_seed(3)
    again = _kernels(build_model(cfg), *paths)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
