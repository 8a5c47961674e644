"""Weight initialisers shared by the layers.

A Keras 3 initializer instance made without a seed draws its seed once, when it is constructed, and then
gives the same values on every call. So each layer gets a NEW instance from these functions: layers of
one shape start from different weights, and the draw happens after `keras.utils.set_random_seed`, so a
seeded run repeats (a module-level instance is built at import time, before any seed is set).
"""
import keras


def msra_fill() -> keras.initializers.Initializer:
    """He (Kaiming) normal over fan-out, untruncated: detectron2's c2_msra_fill, torchvision's
    kaiming_normal_(mode="fan_out", nonlinearity="relu")."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="untruncated_normal")
