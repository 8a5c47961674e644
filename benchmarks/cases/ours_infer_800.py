"""maskrcnn_tf side of `infer_800` / `infer_800_v2`: the torchvision checkpoint that torchvision_infer_800.py
runs, imported with maskrcnn_tf.weights (no torch), on the same 800 x 1333 image. One JSON line on stdout,
logs on stderr.

  python benchmarks/cases/ours_infer_800.py --case=infer_800 --weights=FILE.pth [--repeats=5] [--canvas=HxW]
      [--orientation_canvases]
  (--case=infer_800_v2: the same with the maskrcnn_resnet50_fpn_v2 file)

The model is the preset the file's keys call for (torchvision_mapping.preset_for: infer_800's
maskrcnn_resnet50_fpn file -> torchvision_maskrcnn_r50_fpn, infer_800_v2's maskrcnn_resnet50_fpn_v2 file
-> torchvision_maskrcnn_r50_fpn_v2; a file of the other generation than the case is refused), short side
800 / long side <= 1333, with the weights assigned by torchvision_mapping (BatchNorm epsilon: the
preset's, 0 for v1, 1e-5 for v2; v2's backbone BN folded into the convs, its FPN and head BN in
inference mode); the timed call is export.ServingModule.serve_tensor on the uint8
image: preprocessing (normalise, resize at scale 1, pad to the canvas), the network, back-mapping and
masks pasted at the image size, the work torchvision's model(images) does. The preset's canvas is
1344 x 1344 (either orientation at full scale); --canvas=832x1344 gives the landscape canvas torchvision
pads this image to (800 x 1344 rounded up to our multiple of 64); --orientation_canvases keeps the
preset's canvas and turns model.orientation_canvases on (this photo then runs on 832 x 1344). The JSON
holds the preset used ("config"), the architecture, the canvases, the number of detections and the import
time (reading the .pth and assigning the weights, not timed in `value`).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402

SIDE = "ours"
HEIGHT, WIDTH = 800, 1333
# case -> the torchvision generation (torchvision_mapping.V1 / V2) its shared file must hold.
ARCHITECTURES = {"infer_800": "v1", "infer_800_v2": "v2"}


def parse_args():
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="the shared torchvision state dict (.pth)")
    # Smaller settings only to check the script quickly; the case is 800 x 1333, short side 800, long <= 1333.
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--short_side", type=int, default=800)
    parser.add_argument("--max_long_side", type=int, default=1333)
    parser.add_argument("--canvas", default=None, help="HxW model canvas (default: the preset's)")
    parser.add_argument("--orientation_canvases", action="store_true", help="model.orientation_canvases on")
    args = parser.parse_args()
    if args.case not in ARCHITECTURES:
        parser.error(f"--case must be one of {', '.join(ARCHITECTURES)}")
    args.repeats = args.repeats or 5
    return args


def main():
    harness.claim_stdout()
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from maskrcnn_tf import host_allocator

    allocator = host_allocator.configure()  # before TF allocates, as every program of ours does
    import keras
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    from maskrcnn_tf.export import ServingModule
    from maskrcnn_tf.model import build_model
    from maskrcnn_tf.weights import importer, layout, torch_pickle, torchvision_mapping

    overrides = {"model.resize_short_side": args.short_side, "model.resize_max_long_side": args.max_long_side,
                 "model.orientation_canvases": args.orientation_canvases}
    if args.canvas:
        overrides["model.image_size"] = tuple(int(v) for v in args.canvas.lower().split("x"))
    start = time.perf_counter()
    state_dict = torch_pickle.load_state_dict(args.weights)
    architecture = torchvision_mapping.architecture(state_dict)
    if architecture != ARCHITECTURES[args.case]:
        builder = torchvision_mapping.builder_of(state_dict)
        raise SystemExit(f"{args.weights}: a torchvision {architecture} file ({builder}); --case={args.case} needs "
                         f"{ARCHITECTURES[args.case]}")
    preset = torchvision_mapping.preset_for(state_dict)
    cfg = importer.import_config("torchvision", torchvision_mapping.has_mask_head(state_dict), overrides,
                                 preset=preset)
    source = importer.SOURCES["torchvision"]
    source.check_architecture(state_dict, cfg, preset)
    values, sources = source.variables(state_dict, cfg)
    model = build_model(cfg)
    layout.assign(model, values, sources, torchvision_mapping.REQUIRED_PREFIXES)
    import_s = time.perf_counter() - start
    serving = ServingModule(model, cfg)
    rgb = harness.smooth_noise_image(np, max(args.height, args.width))[:args.height, :args.width]
    # [800, 1333, 3] uint8 by default, the same image as the torchvision side
    images = tf.constant(np.ascontiguousarray(rgb)[None])

    def run():
        outputs = serving.serve_tensor(images)
        return int(outputs["num_detections"].numpy()[0]), list(outputs["detection_masks_pasted"].shape)

    first, runs, (num_detections, mask_shape) = harness.time_calls(run, args.repeats)
    harness.emit(harness.record(
        args.case, SIDE, "seconds", runs, first,
        versions={"tensorflow": tf.__version__, "keras": keras.__version__},
        image_hw=[args.height, args.width], short_side=args.short_side, max_long_side=args.max_long_side,
        batch_size=1, canvas=list(cfg.model.image_size), orientation_canvases=list(model.inference_canvases),
        intra_threads=args.threads,
        config=preset, architecture=architecture,
        norms={"backbone": cfg.model.backbone.norm, "fpn": cfg.model.fpn_norm, "box_head": cfg.model.heads.box_norm,
               "mask_head": cfg.model.heads.mask_norm, "backbone_epsilon": cfg.model.backbone.norm_epsilon},
        bn_mode="eval (moving statistics; backbone BN frozen, folded into the convs)", import_s=round(import_s, 2),
        num_detections=num_detections,
        mask_output_shape=mask_shape, host_allocator=allocator))


if __name__ == "__main__":
    main()
