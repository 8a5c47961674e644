"""Case `convert`, Model Garden's side: official/vision/data/create_coco_tf_record.py on the same images.

  /work/peer_mg/bin/python benchmarks/cases/modelgarden_convert.py --case=convert [--copies=5]
      [--growth=4] [--repeats=1] [--workdir=DIR]

Runs Model Garden's converter as a module in a child process (`python -m
official.vision.data.create_coco_tf_record --include_masks --num_processes=0 --num_shards=8`: one
process, masks PNG-encoded, the examples streamed to the shards) on the same tiled coco_tiny JSONs as
ours_convert.py (_coco_bench.tiled_coco), at the small and the large size. Conversion time is the span
between its "writing to output path" and "Finished writing" log lines (JSON loading included, start-up
excluded, as for ours). One JSON line with the same fields as ours_convert.py. Its default
--num_processes (a multiprocessing Pool over all cores) collects every example in memory before
writing (Pool.starmap), so the one-process mode is the one whose memory can stay flat.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _coco_bench  # noqa: E402
import _harness  # noqa: E402

SIDE = "modelgarden"
NUM_SHARDS = 8


def convert(coco: dict, out_dir: str) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    result = _coco_bench.run_child([
        sys.executable, "-m", "official.vision.data.create_coco_tf_record", "--logtostderr",
        f"--image_dir={coco['image_dir']}", f"--object_annotations_file={coco['annotation_file']}",
        f"--output_file_prefix={os.path.join(out_dir, 'train')}", f"--num_shards={NUM_SHARDS}",
        "--include_masks", "--num_processes=0"])
    _coco_bench.check_ok(result, "create_coco_tf_record")
    seconds = _coco_bench.mg_log_span_s(result["stderr"], "writing to output path", "Finished writing")
    shards = [f for f in os.listdir(out_dir) if f.endswith(".tfrecord")]
    assert len(shards) == NUM_SHARDS, shards
    shutil.rmtree(out_dir, ignore_errors=True)
    run = {"workers": 1, "images": coco["images"], "convert_s": round(seconds, 3),
           "images_per_s": round(coco["images"] / seconds, 2), "wall_s": result["wall_s"],
           "peak_rss_mb": result["peak_rss_mb"], "peak_tree_rss_mb": result["peak_tree_rss_mb"],
           "load_avg_1m": _harness.load_avg_1m()}
    _harness.log(json.dumps(run))
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=["convert"])
    parser.add_argument("--copies", type=int, default=5, help="small set: coco_tiny's 160 images x copies")
    parser.add_argument("--growth", type=int, default=4, help="large set = small x growth")
    parser.add_argument("--repeats", type=int, default=1, help="runs at the large size")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    args, _ = parser.parse_known_args()  # ours-only flags (--workers) are ignored
    _harness.claim_stdout()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mg_convert_")
    try:
        small = _coco_bench.tiled_coco(workdir, args.copies)
        large = _coco_bench.tiled_coco(workdir, args.copies * args.growth)
        out_dir = os.path.join(workdir, "out")
        small_run = convert(small, out_dir)
        large_runs = [convert(large, out_dir) for _ in range(max(1, args.repeats))]
        versions = _coco_bench.versions("tf-models-official", "tensorflow", "numpy", "pycocotools", "pillow")
        _harness.emit(_coco_bench.convert_record(SIDE, small, large, small_run, large_runs, versions, NUM_SHARDS))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
