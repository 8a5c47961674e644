"""The published checkpoint layouts of docs/design.md section 15, written by the test, buffers included.

- torchvision's COCO_V1 files: a legacy (pre-1.6) torch.save stream of the state dict under the old key
  names (fpn inner_blocks.{i}.weight, rpn.head.conv.weight, mask_head.mask_fcn{i}.weight; _metadata
  versions 1), FrozenBatchNorm2d (no num_batches_tracked), the file named "<stem>-<SHA-256 prefix>.pth".
- detectron2's 2019-2020 model-zoo .pkl: {"model": {name: np.ndarray} with the five cell_anchors buffers,
  "__author__": ...}, matching_heuristics optional; checkpoints of 2020-04..2021-02 add pixel_mean/std.
Then: buffers that contradict the config, file names whose hash prefix does not match, and the BatchNorm
epsilon the import assumes. Kept fast: no model is built (the import stops, or is stopped, before).
"""
import collections
import hashlib
import os
import re
import shutil

import numpy as np
import pytest

from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()

from maskrcnn_tf import config as config_lib  # noqa: E402
from maskrcnn_tf.weights import detectron2_mapping, detectron2_pickle, importer, torch_pickle  # noqa: E402
from tests.weights.test_detectron2_pickle import (  # noqa: E402
    detectron2_cell_anchors, model_zoo_model, r50_fpn_state_dict, write_model_zoo_pickle)

# torchvision 0.3 names of the modules whose keys changed when they got _version = 2 (their
# _load_from_state_dict upgrades them: ops/feature_pyramid_network.py, detection/rpn.py, mask_rcnn.py).
OLD_VERSION_MODULES = ("backbone.fpn", "rpn.head", "roi_heads.mask_head")
_NEW_FPN = re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\.(weight|bias)$")
_NEW_RPN = re.compile(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$")
_NEW_MASK = re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$")


def old_key(key: str) -> str:
    """The torchvision 0.3 (COCO_V1) name of a current torchvision key."""
    for pattern, replacement in ((_NEW_FPN, r"backbone.fpn.\1.\2.\3"), (_NEW_RPN, r"rpn.head.conv.\1")):
        if pattern.match(key):
            return pattern.sub(replacement, key)
    match = _NEW_MASK.match(key)
    if match:
        return f"roi_heads.mask_head.mask_fcn{int(match.group(1)) + 1}.{match.group(2)}"
    return key


def frozen_bn_maskrcnn(seed: int = 0, num_classes: int = 91):
    """torchvision's maskrcnn_resnet50_fpn as its COCO_V1 weights run: FrozenBatchNorm2d everywhere in the
    backbone, eps 0 (overwrite_eps), seeded random weights (the same conv weights as the builder's
    weights=None model: BatchNorm initialisation draws no random numbers)."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(seed)
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    model = MaskRCNN(backbone, num_classes=num_classes).eval()
    overwrite_eps(model, 0.0)
    return model


def coco_v1_state_dict(model) -> collections.OrderedDict:
    """model.state_dict() as a torchvision 0.3 model saved it: old key names, those modules at version 1,
    no num_batches_tracked (FrozenBatchNorm2d has none)."""
    current = model.state_dict()
    state = collections.OrderedDict((old_key(k), v) for k, v in current.items()
                                    if not k.endswith("num_batches_tracked"))
    state._metadata = collections.OrderedDict(
        (prefix, {"version": 1} if prefix in OLD_VERSION_MODULES else dict(info))
        for prefix, info in current._metadata.items())
    return state


def write_coco_v1_file(directory, stem: str, state) -> str:
    """Writes `state` in the legacy torch.save format as "<stem>-<first 8 hex digits of its SHA-256>.pth"
    (torch.hub's naming), the layout of maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth; returns the path."""
    scratch = os.path.join(directory, f"{stem}.partial")
    torch.save(state, scratch, _use_new_zipfile_serialization=False)
    with open(scratch, "rb") as f:
        prefix = hashlib.sha256(f.read()).hexdigest()[:8]
    path = os.path.join(directory, f"{stem}-{prefix}.pth")
    os.replace(scratch, path)
    return path


def sha256_prefix(path, digits=8) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:digits]


@pytest.fixture(scope="module")
def d2_weights():
    return r50_fpn_state_dict(np.random.default_rng(11))


@pytest.fixture(scope="module")
def coco_v1(tmp_path_factory):
    """(torchvision model, its COCO_V1-layout state dict, the file written from it)."""
    model = frozen_bn_maskrcnn()
    state = coco_v1_state_dict(model)
    path = write_coco_v1_file(str(tmp_path_factory.mktemp("coco_v1")), "maskrcnn_resnet50_fpn_coco", state)
    return model, state, path


def test_coco_v1_layout_reads_as_torchvision_loads_it(coco_v1):
    """The legacy stream with old key names: torchvision itself loads it (strict), our reader returns
    exactly its tensors, and the mapping gives the same variables as from a current-layout state dict."""
    model, state, path = coco_v1
    assert "backbone.fpn.inner_blocks.0.weight" in state and "rpn.head.conv.weight" in state
    assert "roi_heads.mask_head.mask_fcn4.weight" in state and not any("num_batches" in k for k in state)
    assert not torch_pickle.zipfile.is_zipfile(path) and torch_pickle.is_legacy_file(path)

    reloaded = frozen_bn_maskrcnn(seed=1)
    reloaded.load_state_dict(torch.load(path, weights_only=False))  # strict: every old key upgraded
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], tensor, rtol=0, atol=0)

    ours = torch_pickle.load_state_dict(path)
    assert list(ours) == list(state)
    for key, tensor in state.items():
        np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)
    cfg = importer.import_config("torchvision", include_mask=True)
    from_file, _ = importer.SOURCES["torchvision"].variables(ours, cfg)
    current = {k: v.numpy() for k, v in model.state_dict().items()}
    from_current, _ = importer.SOURCES["torchvision"].variables(current, cfg)
    assert sorted(from_file) == sorted(from_current)
    for path_key, value in from_current.items():
        np.testing.assert_array_equal(from_file[path_key], value, err_msg=path_key)


def test_detectron2_model_zoo_layouts_read_and_their_buffers_are_checked(tmp_path, d2_weights):
    """Each documented top-level variant reads to the same "model" dict; the buffers are compared with the
    preset (not dropped unchecked) and the weights map with no key left over."""
    cfg = importer.import_config("detectron2", include_mask=True)
    variants = {"protocol 2, no matching_heuristics": dict(protocol=2),
                "protocol 4, matching_heuristics": dict(protocol=4, matching_heuristics=True)}
    for name, kwargs in variants.items():
        path = tmp_path / "model_final_test.pkl"
        written = write_model_zoo_pickle(path, d2_weights, **kwargs)
        loaded = detectron2_pickle.load_state_dict(str(path))
        assert sorted(loaded) == sorted(written), name
        assert loaded["proposal_generator.anchor_generator.cell_anchors.4"].shape == (3, 4), name
        assert importer.SOURCES["detectron2"].buffers(loaded, cfg) == ["5 cell_anchors"], name
    with_stats = model_zoo_model(d2_weights, pixel_stats=True)
    assert detectron2_mapping.check_buffers(with_stats, cfg.model) == ["5 cell_anchors", "pixel_mean", "pixel_std"]
    with_stats["backbone.bottom_up.res2.0.conv1.norm.num_batches_tracked"] = np.array(7, np.int64)  # a BN counter
    values, sources = importer.SOURCES["detectron2"].variables(with_stats, cfg)  # buffers are no unused keys
    assert "mask_rcnn/rpn_head/conv/kernel" in values
    assert not any("anchor_generator" in key or "pixel" in key or "num_batches" in key for key in sources.values())


def test_unknown_keys_still_fail(d2_weights):
    cfg = importer.import_config("detectron2", include_mask=True)
    for extra in ("proposal_generator.anchor_generator.offsets", "pixel_var", "roi_heads.box_head.fc1.scale"):
        state = model_zoo_model(d2_weights)
        state[extra] = np.zeros(3, np.float32)
        with pytest.raises(ValueError, match=rf"key {re.escape(extra)} \(shape \(3,\)\) has no place in this model"):
            importer.SOURCES["detectron2"].variables(state, cfg)


def _import_error(tmp_path, source, checkpoint, overrides=None, verify_hash=True):
    """The one-line ValueError of an import that must fail before the model is built; no model directory."""
    model_dir = tmp_path / "run"
    with pytest.raises(ValueError) as error:
        importer.import_checkpoint(source, str(checkpoint), str(model_dir), overrides, verify_hash)
    message = str(error.value)
    assert message.startswith(f"{checkpoint}: ") and "\n" not in message, message
    assert not model_dir.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    return message


def test_cell_anchors_that_disagree_with_the_preset_fail_in_one_line(tmp_path):
    """A file whose RPN was trained on other anchors: sizes, the order of the aspect ratios, the number of
    levels, or the config's rounding (torchvision's convention) all differ from detectron2's buffers."""
    path = tmp_path / "model_final_anchors.pkl"
    small = detectron2_cell_anchors(sizes=(16, 32, 64, 128, 256))
    write_model_zoo_pickle(path, {**small, "backbone.fpn_lateral2.bias": np.zeros(256, np.float32)}, buffers=False)
    message = _import_error(tmp_path, "detectron2", path)
    assert re.search(r"cell_anchors\.0: the checkpoint's P2 anchors \(size 16, aspect ratios 0\.5, 1, 2\) differ "
                     r"from the config's \(size 32, aspect ratios 0\.5, 1, 2, round_base_anchors=False\)", message)
    assert "--params_override=model.anchors.sizes" in message

    model = detectron2_mapping.check_buffers
    preset = config_lib.get_preset("detectron2_r50_fpn_1x").model
    assert model(detectron2_cell_anchors(), preset) == ["5 cell_anchors"]
    with pytest.raises(ValueError, match=r"cell_anchors\.0: .*aspect ratios 2, 1, 0\.5\) differ .*ratios 0\.5, 1, 2"):
        model(detectron2_cell_anchors(aspect_ratios=(2.0, 1.0, 0.5)), preset)
    four = detectron2_cell_anchors(sizes=(32, 64, 128, 256))
    with pytest.raises(ValueError, match=r"cell_anchors\.\{0, 1, 2, 3\}: anchors of 4 levels; the model has 5"):
        model(four, preset)
    rounded = config_lib.replace(config_lib.get_preset("detectron2_r50_fpn_1x"),
                                 **{"model.anchors.round_base_anchors": True}).model
    with pytest.raises(ValueError, match=r"round_base_anchors=True"):
        model(detectron2_cell_anchors(), rounded)
    # The same anchors given to the config by override pass.
    overridden = config_lib.replace(config_lib.get_preset("detectron2_r50_fpn_1x"),
                                    **{"model.anchors.sizes": (16, 32, 64, 128, 256)}).model
    assert model(small, overridden) == ["5 cell_anchors"]


def test_pixel_statistics_that_disagree_with_the_preset_fail_in_one_line(tmp_path):
    """detectron2 stores cfg.MODEL.PIXEL_MEAN / PIXEL_STD in BGR; the preset's RGB normalisation must be
    their reverse. A model trained with ImageNet std, or a mean in RGB order, is refused with the override
    that would describe it."""
    path = tmp_path / "model_0089999.pkl"
    state = {"pixel_mean": np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1),
             "pixel_std": np.array([57.375, 57.12, 58.395], np.float32).reshape(3, 1, 1),
             "backbone.fpn_lateral2.bias": np.zeros(256, np.float32)}
    write_model_zoo_pickle(path, state, buffers=False)
    message = _import_error(tmp_path, "detectron2", path)
    assert re.search(r"pixel_std: the checkpoint's normalisation \[57\.375, 57\.12, 58\.395\] \(detectron2's input "
                     r"order, BGR\) differs from the config's model\.pixel_std \(1, 1, 1\) \(RGB\), \[1, 1, 1\] in "
                     r"BGR; if the model was trained so, pass "
                     r"--params_override=model\.pixel_std=\[58\.395, 57\.12, 57\.375\]", message), message
    preset = config_lib.get_preset("detectron2_r50_fpn_1x")
    fixed = config_lib.replace(preset, **{"model.pixel_std": (58.395, 57.12, 57.375)}).model
    assert detectron2_mapping.check_buffers(state, fixed) == ["pixel_mean", "pixel_std"]
    rgb_mean = {"pixel_mean": np.array([123.675, 116.28, 103.53], np.float32).reshape(3, 1, 1)}
    with pytest.raises(ValueError, match=r"pixel_mean: the checkpoint's normalisation \[123\.675, 116\.28, 103\.53\]"):
        detectron2_mapping.check_buffers(rgb_mean, preset.model)


def test_hash_suffix_that_does_not_match_fails_in_one_line(tmp_path, coco_v1):
    """torch.hub's rule (digest[:len(prefix)] == prefix) for "-<hex>.ext" names, detectron2's MD5 prefix for
    model_final_<hex>.pkl; --no_verify_hash (verify_hash=False) lets the same file through."""
    good = coco_v1[2]
    prefix = sha256_prefix(good)
    assert importer.check_integrity(good).note == f"SHA-256 prefix {prefix} verified"
    renamed = tmp_path / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    shutil.copy(good, renamed)
    message = _import_error(tmp_path, "torchvision", renamed)
    assert re.fullmatch(rf"{re.escape(str(renamed))}: its SHA-256 is {sha256_prefix(good, 64)}, but the file name "
                        r"says it starts with bf2d0c1e: a truncated or tampered download \(download it again; "
                        r"--no_verify_hash skips this check\)", message), message
    truncated = tmp_path / f"maskrcnn_resnet50_fpn_coco-{prefix}.pth"
    truncated.write_bytes(open(good, "rb").read()[:1000000])
    assert "truncated or tampered" in _import_error(tmp_path, "torchvision", truncated)
    assert importer.check_integrity(str(renamed), verify=False).note == "hash not verified (--no_verify_hash)"

    d2 = tmp_path / "weights.pkl"
    write_model_zoo_pickle(d2, {"w": np.ones(3, np.float32)}, buffers=False)
    md5 = hashlib.md5(d2.read_bytes()).hexdigest()
    named = tmp_path / f"model_final_{md5[:6]}.pkl"
    shutil.copy(d2, named)
    assert importer.check_integrity(str(named)).note == f"MD5 prefix {md5[:6]} verified"
    wrong = tmp_path / f"model_final_{'0' if md5[0] != '0' else '1'}{md5[1:6]}.pkl"
    shutil.copy(d2, wrong)
    with pytest.raises(ValueError, match=rf"its MD5 is {md5}, but the file name says it starts with"):
        importer.check_integrity(str(wrong))
    plain = tmp_path / "model_final.pth"  # no hash in the name: nothing to check
    shutil.copy(d2, plain)
    assert importer.check_integrity(str(plain)).note == "no hash in the file name"


def test_the_batch_norm_epsilon_is_decided_and_printed(tmp_path, monkeypatch, coco_v1):
    """A state dict does not record eps: a published COCO_V1 file (by SHA-256, renamed or not) runs with 0,
    backbone num_batches_tracked counters mean nn.BatchNorm2d (1e-5), an override wins, anything else
    gets the preset's 0 with the advice to pass 1e-5; detectron2 is 1e-5. The summary line says which."""
    path = coco_v1[2]
    state = torch_pickle.load_state_dict(path)

    def decide(source="torchvision", file=path, sd=state, overrides=None, verify=True):
        return importer.norm_epsilon_of(source, file, sd, importer.check_integrity(file, verify, True), overrides)

    eps, why = decide()
    assert eps == 0.0 and why.startswith("assumed: torchvision's COCO_V1 and models fine-tuned from it run with 0")
    assert "--params_override=model.backbone.norm_epsilon=1e-5" in why
    assert decide(overrides={"model.backbone.norm_epsilon": 1e-5}) == (
        None, "from --params_override=model.backbone.norm_epsilon")
    assert decide(source="detectron2") == (1e-5, "detectron2's FrozenBatchNorm2d")
    counters = dict(state, **{f"backbone.body.layer1.0.bn{i}.num_batches_tracked": np.array(5) for i in (1, 2, 3)})
    assert decide(sd=counters) == (1e-5, "the backbone saved 3 BatchNorm num_batches_tracked counters: trained "
                                         "with nn.BatchNorm2d, eps 1e-5")
    # A published file is recognised by its SHA-256, also when renamed (its prefix stands in for bf2d0c1e).
    prefix = sha256_prefix(path)
    monkeypatch.setitem(importer.PUBLISHED, prefix, ("torchvision's maskrcnn_resnet50_fpn COCO_V1 file", 0.0))
    renamed = tmp_path / "coco.pth"
    shutil.copy(path, renamed)
    assert decide(file=str(renamed), sd=counters) == (
        0.0, f"torchvision's maskrcnn_resnet50_fpn COCO_V1 file (SHA-256 {prefix}...), which torchvision runs "
             "with eps 0")
    assert decide(verify=False, sd=counters)[1].startswith(f"torchvision's maskrcnn_resnet50_fpn COCO_V1 file "
                                                           f"(its name says {prefix}, hash not verified)")
    cfg = importer.import_config("torchvision", True, {"model.image_size": [256, 256]}, norm_epsilon=1e-5)
    assert cfg.model.backbone.norm_epsilon == 1e-5
    assert importer.import_config("torchvision", True, {"model.backbone.norm_epsilon": 0.001},
                                  norm_epsilon=1e-5).model.backbone.norm_epsilon == 0.001
    result = importer.ImportResult("run/checkpoints/ckpt-0", "torchvision", 90, True, 0.0, why,
                                   f"SHA-256 prefix {prefix} verified", [])
    assert result.summary("x.pth") == (f"import_weights: x.pth -> run/checkpoints/ckpt-0: torchvision Mask R-CNN, 90 "
                                       f"classes; BatchNorm eps 0 ({why}); SHA-256 prefix {prefix} verified")
