"""A torchvision or detectron2 COCO checkpoint -> a model directory eval.py, export.py, predict.py and
`train.py --init_checkpoint` accept unchanged (import_weights.py is the command line).

    MODEL_DIR/config.json       the source's preset (config.py), include_mask False for a Faster R-CNN
                                checkpoint, data.category_ids / class_names = the COCO categories
    MODEL_DIR/label_map.json    the same categories in data/label_map.py's format
    MODEL_DIR/checkpoints/ckpt-0  run_dir.make_checkpoint(model) (variables keyed by path, no optimizer)

Sources: "torchvision" (maskrcnn_resnet50_fpn / fasterrcnn_resnet50_fpn .pth, read by torch_pickle,
mapped by torchvision_mapping; K = 90: class i is COCO id i, and the ten ids COCO 2017 does not use are
named "N/A" as torchvision's own category list does) and "detectron2" (model-zoo .pkl or .pth, read by
detectron2_pickle, mapped by detectron2_mapping; K = 80 in COCO id order).

The directory is built in a temporary sibling (".<name>.tmp-<pid>") and renamed at the end, so a failure
leaves no half-written model directory; an existing MODEL_DIR is refused. Every failure is a ValueError
whose message starts with the checkpoint file (and names the offending key and shapes).
"""

import json
import os
import shutil
from typing import Callable, Dict, NamedTuple

import numpy as np

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import run_dir
from maskrcnn_tf.data import coco_classes
from maskrcnn_tf.weights import detectron2_mapping, detectron2_pickle, layout, torch_pickle, torchvision_mapping

CHECKPOINT_NAME = "ckpt-0"
# torchvision's COCO_V1 category list names the ids that COCO 2017 does not use "N/A".
UNUSED_ID_NAME = "N/A"


class Source(NamedTuple):
    preset: str
    read: Callable[[str], Dict[str, np.ndarray]]
    has_mask_head: Callable[[Dict[str, np.ndarray]], bool]
    # (state_dict, cfg) -> ({variable path: array}, {path: checkpoint key}): the key mapping, checked
    # before the (slow) model build so that a checkpoint of another architecture fails fast.
    variables: Callable
    # Contiguous class i + 1 <-> COCO category id; None = the 80 COCO 2017 categories in id order.
    category_ids: tuple


SOURCES = {
    "torchvision": Source("torchvision_maskrcnn_r50_fpn", torch_pickle.load_state_dict,
                          torchvision_mapping.has_mask_head,
                          lambda sd, cfg: torchvision_mapping.torchvision_variables(
                              sd, cfg.model.num_classes, cfg.model.roi.box_output_size, cfg.model.include_mask),
                          tuple(range(1, config_lib.TORCHVISION_COCO_NUM_CLASSES + 1))),
    "detectron2": Source("detectron2_r50_fpn_1x", detectron2_pickle.load_state_dict,
                         detectron2_mapping.has_mask_head,
                         lambda sd, cfg: detectron2_mapping.detectron2_variables(
                             sd, cfg.model.num_classes, cfg.model.roi.box_output_size),
                         tuple(cid for cid, _ in coco_classes.COCO_CATEGORIES)),
}


def _categories(category_ids):
    names = dict(coco_classes.COCO_CATEGORIES)
    return [{"id": cid, "contiguous_id": i + 1, "name": names.get(cid, UNUSED_ID_NAME)}
            for i, cid in enumerate(category_ids)]


def import_config(source: str, include_mask: bool, overrides: Dict = None) -> config_lib.Config:
    """The config of an imported model: the source's preset, its COCO label map, then `overrides`
    (dotted names, e.g. a smaller canvas)."""
    spec = SOURCES[source]
    categories = _categories(spec.category_ids)
    cfg = config_lib.replace(config_lib.get_preset(spec.preset), **{
        "model.num_classes": len(categories),
        "model.include_mask": include_mask,
        "model.backbone.weights": None,  # every weight comes from the checkpoint
        "data.category_ids": tuple(c["id"] for c in categories),
        "data.class_names": tuple(c["name"] for c in categories),
    })
    return config_lib.validate(config_lib.replace(cfg, **(overrides or {})))


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def import_weights(source: str, checkpoint: str, model_dir: str, overrides: Dict = None) -> str:
    """Writes model_dir from a reference checkpoint; returns the checkpoint prefix written.

    ValueError starting with the checkpoint path when it cannot be read, names a disallowed global, or
    does not fit the source's architecture (unused or missing keys, shapes, class count); with
    "--model_dir" for an existing directory. Nothing is left behind on failure.
    """
    if source not in SOURCES:
        raise ValueError(f"--source={source!r}: expected one of {', '.join(SOURCES)}")
    model_dir = os.path.abspath(model_dir)
    if os.path.lexists(model_dir):
        raise ValueError(f"--model_dir={model_dir}: already exists; give a new directory")
    parent = os.path.dirname(model_dir)
    if not os.path.isdir(parent):
        raise ValueError(f"--model_dir={model_dir}: parent directory {parent} does not exist")
    spec = SOURCES[source]
    state_dict = spec.read(checkpoint)  # ValueError naming the file
    cfg = import_config(source, spec.has_mask_head(state_dict), overrides)

    from maskrcnn_tf.model import build_model  # late import: building pulls in all of TF/Keras

    try:
        values, sources = spec.variables(state_dict, cfg)
        model = build_model(cfg)
        # The mappings' REQUIRED_PREFIXES are the same: the backbone and the four heads.
        layout.assign(model, values, sources, torchvision_mapping.REQUIRED_PREFIXES)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(checkpoint) else f"{checkpoint}: {message}") from None

    temporary = os.path.join(parent, f".{os.path.basename(model_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        os.makedirs(os.path.join(temporary, run_dir.CHECKPOINT_DIR))
        _write_json(os.path.join(temporary, run_dir.CONFIG_FILE), config_lib.to_dict(cfg))
        _write_json(os.path.join(temporary, run_dir.LABEL_MAP_FILE), _categories(spec.category_ids))
        checkpoint_dir = os.path.join(temporary, run_dir.CHECKPOINT_DIR)
        checkpoint_object = run_dir.make_checkpoint(model)
        # Created before writing so it is saved: readers restore with assert_existing_objects_matched,
        # which counts the save counter (Checkpoint.write alone would leave it out).
        checkpoint_object.save_counter  # noqa: B018
        checkpoint_object.write(os.path.join(checkpoint_dir, CHECKPOINT_NAME))
        # The state file tf.train.latest_checkpoint reads, with a path relative to its directory so that
        # the rename below (and any later move of the model directory) keeps it valid.
        with open(os.path.join(checkpoint_dir, "checkpoint"), "w", encoding="utf-8") as f:
            f.write(f'model_checkpoint_path: "{CHECKPOINT_NAME}"\nall_model_checkpoint_paths: "{CHECKPOINT_NAME}"\n')
        os.rename(temporary, model_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return os.path.join(model_dir, run_dir.CHECKPOINT_DIR, CHECKPOINT_NAME)
