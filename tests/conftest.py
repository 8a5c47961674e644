"""Shared test fixtures: quiet TensorFlow, deterministic seeds, the optional ../shared data folder."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data(name: str) -> pathlib.Path:
    """Path of a ../shared/data sample; skips the test when a user's clone does not have it."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (only in the development workspace)")
    return path


def _split_cpu_into_two_logical_devices():
    """MirroredStrategy tests need 2 devices; this must happen before TensorFlow initialises them."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    except RuntimeError:  # already initialised (e.g. by a plugin): tests that need 2 devices skip
        pass


_split_cpu_into_two_logical_devices()


def two_replica_strategy():
    """The one MirroredStrategy over the 2 logical CPUs of this test process (skips without them).

    One per process: TensorFlow gives every new MirroredStrategy the same collective keys, so a second
    strategy's first all-reduce collides with the first strategy's ("Shape mismatch in the collective
    instance 100 ... Restart your program to reset") whenever their shapes differ."""
    global _TWO_REPLICA_STRATEGY
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs the 2 logical CPU devices that tests/conftest.py configures")
    if _TWO_REPLICA_STRATEGY is None:
        _TWO_REPLICA_STRATEGY = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
    return _TWO_REPLICA_STRATEGY


_TWO_REPLICA_STRATEGY = None


@pytest.fixture(scope="module", autouse=True)
def _seed_module():
    """The same seeds before a module's own module-scoped fixtures (autouse fixtures of a scope run first),
    so that a model such a fixture builds does not depend on which tests ran before it in this worker."""
    import keras

    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(autouse=True)
def _seed():
    """Python, NumPy, TensorFlow and Keras seeds (Keras initializers without a seed draw from Python's
    `random`), so that weight initialisation and sampling are the same in every run."""
    import keras

    keras.utils.set_random_seed(0)
    yield
