"""torchvision side of the model cases: `infer` (batch 1, end to end incl. mask pasting), `train` (one
SGD step, batch 2) and `train_v2` (the same step, v2 architecture, trainable BatchNorm), through
torchvision's public API only. One JSON line on stdout, logs on stderr.

  /work/peer_torch/bin/python benchmarks/cases/torchvision_model.py --case=infer [--image_size=1024] [--repeats=5]
      [--candidates=1000]
  /work/peer_torch/bin/python benchmarks/cases/torchvision_model.py --case=train [--repeats=3]
  /work/peer_torch/bin/python benchmarks/cases/torchvision_model.py --case=train_v2 [--repeats=3]

Decisions (the counts match maskrcnn_tf's coco_r50_fpn_1x; they are printed in the JSON):
- `infer`: `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=S, max_size=S,
  box_score_thresh=0.0, ...)`, eval(), `torch.inference_mode()`, input a list of one [3, S, S] float
  image in 0..1. Score threshold 0 (random weights score below torchvision's 0.05, which would skip the
  mask head) so every run returns exactly 100 detections (asserted). torchvision's postprocess pastes the
  masks into the image ([100, 1, S, S] probabilities), as ours does. RPN 1000 pre-NMS per level / 1000
  post-NMS at test time (torchvision's defaults, set explicitly). The script checks that
  model.transform leaves an S x S image at S x S (it calls interpolate with scale 1.0, but the size
  stays).
- Threshold 0 is not free for torchvision: it has no pre-NMS top-k for detections, so all
  1000 x 90 (RoI, class) candidates go through remove_small_boxes and batched_nms (seconds on this CPU;
  `stage_s_last_run` shows it as roi_heads.postprocess_detections). Ours keeps the top 1000 candidates
  (detection pre_nms_top_k) before NMS. So the script times a second series (`with_candidates`, after
  the main one, same process): the score threshold raised just under the 1000th highest foreground
  score of this image (--candidates), i.e. the same 1000 candidates ours feeds to NMS, still 100
  detections (asserted). `value` stays the brief's threshold-0 figure.
- `train`: with weights=None torchvision's builder uses trainable BatchNorm and 5 trainable stages,
  so the model is assembled as its builder does for pretrained weights: `resnet50(norm_layer=
  FrozenBatchNorm2d)`, `_resnet_fpn_extractor(trainable_layers=3)` (stem + res2 frozen), `MaskRCNN(...)`
  with 2000 pre-NMS per level / 1000 post-NMS proposals, 256 RPN anchors and 512 RoIs (25% foreground)
  per image. Step = zero_grad, sum of the loss dict, backward, SGD(momentum 0.9, weight decay 1e-4).
  Batch of 2 images with 3 instances each (boxes + full-image uint8 masks; harness.TRAIN_INSTANCES_1024).
- `train_v2`: torchvision v2 from scratch, `maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None,
  num_classes=91, ...)`: without weights its builder keeps every stage trainable (trainable_backbone_layers
  falls back to 5; passing 5 only adds a warning, so it is left out and all backbone parameters are
  asserted trainable) and the backbone's norm is resnet50's default nn.BatchNorm2d (v2 never uses
  FrozenBatchNorm2d), as are the FPN's and the box and mask heads': all in train mode, batch statistics.
  Counts: MaskRCNN's defaults, those of ours' torchvision_maskrcnn_r50_fpn_v2 preset (the `train` counts
  with 2000 post-NMS training proposals per image instead of 1000). Same step, batch and instances as
  `train`.
- num_classes 91 (torchvision's COCO head, what its users run; ours has 80 + background): 0.5% of the
  FLOPs, printed in the JSON.
- Threads: torch.set_num_threads(--threads) (2, same as TF's intra-op threads on our side).
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402

SIDE = "torchvision"
# Counts shared with maskrcnn_tf's coco_r50_fpn_1x preset.
COUNTS = dict(
    rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
    rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
    rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
    box_batch_size_per_image=512, box_positive_fraction=0.25,
    box_detections_per_img=100, box_nms_thresh=0.5,
)
# train_v2: MaskRCNN's defaults (also ours' torchvision_maskrcnn_r50_fpn_v2 preset's), set explicitly.
TRAIN_V2_COUNTS = dict(COUNTS, rpn_post_nms_top_n_train=2000)
NUM_CLASSES = 91
BASE_LR, REFERENCE_BATCH = 0.02, 16  # the same linear scaling as ours (irrelevant for speed)


def parse_args():
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=1000,
                        help="infer: also time with the score threshold raised so that this many (RoI, class) "
                             "candidates enter NMS, as ours' detection pre_nms_top_k (0 = off)")
    return harness.parse_model_case_args(parser, cases=("infer", "train", "train_v2"))


def norms(model) -> dict:
    """The norm of each part, as ours names them: "frozen" (FrozenBatchNorm2d), "batch_norm" (nn.BatchNorm2d)
    or "none"."""
    def kind(module):
        names = {type(m).__name__ for m in module.modules()}
        return "batch_norm" if "BatchNorm2d" in names else "frozen" if "FrozenBatchNorm2d" in names else "none"

    return {"backbone": kind(model.backbone.body), "fpn": kind(model.backbone.fpn),
            "box_head": kind(model.roi_heads.box_head), "mask_head": kind(model.roi_heads.mask_head)}


def bn_mode(torch, model) -> str:
    """How the model's BatchNorm layers normalise in the timed calls (the model's mode at the end)."""
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not batch_norms:
        return "frozen (FrozenBatchNorm2d only)"
    return "train (batch statistics)" if all(m.training for m in batch_norms) else "eval (running statistics)"


def check_no_resize(model, images, size):
    """The transform must hand the network the image at its own size (no rescaling)."""
    import torch

    with torch.inference_mode():
        image_list, _ = model.transform(images)
    sizes = [tuple(s) for s in image_list.image_sizes]
    assert sizes == [(size, size)] * len(images), f"transform resized the input: {sizes}"
    assert tuple(image_list.tensors.shape[-2:]) == (size, size), tuple(image_list.tensors.shape)
    return list(image_list.tensors.shape)


def watch_proposals(model):
    """Forward hooks: the returned dict's lists receive, per call, the RPN's proposal count per image and
    the number of RoIs the mask head runs on (all images)."""
    seen = {"proposals": [], "mask_rois": []}
    model.rpn.register_forward_hook(
        lambda module, inputs, outputs: seen["proposals"].append([len(p) for p in outputs[0]]))
    model.roi_heads.mask_roi_pool.register_forward_hook(
        lambda module, inputs, outputs: seen["mask_rois"].append(int(outputs.shape[0])))
    return seen


def watch_stages(model):
    """Wall time of the last call's stages (forward hooks + timing wrappers on two bound methods; the
    model's code is untouched): transform, backbone (+FPN), rpn, roi_heads (box head,
    postprocess_detections, mask head), transform.postprocess (mask pasting)."""
    import time

    stages, starts = {}, {}

    def timed_module(name, module):
        module.register_forward_pre_hook(lambda *_: starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(
            lambda *_: stages.__setitem__(name, round(time.perf_counter() - starts[name], 3)))

    def timed_method(name, owner, attr):
        method = getattr(owner, attr)

        def wrapper(*a, **k):
            start = time.perf_counter()
            result = method(*a, **k)
            stages[name] = round(time.perf_counter() - start, 3)
            return result

        setattr(owner, attr, wrapper)

    for name in ("transform", "backbone", "rpn", "roi_heads"):
        timed_module(name, getattr(model, name))
    timed_module("mask_head", model.roi_heads.mask_head)
    timed_method("roi_heads.postprocess_detections", model.roi_heads, "postprocess_detections")
    timed_method("transform.postprocess (mask pasting)", model.transform, "postprocess")
    return stages


def run_infer(args, torch, torchvision):
    import numpy as np
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    size = args.image_size
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=size,
                                  max_size=size, box_score_thresh=0.0, **COUNTS).eval()
    rgb = harness.smooth_noise_image(np, size)
    images = [torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0).contiguous()]  # [3, S, S]
    network_input_shape = check_no_resize(model, images, size)
    seen = watch_proposals(model)
    stages = watch_stages(model)

    def run():
        with torch.inference_mode():
            return model(images)[0]

    logits = []
    model.roi_heads.box_predictor.register_forward_hook(lambda m, i, outputs: logits.append(outputs[0]))
    first, runs, detections = harness.time_calls(run, args.repeats)
    num_detections = int(detections["boxes"].shape[0])
    assert num_detections == COUNTS["box_detections_per_img"], f"{num_detections} detections"
    fields = dict(num_detections=num_detections, norms=norms(model), bn_mode=bn_mode(torch, model),
                  num_proposals=seen["proposals"][-1],
                  num_mask_rois=seen["mask_rois"][-1], mask_output_shape=list(detections["masks"].shape),
                  network_input_shape=network_input_shape, paste_masks=True, stage_s_last_run=dict(stages))
    if args.candidates:
        # Same image, same weights: the class scores are those of the runs above. A threshold just under
        # the (candidates)-th highest foreground score keeps exactly that many (RoI, class) candidates.
        scores = torch.softmax(logits[-1], -1)[:, 1:].flatten()  # [R * K] foreground scores
        threshold = float(torch.topk(scores, args.candidates + 1).values[-1])
        model.roi_heads.score_thresh = threshold
        first_c, runs_c, detections = harness.time_calls(run, args.repeats)
        num = int(detections["boxes"].shape[0])
        assert num == COUNTS["box_detections_per_img"], f"{num} detections with {args.candidates} candidates"
        fields["with_candidates"] = dict(
            candidates=args.candidates, score_thresh=threshold, value=round(statistics.median(runs_c), 4),
            runs=[round(r, 4) for r in runs_c], first_s=round(first_c, 3), num_detections=num,
            stage_s_last_run=dict(stages))
    return first, runs, fields


def build_train_model(size, torchvision):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers=3)
    return MaskRCNN(backbone, num_classes=NUM_CLASSES, min_size=size, max_size=size, **COUNTS)


def build_train_v2_model(size, torchvision):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=size,
                                     max_size=size, **TRAIN_V2_COUNTS)
    frozen = [name for name, p in model.backbone.body.named_parameters() if not p.requires_grad]
    assert not frozen, f"v2 from scratch: every backbone stage trains, frozen: {frozen[:3]}"
    return model


def run_train(args, torch, torchvision):
    import numpy as np

    size, batch_size = args.image_size, 2
    model = (build_train_v2_model if args.case == "train_v2" else build_train_model)(size, torchvision)
    images, targets = [], []
    for b, instances in enumerate(harness.train_instances(size)):
        rgb = harness.smooth_noise_image(np, size, seed=b).astype(np.float32)
        masks, boxes, labels = [], [], []
        for cls, (y1, x1, y2, x2), shape in instances:
            mask = harness.full_mask(np, size, (y1, x1, y2, x2), shape)
            rgb[mask > 0] = 0.5 * rgb[mask > 0] + 100.0  # a visible object
            masks.append(mask)
            boxes.append([x1, y1, x2, y2])  # torchvision: [x1, y1, x2, y2]
            labels.append(cls)
        images.append(torch.from_numpy(np.clip(rgb, 0, 255) / 255.0).permute(2, 0, 1).float().contiguous())
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels, dtype=torch.int64),
                        "masks": torch.from_numpy(np.stack(masks))})  # [n, S, S] uint8
    network_input_shape = check_no_resize(model.eval(), images, size)
    model.train()
    seen = watch_proposals(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=BASE_LR * batch_size / REFERENCE_BATCH, momentum=0.9,
                                weight_decay=1e-4)

    def run():
        optimizer.zero_grad()
        losses = model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    first, runs, total_loss = harness.time_calls(run, args.repeats)
    assert np.isfinite(total_loss), total_loss
    return first, runs, dict(batch_size=batch_size, total_loss=round(total_loss, 4), norms=norms(model),
                             bn_mode=bn_mode(torch, model),
                             num_proposals=seen["proposals"][-1], num_mask_rois=seen["mask_rois"][-1],
                             trainable_params=sum(p.numel() for p in params),
                             network_input_shape=network_input_shape,
                             gt_instances_per_image=[len(x) for x in harness.train_instances(size)])


def main():
    harness.claim_stdout()
    args = parse_args()
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    first, runs, fields = (run_infer if args.case == "infer" else run_train)(args, torch, torchvision)
    v2 = args.case == "train_v2"
    trainable_layers = {"train": 3, "train_v2": 5}.get(args.case)
    harness.emit(harness.record(
        args.case, SIDE, "seconds", runs, first,
        versions={"torch": torch.__version__, "torchvision": torchvision.__version__},
        image_size=args.image_size, batch_size=fields.pop("batch_size", 1), intra_threads=torch.get_num_threads(),
        architecture="v2" if v2 else "v1",
        builder="maskrcnn_resnet50_fpn_v2" if v2 else "maskrcnn_resnet50_fpn" if args.case == "infer" else
        "MaskRCNN(resnet50(FrozenBatchNorm2d), trainable_layers=3)",
        counts=dict(TRAIN_V2_COUNTS if v2 else COUNTS, num_classes=NUM_CLASSES,
                    box_score_thresh=0.0 if args.case == "infer" else 0.05,
                    **({"trainable_layers": trainable_layers} if trainable_layers else {})),
        **fields))


if __name__ == "__main__":
    main()
