"""End to end against torchvision v2: its maskrcnn_resnet50_fpn_v2 with seeded random weights, saved with
torch.save, imported by weights/importer.py (the code path of import_weights.py: the v2 preset recognised
from the keys, the model directory written and restored as eval/export/predict restore it), both run
on the same photos. Also: the old key form imports to the same variables, a v1 file forced into the v2
preset and the reverse end the program with one line, and a Faster R-CNN v2 file gives a box-only model.

The torchvision model is made non-trivial the way trained weights are: every BatchNorm (backbone, FPN,
box and mask heads) gets random affine parameters and statistics measured on the images' own features
(one train-mode pass with momentum 1), then perturbed at random; RPN objectness and class logits are
scaled so that photos give confident detections. v2 runs its BatchNorm with eps 1e-5 (nn.BatchNorm2d).
The canvas, resize rule and comparison are test_torchvision_equivalence.py's (same photos, 512 x 512,
short side 384, long side <= 512), whose helpers this file reuses.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.torch_oracle import import_torchvision

torch, torchvision = import_torchvision()

import tensorflow as tf  # noqa: E402

from maskrcnn_tf import run_dir  # noqa: E402
from maskrcnn_tf.export import export_saved_model  # noqa: E402
from maskrcnn_tf.weights import importer, torchvision_mapping  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.weights.test_import_weights import _run  # noqa: E402
from tests.weights.test_torchvision_equivalence import (  # noqa: E402
    CANVAS, LONG_SIDE, NUM_CLASSES, SHORT_SIDE, _assert_same_detections, _images, _our_inputs,
    _torchvision_detections)

# Logit scales that make the random v2 heads behave like trained ones (v2's BatchNorm-normalised features
# give far smaller logits than v1's): objectness logits up to ~2.6 on these photos (below ~17, where
# torchvision's float32 sigmoid would tie them, docs/design.md section 15), and 38, 42 and 7 of the 100
# detections per photo scoring >= 0.3 (11: 21, 23, 3; 13: 54, 83, 13).
OBJECTNESS_SCALE = 25.0
CLASS_LOGIT_SCALE = 12.0
SMALL_CANVAS = {"model.image_size": [CANVAS, CANVAS], "model.resize_short_side": SHORT_SIDE,
                "model.resize_max_long_side": LONG_SIDE}
V1_PRESET, V2_PRESET = "torchvision_maskrcnn_r50_fpn", "torchvision_maskrcnn_r50_fpn_v2"
# RoIs per image that calibrate the head BatchNorm statistics.
CALIBRATION_ROIS = 200


def _batch_norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def _calibrate(module, run):
    """Statistics of `module`'s BatchNorm layers set to those of the batch `run()` feeds it."""
    norms = _batch_norms(module)
    for norm in norms:
        norm.momentum = 1.0  # one train-mode pass sets the running statistics to the batch's
    module.train()
    with torch.no_grad():
        run()
    module.eval()
    for norm in norms:
        norm.momentum = 0.1


def _torchvision_v2_model(images, builder="maskrcnn_resnet50_fpn_v2"):
    """maskrcnn_resnet50_fpn_v2 (or fasterrcnn_resnet50_fpn_v2) with random weights made non-trivial (module
    docstring), in eval mode."""
    from torchvision.models import detection

    torch.manual_seed(0)
    model = getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                        min_size=SHORT_SIDE, max_size=LONG_SIDE, size_divisible=CANVAS).eval()
    norms = _batch_norms(model)
    assert len(norms) == 53 + 8 + 4 + (4 if hasattr(model.roi_heads, "mask_head") else 0)  # backbone, FPN, heads
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.2)
        batch = model.transform([torch.from_numpy(i).permute(2, 0, 1).float() / 255.0 for i in images])[0]
        _calibrate(model.backbone, lambda: model.backbone(batch.tensors))
        features = model.backbone(batch.tensors)
        proposals = [p[:CALIBRATION_ROIS] for p in model.rpn(batch, features)[0]]
        roi_heads = model.roi_heads
        box_features = roi_heads.box_roi_pool(features, proposals, batch.image_sizes)
        _calibrate(roi_heads.box_head, lambda: roi_heads.box_head(box_features))
        if hasattr(roi_heads, "mask_head") and roi_heads.mask_head is not None:
            mask_features = roi_heads.mask_roi_pool(features, proposals, batch.image_sizes)
            _calibrate(roi_heads.mask_head, lambda: roi_heads.mask_head(mask_features))
        for norm in norms:
            norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.5, 2.0))
            norm.running_mean.add_(0.1 * norm.running_var.sqrt() * torch.randn_like(norm.running_mean))
            assert norm.eps == 1e-5  # nn.BatchNorm2d's, which v2 runs with (no overwrite_eps)
        model.rpn.head.cls_logits.weight.mul_(OBJECTNESS_SCALE)
        roi_heads.box_predictor.cls_score.weight.mul_(CLASS_LOGIT_SCALE)
    return model


def old_key_form(state_dict):
    """The key names of a state dict saved before torchvision's `_version = 2` modules (FPN, RPNHead,
    MaskRCNNHeads), which current torchvision renames on load: {block}.{i}.0.weight -> {block}.{i}.weight,
    rpn.head.conv.0.0.* -> rpn.head.conv.*, mask_head.{i}.0.* -> mask_head.mask_fcn{i+1}.* (the BatchNorm
    `.1.*` keys and the second RPN conv keep their names). Without torch's version metadata."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.(weight|bias)$", r"\1.\2", key)
        key = re.sub(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"rpn.head.conv.\1", key)
        key = re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$",
                     lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}", key)
        renamed[key] = value
    return renamed


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """(work dir, photos, torchvision v2 model, its .pth file, the imported model directory, ImportResult)."""
    work = tmp_path_factory.mktemp("v2")
    images = _images()
    reference = _torchvision_v2_model(images)
    checkpoint = work / "maskrcnn_v2_random.pth"
    torch.save(reference.state_dict(), checkpoint)
    result = importer.import_checkpoint("torchvision", str(checkpoint), str(work / "run"), SMALL_CANVAS)
    return work, images, reference, checkpoint, work / "run", result


@pytest.mark.slow
def test_imported_torchvision_v2_gives_torchvision_detections(v2):
    _, images, reference, checkpoint, model_dir, result = v2
    # The preset is recognised from the keys; eps 1e-5 from the backbone's num_batches_tracked counters.
    assert result.preset == V2_PRESET and result.include_mask and result.norm_epsilon == 1e-5
    assert "(torchvision_maskrcnn_r50_fpn_v2), 90 classes; BatchNorm eps 1e-05" in result.summary(str(checkpoint))
    cfg, ours = run_dir.restore_model(str(model_dir))
    written = json.loads((model_dir / run_dir.CONFIG_FILE).read_text())["model"]
    assert (written["fpn_norm"], written["rpn_num_convs"], written["heads"]["box_num_convs"]) == ("batch_norm", 2, 4)
    expected = _torchvision_detections(reference, images)
    outputs = {k: v.numpy() for k, v in ours(_our_inputs(cfg, images), training=False).items()}
    _assert_same_detections(expected, outputs)


# Runs with only TensorFlow and NumPy: the SavedModel's image_tensor_box_masks signature on each photo.
FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf

    export_dir, inputs_path, out_path = sys.argv[1:4]
    serve = tf.saved_model.load(export_dir).signatures["image_tensor_box_masks"]
    photos = np.load(inputs_path)
    outputs = [serve(images=tf.constant(photos[f"photo{i}"][None])) for i in range(len(photos.files))]
    np.savez(out_path, **{key: np.concatenate([o[key].numpy() for o in outputs]) for key in outputs[0]})
""")


@pytest.mark.slow
def test_exported_v2_savedmodel_gives_torchvision_detections_in_a_fresh_process(v2):
    """The imported v2 model directory exported as a SavedModel and served by a process that imports only
    TensorFlow: each photo's detections, in original-image pixels with COCO category ids, are
    torchvision's final detections (its boxes mapped back to the photo, the 28 x 28 masks before pasting)."""
    work, images, reference, _, model_dir, _ = v2
    cfg, ours = run_dir.restore_model(str(model_dir))
    export_dir = str(work / "saved_model")
    export_saved_model(ours, cfg, export_dir, include_pasted_masks=False)
    np.savez(work / "photos.npz", **{f"photo{i}": image for i, image in enumerate(images)})
    script = work / "fresh.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(script), export_dir, str(work / "photos.npz"), str(work / "served.npz")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    served = dict(np.load(work / "served.npz"))

    hooked = _torchvision_detections(reference, images)  # 28 x 28 masks, resized-image boxes
    with torch.no_grad():
        final = reference([torch.from_numpy(i).permute(2, 0, 1).float() / 255.0 for i in images])
    expected = [dict(ref, boxes=out["boxes"].numpy()[:, [1, 0, 3, 2]]) for ref, out in zip(hooked, final)]
    for ref, out in zip(hooked, final):  # postprocess keeps roi_heads' order: the masks belong to the boxes
        np.testing.assert_array_equal(ref["scores"], out["scores"].numpy())
    # torchvision's labels are COCO category ids, as the SavedModel's classes (the preset's label map).
    _assert_same_detections(expected, served)


def test_old_key_form_imports_the_same_variables(v2, tmp_path):
    work, images, reference, _, model_dir, _ = v2
    old = old_key_form(reference.state_dict())
    assert "rpn.head.conv.weight" in old and "backbone.fpn.inner_blocks.0.weight" in old
    assert "roi_heads.mask_head.mask_fcn4.weight" in old and "rpn.head.conv.1.0.weight" in old
    # torchvision itself reads this form (its _load_from_state_dict renames keys of version-less files).
    fresh = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                                                 num_classes=NUM_CLASSES)
    fresh.load_state_dict(dict(old))  # a plain dict: no _metadata, so version None, as an old file
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), reference.state_dict().values()))

    checkpoint = tmp_path / "maskrcnn_v2_old_keys.pth"
    torch.save(old, checkpoint)
    result = importer.import_checkpoint("torchvision", str(checkpoint), str(tmp_path / "run"), SMALL_CANVAS)
    assert result.preset == V2_PRESET
    new_reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / "ckpt-0"))
    old_reader = tf.train.load_checkpoint(result.checkpoint_prefix)
    keys = [k for k in new_reader.get_variable_to_shape_map() if k.startswith("model/")]
    assert len(keys) > 400
    for key in keys:
        np.testing.assert_array_equal(old_reader.get_tensor(key), new_reader.get_tensor(key), err_msg=key)


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_architecture_and_preset_recognised_from_keys():
    from torchvision.models import detection

    torch.manual_seed(0)
    builders = {"maskrcnn_resnet50_fpn": ("v1", True), "fasterrcnn_resnet50_fpn": ("v1", False),
                "maskrcnn_resnet50_fpn_v2": ("v2", True), "fasterrcnn_resnet50_fpn_v2": ("v2", False)}
    for builder, (generation, masks) in builders.items():
        state = _state(getattr(detection, builder)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES))
        for form in (state, old_key_form(state)):
            assert torchvision_mapping.architecture(form) == generation, builder
            assert torchvision_mapping.has_mask_head(form) == masks, builder
            assert torchvision_mapping.builder_of(form) == builder
            cfg = importer.import_config("torchvision", masks, preset=torchvision_mapping.preset_for(form))
            torchvision_mapping.check_architecture(form, cfg.model, torchvision_mapping.preset_for(form))
            # Every key maps (none unused or missing); shapes are checked when a model is built.
            values, _ = importer.SOURCES["torchvision"].variables(form, cfg)
            assert any(p.startswith("mask_rcnn/mask_head/") for p in values) == masks, builder
            assert ("mask_rcnn/fpn/lateral_P2_norm/moving_mean" in values) == (generation == "v2"), builder


def test_faster_rcnn_v2_file_gives_a_box_only_v2_model(tmp_path):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    torch.manual_seed(0)
    reference = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).eval()
    checkpoint = tmp_path / "fasterrcnn_v2_random.pth"
    torch.save(reference.state_dict(), checkpoint)
    result = importer.import_checkpoint("torchvision", str(checkpoint), str(tmp_path / "run"),
                                        {"model.image_size": [128, 128], "model.resize_short_side": 128,
                                         "model.resize_max_long_side": 128})
    assert result.preset == V2_PRESET and not result.include_mask
    assert "Faster R-CNN (boxes only) (torchvision_maskrcnn_r50_fpn_v2)" in result.summary(str(checkpoint))
    cfg, ours = run_dir.restore_model(str(tmp_path / "run"))
    assert not cfg.model.include_mask and ours.mask_head is None and cfg.model.heads.box_num_convs == 4
    # fc1 holds box_head.5 (the Linear after 4 convs and the Flatten) permuted from (C, H, W) to (H, W, C).
    linear = reference.roi_heads.box_head[5].weight.detach().numpy()  # [1024, 256 * 7 * 7]
    np.testing.assert_array_equal(ours.box_head.fcs[0].kernel.numpy(),
                                  linear.reshape(1024, 256, 7, 7).transpose(2, 3, 1, 0).reshape(-1, 1024))


@pytest.mark.slow
def test_a_file_forced_into_the_other_generation_fails_in_one_line(tmp_path):
    """import_weights.py --config=<v1 preset> with a v2 file and the reverse: exit 1, one line naming the
    file's builder and the --config to use, no model directory; an unknown --config is refused too."""
    from torchvision.models import detection

    torch.manual_seed(0)
    cases = []
    for builder, forced, right in (("maskrcnn_resnet50_fpn_v2", V1_PRESET, V2_PRESET),
                                   ("fasterrcnn_resnet50_fpn", V2_PRESET, V1_PRESET)):
        path = tmp_path / f"{builder}.pth"
        torch.save(getattr(detection, builder)(weights=None, weights_backbone=None,
                                               num_classes=NUM_CLASSES).state_dict(), path)
        pattern = (rf"the checkpoint is torchvision's {builder} \(v\d: .*\) but --config={forced} builds a torchvision "
                   rf"v\d model; import it with --config={right} \(or without --config")
        cases.append((path, forced, pattern))
    cases.append((cases[0][0], "detectron2_r50_fpn_1x",
                  r"--config=detectron2_r50_fpn_1x: a torchvision checkpoint imports into torchvision_maskrcnn_r50_fpn "
                  r"or torchvision_maskrcnn_r50_fpn_v2"))
    for i, (path, forced, pattern) in enumerate(cases):
        model_dir = tmp_path / f"run{i}"
        result = _run(str(REPO_ROOT / "import_weights.py"), "--source=torchvision", f"--checkpoint={path}",
                      f"--model_dir={model_dir}", f"--config={forced}",
                      *[f"--params_override={k}={json.dumps(v)}" for k, v in SMALL_CANVAS.items()])
        assert result.returncode == 1, (forced, result.stderr[-1500:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and re.search(pattern, lines[0]), (forced, result.stderr[-1500:])
        assert "Traceback" not in result.stderr
        assert not model_dir.exists()


def test_overrides_that_leave_both_generations_are_refused():
    state = _state(torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                                                        num_classes=NUM_CLASSES))
    cfg = importer.import_config("torchvision", True, {"model.heads.box_num_convs": 2}, preset=V2_PRESET)
    with pytest.raises(ValueError, match=r"neither torchvision v1 nor v2 \(.*model\.heads\.box_num_convs=2.*\); "
                                         r"import it with --config=torchvision_maskrcnn_r50_fpn_v2 and without"):
        torchvision_mapping.check_architecture(state, cfg.model, V2_PRESET)
    # SyncBN is a training choice, not another architecture: the same state dict loads.
    cfg = importer.import_config("torchvision", True, {"model.fpn_norm": "sync_batch_norm"}, preset=V2_PRESET)
    torchvision_mapping.check_architecture(state, cfg.model, V2_PRESET)
