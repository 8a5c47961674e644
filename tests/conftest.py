"""Shared test fixtures: quiet TensorFlow, deterministic seeds, the optional ../shared data folder."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data(name: str) -> pathlib.Path:
    """Path of a ../shared/data sample; skips the test when a user's clone does not have it."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (only in the development workspace)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    import tensorflow as tf

    tf.random.set_seed(0)
    yield
