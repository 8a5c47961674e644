"""torchvision side of `infer_800` / `infer_800_v2`: COCO-style inference of one 800 x 1333 image with the
weights that maskrcnn_tf imports from the same file (ours_infer_800.py). One JSON line on stdout, logs on
stderr.

  python benchmarks/cases/torchvision_infer_800.py --case=infer_800 --weights=FILE.pth --write_weights
  python benchmarks/cases/torchvision_infer_800.py --case=infer_800 --weights=FILE.pth [--repeats=5]
  (--case=infer_800_v2: the same with torchvision's maskrcnn_resnet50_fpn_v2)

The model: `maskrcnn_resnet50_fpn` (infer_800) or `maskrcnn_resnet50_fpn_v2` (infer_800_v2: BatchNorm FPN
and heads, two RPN convs, 4-conv + 1-FC box head), num_classes 91, weights=None.
--write_weights makes the shared checkpoint and exits (compare.py runs it before either side, one file
per case): the model with torch.manual_seed(0) weights, random BatchNorm affine and statistics and class
logits x LOGIT_SCALE, so that the noise image gives confident detections (100; v2 at 800 x 1333: top score 0.95) and the
mask head runs on a full set of boxes, as with real weights on a photo; saved with torch.save(state_dict).
LOGIT_SCALE is 3 for v1 and 60 for v2, whose BatchNorm layers keep the box head's features near unit
scale: with either, the class logits' standard deviation on this image is ~4. Which BatchNorm layers
are randomised (RANDOM_NORMS): infer_800, FrozenBatchNorm2d only, which a builder without weights does not
use (its backbone has nn.BatchNorm2d), so that file's backbone BN is the default identity (weight 1, bias
0, mean 0, var 1), kept as it was measured; infer_800_v2, every nn.BatchNorm2d (backbone, FPN, box and
mask heads), all in eval mode at inference.
Timed call: `model([image])` under torch.inference_mode(), the model as torchvision builds it for its
COCO_V1 weights (min_size 800, max_size 1333, score threshold 0.05, 100 detections, RPN 1000/1000):
normalisation, resize (scale 1 here), network, and masks pasted at the image size.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402
from torchvision_model import bn_mode, norms  # noqa: E402

SIDE = "torchvision"
HEIGHT, WIDTH = 800, 1333
NUM_CLASSES = 91
SEED = 0
CASES = ("infer_800", "infer_800_v2")
# case -> torchvision builder (torchvision.models.detection) and the architecture ours recognises from the keys.
BUILDERS = {"infer_800": "maskrcnn_resnet50_fpn", "infer_800_v2": "maskrcnn_resnet50_fpn_v2"}
ARCHITECTURES = {"infer_800": "v1", "infer_800_v2": "v2"}
LOGIT_SCALE = {"infer_800": 3.0, "infer_800_v2": 60.0}
# case -> names of the torchvision.ops / torch.nn BatchNorm classes write_weights randomises (module docstring).
RANDOM_NORMS = {"infer_800": ("FrozenBatchNorm2d",), "infer_800_v2": ("BatchNorm2d", "FrozenBatchNorm2d")}


def parse_args():
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="the shared torchvision state dict (.pth)")
    # Smaller settings only to check the script quickly; the case is 800 x 1333, short side 800, long <= 1333.
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--short_side", type=int, default=800)
    parser.add_argument("--max_long_side", type=int, default=1333)
    parser.add_argument("--write_weights", action="store_true", help="write --weights and exit")
    args = parser.parse_args()
    if args.case not in CASES:
        parser.error(f"--case must be one of {', '.join(CASES)}")
    args.repeats = args.repeats or 5
    return args


def build(torchvision, case, **kwargs):
    """The case's torchvision detector with weights=None (91 classes), in eval mode."""
    builder = getattr(torchvision.models.detection, BUILDERS[case])
    return builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **kwargs).eval()


def norm_layers(model) -> dict:
    """{class name: count} of the model's BatchNorm layers (FrozenBatchNorm2d, BatchNorm2d)."""
    counts = {}
    for module in model.modules():
        name = type(module).__name__
        if "BatchNorm" in name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def write_weights(torch, torchvision, path, case):
    torch.manual_seed(SEED)
    model = build(torchvision, case)
    norm_types = tuple(getattr(torchvision.ops, n) if n == "FrozenBatchNorm2d" else getattr(torch.nn, n)
                       for n in RANDOM_NORMS[case])
    generator = torch.Generator().manual_seed(SEED + 1)
    randomised = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norm_types):
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                randomised += 1
        model.roi_heads.box_predictor.cls_score.weight.mul_(LOGIT_SCALE[case])
    torch.save(model.state_dict(), path)
    return randomised


def main():
    harness.claim_stdout()
    args = parse_args()
    sys.modules.setdefault("triton", None)  # no GPU: torch's eager kernels (see tests/torch_oracle.py)
    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    if args.write_weights:
        randomised = write_weights(torch, torchvision, args.weights, args.case)
        harness.emit({"case": args.case, "side": SIDE, "wrote": args.weights, "builder": BUILDERS[args.case],
                      "randomised_norm_layers": randomised})
        return
    model = build(torchvision, args.case, min_size=args.short_side, max_size=args.max_long_side)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    rgb = harness.smooth_noise_image(np, max(args.height, args.width))[:args.height, :args.width]
    # [800, 1333, 3] uint8 by default, the same image as ours_infer_800.py
    images = [torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255.0).contiguous()]

    def run():
        with torch.inference_mode():
            return model(images)[0]

    first, runs, detections = harness.time_calls(run, args.repeats)
    harness.emit(harness.record(
        args.case, SIDE, "seconds", runs, first,
        versions={"torch": torch.__version__, "torchvision": torchvision.__version__},
        image_hw=[args.height, args.width], short_side=args.short_side, max_long_side=args.max_long_side,
        batch_size=1, intra_threads=args.threads,
        builder=BUILDERS[args.case], architecture=ARCHITECTURES[args.case],
        norms=norms(model), norm_layers=norm_layers(model), bn_mode=bn_mode(torch, model),
        num_detections=int(detections["boxes"].shape[0]),
        mask_output_shape=list(detections["masks"].shape)))


if __name__ == "__main__":
    main()
