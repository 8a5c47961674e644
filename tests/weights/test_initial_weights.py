"""The backbone's initial weights are loaded after building, by one step (weights/initial.py): build_model
reads no file and downloads nothing, load_initial_weights names the file it cannot read, a fresh training
run loads model.backbone.weights and a resumed one never reads it again; layers/backbone.py imports neither
the loaders nor model.py / run_dir.py (the import circle it used to close)."""
import ast
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import distribute, training
from maskrcnn_tf.layers import backbone as backbone_lib
from maskrcnn_tf.model import build_model
from maskrcnn_tf.weights.initial import load_initial_weights
from tests.conftest import REPO_ROOT
from tests.e2e.synthetic import tiny_test_config


def _package_imports(path):
    """The maskrcnn_tf modules a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskrcnn_tf"):
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("maskrcnn_tf"))
    return names


def test_layers_import_no_loader_model_or_run_dir():
    # layers/backbone.py once loaded files itself, through a function-level import of maskrcnn_tf.weights
    # whose importer reaches run_dir.py and model.py, which imports layers/backbone.py: a circle.
    layers_dir = REPO_ROOT / "maskrcnn_tf" / "layers"
    for path in sorted(layers_dir.glob("*.py")):
        allowed = ("maskrcnn_tf.config", "maskrcnn_tf.ops", "maskrcnn_tf.layers")
        assert all(name.startswith(allowed) for name in _package_imports(path)), (path, _package_imports(path))
    code = ("import sys, maskrcnn_tf.layers.backbone as b; b.Backbone(name='tiny'); "
            "print(sorted(m for m in sys.modules if m.startswith(('maskrcnn_tf.model', 'maskrcnn_tf.run_dir', "
            "'maskrcnn_tf.weights'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_build_model_reads_nothing_and_the_loader_names_the_file(tmp_path):
    missing = str(tmp_path / "gone.weights.h5")
    model = build_model(tiny_test_config(**{"model.backbone.weights": missing}))
    assert model.config.model.backbone.weights == missing  # the config keeps it: it is the run's truth
    with pytest.raises(ValueError, match=f"^{missing}: no such file$"):
        load_initial_weights(model, missing)
    with pytest.raises(ValueError, match="the tiny backbone has no ImageNet weights"):
        load_initial_weights(build_model(tiny_test_config(**{"model.backbone.weights": "imagenet"})), "imagenet")


class _Offline(Exception):
    pass


def test_build_model_of_an_imagenet_resnet_downloads_nothing(monkeypatch):
    asked = []
    application = backbone_lib.RESNETS["resnet50"]

    def recording(**kwargs):
        asked.append(kwargs["weights"])
        if kwargs["weights"] is not None:
            raise _Offline  # stands for the download
        return application(**kwargs)

    monkeypatch.setitem(backbone_lib.RESNETS, "resnet50", recording)
    cfg = tiny_test_config(**{"model.backbone.name": "resnet50", "model.backbone.weights": "imagenet",
                              "model.backbone.freeze_at": 2})
    model = build_model(cfg)
    assert asked == [None]
    with pytest.raises(_Offline):
        load_initial_weights(model, cfg.model.backbone.weights)
    assert asked == [None, "imagenet"]


@pytest.fixture(scope="module")
def shapes_records(tmp_path_factory):
    from maskrcnn_tf.data.coco_converter import convert_coco
    from maskrcnn_tf.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("initial_weights")
    paths = make_shapes_dataset(str(root / "shapes"), num_train=2, num_val=0, image_size=96, seed=5)
    convert_coco(paths["train_images"], paths["train_annotations"], str(root / "records" / "train"), num_shards=1,
                 progress=False)
    return str(root / "records" / "train-*"), str(root / "records" / "train_label_map.json")


def test_a_fresh_run_loads_the_backbone_file_and_its_resume_never_reads_it(shapes_records, tmp_path):
    records, label_map = shapes_records
    path = str(tmp_path / "tiny_backbone.weights.h5")
    # The whole backbone frozen (freeze_at 5): after training it still holds the file's values.
    cfg = training.apply_label_map(tiny_test_config(**{
        "model.backbone.weights": path, "model.backbone.freeze_at": 5, "data.train_batch_size": 2,
        "train.total_steps": 1, "train.log_every_steps": 1, "train.checkpoint_every_steps": 1,
        "train.warmup_steps": 1}), label_map)
    keras.utils.set_random_seed(1)
    source = backbone_lib.Backbone(name="tiny", tiny_width=cfg.model.backbone.tiny_width)
    rng = np.random.default_rng(0)
    for v in source.weights:  # away from any fresh initialisation
        v.assign(np.asarray(v.numpy() + rng.normal(scale=0.1, size=v.shape), np.float32))
    source.network.save_weights(path)
    expected = [v.numpy() for v in source.weights]

    def backbone_values(model):
        return [v.numpy() for v in model.backbone.weights]

    strategy = distribute.get_strategy("one_device")
    model_dir = str(tmp_path / "run")
    first = training.train(cfg, model_dir, records, strategy, label_map_path=label_map, verbose=False)
    assert first["restored_from"] is None and first["global_step"] == 1
    for a, b in zip(backbone_values(first["model"]), expected):
        np.testing.assert_array_equal(a, b)

    os.remove(path)  # a resumed run takes the backbone from its checkpoint: the file is never read again
    longer = training.train(config_lib.replace(cfg, **{"train.total_steps": 2}), model_dir, records, strategy,
                            label_map_path=label_map, verbose=False)
    assert longer["restored_from"].endswith("ckpt-1") and longer["global_step"] == 2
    for a, b in zip(backbone_values(longer["model"]), expected):
        np.testing.assert_array_equal(a, b)
