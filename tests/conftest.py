"""Shared test fixtures: quiet TensorFlow, deterministic seeds, the optional ../shared data folder."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data(name: str, subject: str = "") -> pathlib.Path:
    """Path of a ../shared/data sample; skips the test when a user's clone does not have it.

    Only for tests whose subject is the real sample's content (subject says which): every other test
    takes its COCO data from the coco_sample fixture, which stands in generated data for ../shared."""
    path = SHARED_DATA / name
    if not path.exists():
        reason = f"{path} not present (only in the development workspace)"
        pytest.skip(f"{reason}: its subject is the real sample ({subject})" if subject else reason)
    return path


@dataclasses.dataclass(frozen=True)
class CocoSample:
    """A COCO-format sample: an image folder and its annotation file."""

    image_dir: pathlib.Path
    annotation_file: pathlib.Path
    real: bool  # True: ../shared/data's real sample; False: its generated stand-in (data/shapes.py)


# name -> (image folder, annotation file) under ../shared/data, and the stand-in used without it:
# "train" = the shapes train split; "val" = the shapes val split with one instance turned into a COCO crowd
# region (uncompressed RLE, as COCO writes them); "one_class" = the train images as a Roboflow export has
# them: one class (id 1) under an unused parent category (id 0).
COCO_SAMPLES = {
    "coco_tiny/train": ("coco_tiny/train2017", "coco_tiny/annotations/instances_train2017.json", "train"),
    "coco_tiny/val": ("coco_tiny/val2017", "coco_tiny/annotations/instances_val2017.json", "val"),
    "coco_2img/train": ("coco_2img/images/train2017", "coco_2img/annotations/instances_train2017.json", "train"),
    "coco_val2017_10": ("coco_val2017_10/images", "coco_val2017_10/annotations/instances_val2017_subset.json",
                        "val"),
    "potholes": ("potholes/valid", "potholes/valid/_annotations.coco.json", "one_class"),
}
# Tiny on purpose (about 0.2 s to write): 8 train images (the 8 that tests/e2e/test_train.py trains on), 4 val.
STANDIN_SHAPES = dict(num_train=8, num_val=4, image_size=96, seed=27)
STANDIN_ONE_CLASS_NAME = "shape"  # the stand-in's one class; the real sample's is "pothole"


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE of a {0, 1} [H, W] mask: run lengths in column-major order, 0s first."""
    import numpy as np

    flat = np.asarray(mask, np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _write_standins(root: pathlib.Path):
    """Writes the stand-ins under root; returns {"train" | "val" | "one_class": (image_dir, annotation_file)}."""
    import json

    from pycocotools import mask as mask_utils

    from maskrcnn_tf.data.shapes import make_shapes_dataset

    paths = make_shapes_dataset(str(root), **STANDIN_SHAPES)
    standins = {split: (pathlib.Path(paths[f"{split}_images"]), pathlib.Path(paths[f"{split}_annotations"]))
                for split in ("train", "val")}
    val = json.loads(standins["val"][1].read_text())
    crowd = val["annotations"][0]
    size = next((im["height"], im["width"]) for im in val["images"] if im["id"] == crowd["image_id"])
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(crowd["segmentation"], *size)))
    crowd.update(iscrowd=1, segmentation=_uncompressed_rle(mask))
    val_crowd = root / "annotations" / "instances_val_crowd.json"
    val_crowd.write_text(json.dumps(val))
    standins["val"] = (standins["val"][0], val_crowd)
    train = json.loads(standins["train"][1].read_text())
    name = STANDIN_ONE_CLASS_NAME
    train["categories"] = [{"id": 0, "name": name, "supercategory": "none"},
                           {"id": 1, "name": name, "supercategory": name}]
    for annotation in train["annotations"]:
        annotation["category_id"] = 1
    one_class = root / "annotations" / "instances_train_one_class.json"
    one_class.write_text(json.dumps(train))
    standins["one_class"] = (standins["train"][0], one_class)
    return standins


@pytest.fixture(scope="session")
def coco_sample(tmp_path_factory):
    """coco_sample(name) -> CocoSample: ../shared/data's sample `name` (a COCO_SAMPLES key) in the
    development workspace, else its generated stand-in (written once per session), so that the test runs
    in a user's clone too."""
    standins = {}

    def get(name: str) -> CocoSample:
        image_dir, annotation_file, standin = COCO_SAMPLES[name]
        if (SHARED_DATA / annotation_file).exists():
            return CocoSample(SHARED_DATA / image_dir, SHARED_DATA / annotation_file, real=True)
        if not standins:
            standins.update(_write_standins(tmp_path_factory.mktemp("coco_standins")))
        return CocoSample(*standins[standin], real=False)

    return get


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
