"""Case `pipeline`, our side: training input images/s of pipeline.build_dataset on real COCO records.

  python benchmarks/cases/ours_pipeline.py --case=pipeline [--image_size=1024] [--batch_size=2]
      [--warmup=5] [--batches=40] [--repeats=1] [--records=GLOB] [--variants=preset,scale_jitter,no_masks]
      [--rebuild_records]

Records: our converter's output for the 160 real coco_tiny images (_coco_bench.ensure_records, shared
with modelgarden_pipeline.py). Config: the coco_r50_fpn_1x preset with the records' label map (as
train.py applies it), image_size x image_size, batch --batch_size, masks on, training=True (flip 0.5,
shuffle, AUTOTUNE everywhere). After --warmup batches (first_s: dataset build + warm-up), each repeat
times --batches batches; value = median images/s. Variant `scale_jitter` adds data.scale_jitter
(0.8, 1.25), the augmentation Model Garden's maskrcnn_resnetfpn_coco parser applies; `no_masks` (not
run by default) turns model.include_mask off. Every variant run is reported as a field
images_per_s_<variant>; the first one listed gives value/runs. peak_rss_mb is this process's peak
over all variants.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _coco_bench  # noqa: E402
import _harness  # noqa: E402

SIDE = "ours"
SCALE_JITTER = (0.8, 1.25)  # Model Garden's maskrcnn_resnetfpn_coco: aug_scale_min / aug_scale_max


def measure(pattern: str, cfg, warmup: int, batches: int, repeats: int):
    """-> (first_s, [images/s per repeat])."""
    from maskrcnn_tf.data import pipeline

    start = time.perf_counter()
    iterator = iter(pipeline.build_dataset(pattern, cfg, training=True))
    for _ in range(warmup):  # tracing, thread start-up, AUTOTUNE's first decisions
        next(iterator)
    first = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        batch["images"].numpy()  # the last batch is really there
        rates.append(batches * cfg.data.train_batch_size / (time.perf_counter() - start))
        _harness.log(f"{rates[-1]:.2f} images/s")
    return first, rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=["pipeline"])
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="batches before timing")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--records", default=None, help="TFRecord glob (default: built from coco_tiny)")
    parser.add_argument("--rebuild_records", action="store_true")
    parser.add_argument("--variants", default="preset,scale_jitter")
    args, _ = parser.parse_known_args()
    _harness.claim_stdout()
    pattern = args.records or _coco_bench.ensure_records(sys.executable, args.rebuild_records)
    label_map = os.path.join(os.path.dirname(pattern), "train_label_map.json")

    from maskrcnn_tf import host_allocator

    host_allocator.configure()  # before TF allocates, as every program of ours does
    import tensorflow as tf

    from maskrcnn_tf import config as config_lib
    from maskrcnn_tf import presets
    from maskrcnn_tf.data import label_map as label_map_lib, pipeline

    category_ids, class_names = label_map_lib.load_label_map(label_map)
    cfg = config_lib.replace(presets.coco_r50_fpn_1x(), **{
        "model.image_size": (args.image_size, args.image_size), "model.num_classes": len(category_ids),
        "data.category_ids": category_ids, "data.class_names": class_names,
        "data.train_batch_size": args.batch_size})
    variants = {"preset": cfg, "scale_jitter": config_lib.replace(cfg, **{"data.scale_jitter": SCALE_JITTER}),
                "no_masks": config_lib.replace(cfg, **{"model.include_mask": False})}
    results = {}
    for name in args.variants.split(","):
        results[name] = measure(pattern, variants[name], args.warmup, args.batches, args.repeats)
    main_name = args.variants.split(",")[0]
    first, rates = results[main_name]
    extra = {f"images_per_s_{name}": round(statistics.median(r), 3) for name, (_, r) in results.items()}
    _harness.emit(_harness.record(
        "pipeline", SIDE, "images_per_s", rates, first,
        {"tensorflow": tf.__version__, **_coco_bench.versions("numpy")},
        variant=main_name, image_size=args.image_size, batch_size=args.batch_size, warmup=args.warmup,
        batches=args.batches, masks=True, records=pattern, num_records=pipeline.count_records(pattern),
        **extra))


if __name__ == "__main__":
    main()
