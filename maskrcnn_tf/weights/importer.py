"""A torchvision or detectron2 COCO checkpoint -> a model directory eval.py, export.py, predict.py and
`train.py --init_checkpoint` accept unchanged (import_weights.py is the command line).

    MODEL_DIR/config.json       the source's preset (presets.py), include_mask False for a Faster R-CNN
                                checkpoint, data.category_ids / class_names = the COCO categories
    MODEL_DIR/label_map.json    the same categories in data/label_map.py's format
    MODEL_DIR/checkpoints/ckpt-0  run_dir.make_checkpoint(model) (variables keyed by path, no optimizer)

Sources: "torchvision" (maskrcnn_resnet50_fpn / fasterrcnn_resnet50_fpn .pth and their _v2 twins, read
by torch_pickle, mapped by torchvision_mapping; the preset, torchvision_maskrcnn_r50_fpn or _v2, is
recognised from the keys (torchvision_mapping.preset_for) unless `preset` (--config) names one, and a
file of the other generation is refused in one line naming it and the --config to use; K = 90: class i
is COCO id i, and the ten ids COCO 2017 does not use are named "N/A" as torchvision's own category
list does) and "detectron2" (model-zoo .pkl or .pth, read by
detectron2_pickle, mapped by detectron2_mapping; K = 80 in COCO id order; the preset, detectron2_r50_fpn_1x
or detectron2_r101_fpn_3x, is recognised from the res2..res5 block counts (detectron2_mapping.preset_for),
and a file that fits neither (ResNeXt, the LSJ or GN heads, Cascade, keypoints) or is forced into the other
preset is refused in one line naming its stage depths, groups and heads).

The directory is built in a temporary sibling (".<name>.tmp-<pid>") and renamed at the end, so a failure
leaves no half-written model directory; an existing MODEL_DIR is refused. Every failure is a ValueError
whose message starts with the checkpoint file (and names the offending key and shapes).

Before anything is unpickled:
- Integrity. A file name ending in "-<8 or more hex digits>.<ext>" (torch.hub's convention, all of
  torchvision's files: maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth) carries the first digits of the file's
  SHA-256; detectron2's model-zoo names "model_final_<6 hex digits>.pkl" carry the first digits of its MD5
  (detectron2 MODEL_ZOO.md). Either is checked as torch.hub does (digest[:len(prefix)] == prefix) and a
  mismatch is refused (a truncated or tampered download); verify_hash=False (--no_verify_hash) skips it.
- BatchNorm epsilon, which no state dict records (`norm_epsilon_of`): a --params_override of
  model.backbone.norm_epsilon wins; a torchvision file whose SHA-256 starts with a published COCO_V1
  prefix (PUBLISHED; renamed copies too) runs with 0, as torchvision's builders set (overwrite_eps);
  backbone num_batches_tracked counters mean nn.BatchNorm2d, 1e-5; a v2 file gets its preset's 1e-5
  (torchvision's v2 builders use nn.BatchNorm2d and never overwrite_eps); any other torchvision file
  gets the v1 preset's 0 (COCO_V1 and models fine-tuned from it), a model trained from an ImageNet backbone or from
  scratch with FrozenBatchNorm2d needs 1e-5 by override; detectron2 always 1e-5 (its FrozenBatchNorm2d).
  The value and its reason are on the summary line (ImportResult.summary).
Buffers that carry information (detectron2's cell anchors and pixel statistics) are compared with the
config (detectron2_mapping.check_buffers); counters are dropped.
"""

import hashlib
import json
import os
import re
import shutil
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets
from maskrcnn_tf import run_dir
from maskrcnn_tf.data import coco_classes
from maskrcnn_tf.weights import detectron2_mapping, detectron2_pickle, layout, torch_pickle, torchvision_mapping

CHECKPOINT_NAME = "ckpt-0"
# torchvision's COCO_V1 category list names the ids that COCO 2017 does not use "N/A".
UNUSED_ID_NAME = "N/A"


EPSILON_FIELD = "model.backbone.norm_epsilon"
TORCH_BATCH_NORM_EPSILON = 1e-5  # nn.BatchNorm2d's and FrozenBatchNorm2d's default (torchvision, detectron2)
# torch.hub's naming: "<name>-<first hex digits of the SHA-256>.<ext>" (torch/hub.py HASH_REGEX, 8 or more here).
SHA256_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
# detectron2 MODEL_ZOO.md: "any model on this page contains its md5 prefix in its file name".
MD5_SUFFIX = re.compile(r"^model_final_([0-9a-f]{6})\.pkl$")
HASH_CHUNK_BYTES = 1 << 20
# Published torchvision files, SHA-256 prefix -> (what, eps). The v1 builders call overwrite_eps(model, 0.0)
# for COCO_V1 (pytorch/vision#2933: these weights were trained when FrozenBatchNorm2d had no eps), which no
# state dict can tell; the v2 builders use nn.BatchNorm2d's 1e-5 (named here for the summary line).
PUBLISHED = {
    "bf2d0c1e": ("torchvision's maskrcnn_resnet50_fpn COCO_V1 file", 0.0),
    "258fb6c6": ("torchvision's fasterrcnn_resnet50_fpn COCO_V1 file", 0.0),
    "73cbd019": ("torchvision's maskrcnn_resnet50_fpn_v2 COCO_V1 file", TORCH_BATCH_NORM_EPSILON),
    "dd69338a": ("torchvision's fasterrcnn_resnet50_fpn_v2 COCO_V1 file", TORCH_BATCH_NORM_EPSILON),
}


class Integrity(NamedTuple):
    sha256: Optional[str]  # hex digest when computed
    note: str  # for the summary line, e.g. "SHA-256 prefix bf2d0c1e verified"


def _digest(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_integrity(path: str, verify: bool = True, want_sha256: bool = False,
                    skip_hint: str = "download it again; --no_verify_hash skips this check") -> Integrity:
    """Checks the hash prefix the file name carries (module docstring); ValueError in one line on a mismatch.

    want_sha256: compute the SHA-256 even when the name carries none (to recognise a renamed published file).
    skip_hint: the mismatch message's advice in parentheses (callers without --no_verify_hash say so).
    """
    name = os.path.basename(path)
    sha_claim, md5_claim = SHA256_SUFFIX.search(name), MD5_SUFFIX.match(name)
    if not verify:
        return Integrity(None, "hash not verified (--no_verify_hash)")
    sha256 = _digest(path, "sha256") if (sha_claim or want_sha256) else None
    notes = []
    for claim, algorithm, label in ((sha_claim, "sha256", "SHA-256"), (md5_claim, "md5", "MD5")):
        if claim is None:
            continue
        prefix = claim.group(1)
        digest = sha256 if algorithm == "sha256" else _digest(path, algorithm)
        if digest[:len(prefix)] != prefix:
            raise ValueError(f"{path}: its {label} is {digest}, but the file name says it starts with {prefix}: a "
                             f"truncated or tampered download ({skip_hint})")
        notes.append(f"{label} prefix {prefix} verified")
    return Integrity(sha256, ", ".join(notes) or "no hash in the file name")


def _published(path: str, integrity: Integrity):
    """(prefix, (what, eps)) of a published file recognised by its SHA-256 (or, unverified, by its name)."""
    for prefix, entry in PUBLISHED.items():
        if integrity.sha256 is not None:
            if integrity.sha256.startswith(prefix):
                return prefix, entry
        else:
            claim = SHA256_SUFFIX.search(os.path.basename(path))
            if claim and claim.group(1).startswith(prefix):
                return prefix, entry
    return None


def norm_epsilon_of(source: str, path: str, state_dict: Dict[str, np.ndarray], integrity: Integrity,
                    overrides: Dict = None, preset: Optional[str] = None) -> Tuple[Optional[float], str]:
    """(the backbone BatchNorm epsilon to build with, why) for the import's summary line (module docstring).

    preset: the import's preset (None: the source's, recognised from the file). None: the
    --params_override value is used as given."""
    if EPSILON_FIELD in (overrides or {}):
        return None, f"from --params_override={EPSILON_FIELD}"
    if source == "detectron2":
        return TORCH_BATCH_NORM_EPSILON, "detectron2's FrozenBatchNorm2d"
    published = _published(path, integrity)
    if published:
        prefix, (what, eps) = published
        how = f"SHA-256 {prefix}..." if integrity.sha256 is not None else f"its name says {prefix}, hash not verified"
        return eps, f"{what} ({how}), which torchvision runs with eps {eps:g}"
    counters = torchvision_mapping.backbone_batch_norm_counters(state_dict)
    if counters:
        return TORCH_BATCH_NORM_EPSILON, (f"the backbone saved {counters} BatchNorm num_batches_tracked counters: "
                                          "trained with nn.BatchNorm2d, eps 1e-5")
    preset = preset or preset_of(source, state_dict)
    preset_eps = config_lib.get_preset(preset).model.backbone.norm_epsilon
    if preset == torchvision_mapping.PRESETS[torchvision_mapping.V2]:
        return preset_eps, (f"a torchvision v2 model: its builders use nn.BatchNorm2d, eps {preset_eps:g}, "
                            "and no overwrite_eps")
    return preset_eps, (f"assumed: torchvision's COCO_V1 and models fine-tuned from it run with {preset_eps:g}; "
                        "a model trained from an ImageNet backbone runs with 1e-5: "
                        f"--params_override={EPSILON_FIELD}=1e-5")


class Source(NamedTuple):
    preset: str
    read: Callable[[str], Dict[str, np.ndarray]]
    has_mask_head: Callable[[Dict[str, np.ndarray]], bool]
    # (state_dict, cfg) -> ({variable path: array}, {path: checkpoint key}): the key mapping, checked
    # before the (slow) model build so that a checkpoint of another architecture fails fast.
    variables: Callable
    # Contiguous class i + 1 <-> COCO category id; None = the 80 COCO 2017 categories in id order.
    category_ids: tuple
    # (state_dict, cfg) -> [what was checked]: buffers compared with the config (ValueError if they differ).
    buffers: Callable = lambda state_dict, cfg: []
    # state_dict -> the preset that builds it (None: `preset`); the presets --config may name.
    preset_for: Optional[Callable] = None
    presets: Tuple[str, ...] = ()
    # (state_dict, cfg, preset) -> None, or ValueError when the file is another generation than the model.
    check_architecture: Callable = lambda state_dict, cfg, preset: None


SOURCES = {
    "torchvision": Source("torchvision_maskrcnn_r50_fpn", torch_pickle.load_state_dict,
                          torchvision_mapping.has_mask_head,
                          lambda sd, cfg: torchvision_mapping.torchvision_variables(
                              sd, cfg.model.num_classes, cfg.model.roi.box_output_size, cfg.model.include_mask),
                          tuple(range(1, presets.TORCHVISION_COCO_NUM_CLASSES + 1)),
                          preset_for=torchvision_mapping.preset_for,
                          presets=tuple(torchvision_mapping.PRESETS.values()),
                          check_architecture=lambda sd, cfg, preset: torchvision_mapping.check_architecture(
                              sd, cfg.model, preset)),
    "detectron2": Source("detectron2_r50_fpn_1x", detectron2_pickle.load_state_dict,
                         detectron2_mapping.has_mask_head,
                         lambda sd, cfg: detectron2_mapping.detectron2_variables(
                             sd, cfg.model.num_classes, cfg.model.roi.box_output_size),
                         tuple(cid for cid, _ in coco_classes.COCO_CATEGORIES),
                         lambda sd, cfg: detectron2_mapping.check_buffers(sd, cfg.model),
                         preset_for=detectron2_mapping.preset_for,
                         presets=tuple(detectron2_mapping.PRESETS.values()),
                         check_architecture=lambda sd, cfg, preset: detectron2_mapping.check_architecture(
                             sd, cfg.model, preset)),
}


def preset_of(source: str, state_dict: Dict[str, np.ndarray]) -> str:
    """The preset an import of `state_dict` from `source` uses when --config does not name one."""
    spec = SOURCES[source]
    return spec.preset_for(state_dict) if spec.preset_for else spec.preset


def _check_preset(source: str, preset: Optional[str]) -> None:
    allowed = SOURCES[source].presets or (SOURCES[source].preset,)
    if preset is not None and preset not in allowed:
        raise ValueError(f"--config={preset}: a {source} checkpoint imports into {' or '.join(allowed)} "
                         "(default: recognised from the checkpoint)")


class ImportResult(NamedTuple):
    checkpoint_prefix: str  # MODEL_DIR/checkpoints/ckpt-0
    source: str
    num_classes: int
    include_mask: bool
    norm_epsilon: float
    epsilon_reason: str
    integrity: str
    checked: List[str]  # buffers compared with the config
    preset: Optional[str] = None  # the config the model was built from (presets.py); None: the source's

    def summary(self, checkpoint: str) -> str:
        """The program's one summary line."""
        kind = "Mask R-CNN" if self.include_mask else "Faster R-CNN (boxes only)"
        checked = f"; buffers checked: {', '.join(self.checked)}" if self.checked else ""
        if self.preset not in (None, SOURCES[self.source].preset):
            kind += f" ({self.preset})"  # e.g. torchvision v2
        return (f"import_weights: {checkpoint} -> {self.checkpoint_prefix}: {self.source} {kind}, "
                f"{self.num_classes} classes; BatchNorm eps {self.norm_epsilon:g} ({self.epsilon_reason}); "
                f"{self.integrity}{checked}")


def _categories(category_ids):
    names = dict(coco_classes.COCO_CATEGORIES)
    return [{"id": cid, "contiguous_id": i + 1, "name": names.get(cid, UNUSED_ID_NAME)}
            for i, cid in enumerate(category_ids)]


def import_config(source: str, include_mask: bool, overrides: Dict = None,
                  norm_epsilon: Optional[float] = None, preset: Optional[str] = None) -> config_lib.Config:
    """The config of an imported model: `preset` (None: the source's first, torchvision v1), its COCO label
    map, the backbone BatchNorm epsilon (None: the preset's), then `overrides` (dotted names, e.g. a
    smaller canvas)."""
    spec = SOURCES[source]
    _check_preset(source, preset)
    categories = _categories(spec.category_ids)
    fields = {
        "model.num_classes": len(categories),
        "model.include_mask": include_mask,
        "model.backbone.weights": None,  # every weight comes from the checkpoint
        "data.category_ids": tuple(c["id"] for c in categories),
        "data.class_names": tuple(c["name"] for c in categories),
    }
    if norm_epsilon is not None:
        fields[EPSILON_FIELD] = norm_epsilon
    cfg = config_lib.replace(config_lib.get_preset(preset or spec.preset), **fields)
    return config_lib.validate(config_lib.replace(cfg, **(overrides or {})))


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def import_weights(source: str, checkpoint: str, model_dir: str, overrides: Dict = None,
                   verify_hash: bool = True, preset: Optional[str] = None) -> str:
    """Writes model_dir from a reference checkpoint; returns the checkpoint prefix written
    (`import_checkpoint` also returns what the summary line says)."""
    return import_checkpoint(source, checkpoint, model_dir, overrides, verify_hash, preset).checkpoint_prefix


def import_checkpoint(source: str, checkpoint: str, model_dir: str, overrides: Dict = None,
                      verify_hash: bool = True, preset: Optional[str] = None) -> ImportResult:
    """Writes model_dir from a reference checkpoint, with `preset` (--config; None: recognised from the
    checkpoint, `preset_of`).

    ValueError starting with the checkpoint path when its name's hash prefix does not match (unless
    verify_hash is False), it cannot be read, names a disallowed global, does not fit the source's
    architecture (unused or missing keys, shapes, class count; a torchvision v1 file in a v2 preset or
    the reverse; a detectron2 R101 file in the R50 preset or the reverse, or a detectron2 model no preset
    builds) or holds buffers that contradict the config; with "--model_dir" for an existing
    directory. Nothing is left behind on failure.
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
    _check_preset(source, preset)
    if not os.path.isfile(checkpoint):
        raise ValueError(f"{checkpoint}: no such file")
    integrity = check_integrity(checkpoint, verify_hash, want_sha256=source == "torchvision")
    state_dict = spec.read(checkpoint)  # ValueError naming the file
    preset = preset or preset_of(source, state_dict)
    norm_epsilon, epsilon_reason = norm_epsilon_of(source, checkpoint, state_dict, integrity, overrides, preset)
    cfg = import_config(source, spec.has_mask_head(state_dict), overrides, norm_epsilon, preset)

    from maskrcnn_tf.model import build_model  # late import: building pulls in all of TF/Keras

    try:
        spec.check_architecture(state_dict, cfg, preset)
        checked = spec.buffers(state_dict, cfg)
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
    return ImportResult(os.path.join(model_dir, run_dir.CHECKPOINT_DIR, CHECKPOINT_NAME), source,
                        cfg.model.num_classes, cfg.model.include_mask, cfg.model.backbone.norm_epsilon,
                        epsilon_reason, integrity.note, checked, preset)
