"""Case `pipeline`, Model Garden's side: its Mask R-CNN training input on the same records.

  /work/peer_mg/bin/python benchmarks/cases/modelgarden_pipeline.py --case=pipeline [--image_size=1024]
      [--batch_size=2] [--warmup=5] [--batches=40] [--repeats=1] [--records=GLOB]
      [--ours_python=/work/venv/bin/python]

The dataset is what Model Garden's own training builds: the `maskrcnn_resnetfpn_coco` experiment config
(parser: hflip, scale 0.8-1.25, 100 instances, 112x112 mask crops, RPN targets; TfExampleDecoder with
include_mask) and `MaskRCNNTask.build_inputs(task.train_data)` (InputReader: AUTOTUNE maps, its
shuffle and interleave defaults). Changed from the config: input_path (the records our converter
wrote from coco_tiny, shared with ours_pipeline.py; built with --ours_python when missing), input
size image_size x image_size, global batch --batch_size, dtype float32 (the config's bfloat16 is a
TPU choice; ours yields float32). Timing as in ours_pipeline.py.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _coco_bench  # noqa: E402
import _harness  # noqa: E402

SIDE = "modelgarden"
EXPERIMENT = "maskrcnn_resnetfpn_coco"
DEFAULT_OURS_PYTHON = os.environ.get("OURS_PYTHON", "/work/venv/bin/python")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=["pipeline"])
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="batches before timing")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--records", default=None, help="TFRecord glob (default: built from coco_tiny)")
    parser.add_argument("--ours_python", default=DEFAULT_OURS_PYTHON, help="builds the records when missing")
    args, _ = parser.parse_known_args()  # ours-only flags (--variants, ...) are ignored
    _harness.claim_stdout()
    pattern = args.records or _coco_bench.ensure_records(args.ours_python)

    import tensorflow as tf
    from official.core import exp_factory
    from official.vision import registry_imports  # noqa: F401  (registers the experiment configs)
    from official.vision.tasks import maskrcnn

    config = exp_factory.get_exp_config(EXPERIMENT)
    config.task.model.input_size = [args.image_size, args.image_size, 3]
    data = config.task.train_data
    data.input_path = pattern
    data.global_batch_size = args.batch_size
    data.dtype = "float32"
    task = maskrcnn.MaskRCNNTask(config.task)

    start = time.perf_counter()
    iterator = iter(task.build_inputs(data))
    for _ in range(args.warmup):
        next(iterator)
    first = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.batches):
            images, labels = next(iterator)
        images.numpy()
        rates.append(args.batches * args.batch_size / (time.perf_counter() - start))
        _harness.log(f"{rates[-1]:.2f} images/s")
    assert "gt_masks" in labels and labels["gt_masks"].shape[-1] == config.task.train_data.parser.mask_crop_size
    _harness.emit(_harness.record(
        "pipeline", SIDE, "images_per_s", rates, first,
        {"tensorflow": tf.__version__, **_coco_bench.versions("tf-models-official", "numpy")},
        variant=EXPERIMENT, image_size=args.image_size, batch_size=args.batch_size, warmup=args.warmup,
        batches=args.batches, masks=True, records=pattern,
        aug_scale=[data.parser.aug_scale_min, data.parser.aug_scale_max], aug_rand_hflip=data.parser.aug_rand_hflip))


if __name__ == "__main__":
    main()
