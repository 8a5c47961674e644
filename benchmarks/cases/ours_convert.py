"""Case `convert`, our side: COCO -> TFRecord images/s per worker and peak RSS at two dataset sizes.

  python benchmarks/cases/ours_convert.py --case=convert [--copies=5] [--growth=4] [--workers=1,2]
      [--repeats=1] [--workdir=DIR]

Converts the real coco_tiny images (160, masks on) listed `copies` and `copies * growth` times
(_coco_bench.tiled_coco) with data_prep/coco_to_tfrecord.py in a child process, 8 shards, 1 worker at
both sizes and the other --workers counts at the large size. One JSON line (_harness interface):
value = images/s of 1 worker on the large set (conversion time as the tool reports it, median of
--repeats), peak_rss_mb = the child's peak at the large size with 1 worker; per-size figures as fields
(rss_growth_mb = large - small shows whether memory follows the dataset).
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

SIDE = "ours"
NUM_SHARDS = 8


def convert(coco: dict, out_dir: str, workers: int) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    result = _coco_bench.run_child([
        sys.executable, os.path.join(_coco_bench.REPO_ROOT, "data_prep", "coco_to_tfrecord.py"),
        f"--image_dir={coco['image_dir']}", f"--annotation_file={coco['annotation_file']}",
        f"--output_prefix={os.path.join(out_dir, 'train')}", f"--num_shards={NUM_SHARDS}",
        f"--num_workers={workers}", "--include_masks"])
    _coco_bench.check_ok(result, "coco_to_tfrecord.py")
    summary = json.loads(result["stdout"])
    assert summary["include_masks"] and summary["images_written"] == coco["images"], summary
    shutil.rmtree(out_dir, ignore_errors=True)
    run = {"workers": workers, "images": summary["images_written"], "instances": summary["instances_written"],
           "convert_s": summary["seconds"], "images_per_s": round(summary["images_written"] / summary["seconds"], 2),
           "wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"],
           "peak_tree_rss_mb": result["peak_tree_rss_mb"], "load_avg_1m": _harness.load_avg_1m()}
    _harness.log(json.dumps(run))
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=["convert"])
    parser.add_argument("--copies", type=int, default=5, help="small set: coco_tiny's 160 images x copies")
    parser.add_argument("--growth", type=int, default=4, help="large set = small x growth")
    parser.add_argument("--workers", default="1,2", help="worker counts at the large size (1 is always run)")
    parser.add_argument("--repeats", type=int, default=1, help="1-worker runs at the large size")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    args, _ = parser.parse_known_args()
    _harness.claim_stdout()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ours_convert_")
    try:
        small = _coco_bench.tiled_coco(workdir, args.copies)
        large = _coco_bench.tiled_coco(workdir, args.copies * args.growth)
        out_dir = os.path.join(workdir, "out")
        small_run = convert(small, out_dir, 1)
        large_runs = [convert(large, out_dir, 1) for _ in range(max(1, args.repeats))]
        more = {w: convert(large, out_dir, w) for w in sorted({int(w) for w in args.workers.split(",")} - {1})}
        versions = _coco_bench.versions("tensorflow", "numpy", "pycocotools", "opencv-python-headless")
        _harness.emit(_coco_bench.convert_record(
            SIDE, small, large, small_run, large_runs, versions, NUM_SHARDS,
            **{f"images_per_s_{w}workers": r["images_per_s"] for w, r in more.items()},
            **{f"peak_tree_rss_mb_{w}workers": r["peak_tree_rss_mb"] for w, r in more.items()}))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
