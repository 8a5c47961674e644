"""torchvision side of `infer_800`: COCO-style inference of one 800 x 1333 image with the weights that
maskrcnn_tf imports from the same file (ours_infer_800.py). One JSON line on stdout, logs on stderr.

  python benchmarks/cases/torchvision_infer_800.py --case=infer_800 --weights=FILE.pth --write_weights
  python benchmarks/cases/torchvision_infer_800.py --case=infer_800 --weights=FILE.pth [--repeats=5]

--write_weights makes the shared checkpoint and exits (compare.py runs it before either side):
`maskrcnn_resnet50_fpn(num_classes=91)` with torch.manual_seed(0) weights, random frozen-BN statistics
and class logits x 3, so that the noise image gives confident detections and the mask head runs on a
full set of boxes, as with real weights on a photo; saved with torch.save(state_dict).
Timed call: `model([image])` under torch.inference_mode(), the model as torchvision builds it for its
COCO_V1 weights (min_size 800, max_size 1333, score threshold 0.05, 100 detections, RPN 1000/1000):
normalisation, resize (scale 1 here), network, and masks pasted at the image size.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402

SIDE = "torchvision"
HEIGHT, WIDTH = 800, 1333
NUM_CLASSES = 91
LOGIT_SCALE = 3.0
SEED = 0


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
    if args.case != "infer_800":
        parser.error("--case must be infer_800")
    args.repeats = args.repeats or 5
    return args


def write_weights(torch, torchvision, path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(SEED)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torchvision.ops.FrozenBatchNorm2d):
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        model.roi_heads.box_predictor.cls_score.weight.mul_(LOGIT_SCALE)
    torch.save(model.state_dict(), path)


def main():
    harness.claim_stdout()
    args = parse_args()
    sys.modules.setdefault("triton", None)  # no GPU: torch's eager kernels (see tests/torch_oracle.py)
    import numpy as np
    import torch
    import torchvision
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.set_num_threads(args.threads)
    if args.write_weights:
        write_weights(torch, torchvision, args.weights)
        harness.emit({"case": args.case, "side": SIDE, "wrote": args.weights})
        return
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                  min_size=args.short_side, max_size=args.max_long_side).eval()
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
        num_detections=int(detections["boxes"].shape[0]),
        mask_output_shape=list(detections["masks"].shape)))


if __name__ == "__main__":
    main()
