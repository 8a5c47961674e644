"""Shared inputs and measurements of the data cases (ours/modelgarden _convert.py and _pipeline.py).

Standard library only (every side's venv imports it). Decisions:
- Real images: the 80 + 80 COCO 2017 images of ../shared/data/coco_tiny (train and val; 9.5 instances
  per image, crowd regions as uncompressed RLE). `tiled_coco(workdir, copies)` writes one instances
  JSON listing every image `copies` times under new image/annotation ids (same file, same annotations)
  and a folder of symlinks to the 160 files, so both converters read the same bytes and a dataset of
  any size is made without copying images. Annotations keep COCO's order (all images' annotations in
  one list, not grouped by image), as in the real files.
- A converter runs as a child process with its own CLI. Its conversion time is what the tool itself
  reports (ours: the summary's "seconds"; Model Garden: from its "writing to output path" log line to
  "Finished writing"): both spans include reading the JSON and exclude interpreter/TensorFlow start-up,
  which would otherwise dominate small runs. Wall time is reported too.
- Peak RSS of a child: the largest VmHWM (the kernel's high-water mark of resident memory) of any
  process of its tree, read from /proc every POLL_S while it runs. Not ru_maxrss: Linux carries
  ru_maxrss over exec from the parent, so a child would report at least this driver's own peak (it
  holds the tiled JSON). With worker processes, `peak_tree_rss_mb` is the largest sampled sum of VmRSS
  over the tree (pages shared copy-on-write after fork count once per process, so the sum overstates).
- Pipeline records: our converter's output for the 160 images (8 shards), built once into
  RECORDS_CACHE by `ensure_records` and reused by both sides, so they read the same files.
"""

import datetime
import json
import os
import re
import subprocess
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
COCO_TINY = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "coco_tiny")
SPLITS = ("train2017", "val2017")
# New ids: copy c of image i gets i + c * ID_STRIDE (COCO ids are < 10^6; annotation ids < 10^7).
IMAGE_ID_STRIDE = 10**7
ANNOTATION_ID_STRIDE = 10**8
RECORDS_CACHE = os.path.join(tempfile.gettempdir(), "maskrcnn_tf_bench_data", "coco_tiny_records")
RECORD_SHARDS = 8
POLL_S = 0.05
_MG_LOG_TIME = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d)\.(\d{6}) ")


def tiled_coco(workdir: str, copies: int, coco_dir: str = COCO_TINY) -> dict:
    """Writes workdir/images (symlinks) and workdir/instances_x<copies>.json; returns paths and counts."""
    image_dir = os.path.join(workdir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations, categories = [], [], None
    for split in SPLITS:
        with open(os.path.join(coco_dir, "annotations", f"instances_{split}.json")) as f:
            data = json.load(f)
        categories = data["categories"]
        for entry in data["images"]:
            link = os.path.join(image_dir, entry["file_name"])
            if not os.path.lexists(link):
                os.symlink(os.path.join(coco_dir, split, entry["file_name"]), link)
        images += data["images"]
        annotations += data["annotations"]
    tiled_images = [dict(e, id=e["id"] + c * IMAGE_ID_STRIDE) for c in range(copies) for e in images]
    tiled_annotations = [dict(a, id=a["id"] + c * ANNOTATION_ID_STRIDE,
                              image_id=a["image_id"] + c * IMAGE_ID_STRIDE)
                         for c in range(copies) for a in annotations]
    path = os.path.join(workdir, f"instances_x{copies}.json")
    with open(path, "w") as f:
        json.dump({"images": tiled_images, "annotations": tiled_annotations, "categories": categories}, f)
    return {"image_dir": image_dir, "annotation_file": path, "images": len(tiled_images),
            "instances": len(tiled_annotations), "json_mb": round(os.path.getsize(path) / 2**20, 1)}


def _tree_memory_kb(pid: int):
    """(sum of VmRSS, largest VmHWM) over pid and its descendants; (0, 0) once gone."""
    total, high, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        high = max(high, int(line.split()[1]))
                    elif line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total, high


def run_child(cmd, env=None) -> dict:
    """Runs cmd to completion -> {returncode, wall_s, peak_rss_mb, peak_tree_rss_mb, stdout, stderr}."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO_ROOT)
        peaks = [0, 0]  # tree RSS sum, largest single-process high-water mark (KiB)
        done = threading.Event()

        def poll():
            while not done.is_set():
                total, high = _tree_memory_kb(proc.pid)
                peaks[0], peaks[1] = max(peaks[0], total), max(peaks[1], high)
                done.wait(POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        proc.wait()
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        out.seek(0)
        err.seek(0)
        return {"returncode": proc.returncode, "wall_s": round(wall, 3), "peak_rss_mb": round(peaks[1] / 1024.0, 1),
                "peak_tree_rss_mb": round(peaks[0] / 1024.0, 1), "stdout": out.read(), "stderr": err.read()}


def check_ok(result: dict, what: str) -> None:
    if result["returncode"] != 0:
        tail = "\n".join(result["stderr"].splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {result['returncode']}):\n{tail}")


def mg_log_span_s(stderr: str, first: str, last: str) -> float:
    """Seconds between the absl log lines containing `first` and `last` (time of day, midnight-safe)."""
    times = {}
    for line in stderr.splitlines():
        for key in (first, last):
            match = _MG_LOG_TIME.match(line)
            if key in line and match and key not in times:
                h, m, s, us = (int(g) for g in match.groups())
                times[key] = datetime.timedelta(hours=h, minutes=m, seconds=s, microseconds=us).total_seconds()
    if first not in times or last not in times:
        raise RuntimeError(f"log lines {first!r} / {last!r} not found in the converter's stderr")
    return (times[last] - times[first]) % 86400.0


def ensure_records(ours_python: str, rebuild: bool = False) -> str:
    """Our converter's records of the 160 coco_tiny images in RECORDS_CACHE; returns their glob."""
    pattern = os.path.join(RECORDS_CACHE, "train-*-of-*.tfrecord")
    done_marker = os.path.join(RECORDS_CACHE, "train_summary.json")
    if rebuild or not os.path.exists(done_marker):
        os.makedirs(RECORDS_CACHE, exist_ok=True)
        coco = tiled_coco(os.path.join(RECORDS_CACHE, "input"), 1)
        result = run_child([ours_python, os.path.join(REPO_ROOT, "data_prep", "coco_to_tfrecord.py"),
                            f"--image_dir={coco['image_dir']}", f"--annotation_file={coco['annotation_file']}",
                            f"--output_prefix={os.path.join(RECORDS_CACHE, 'train')}",
                            f"--num_shards={RECORD_SHARDS}", "--num_workers=2"])
        check_ok(result, "writing the pipeline records with our converter")
    return pattern


def versions(*packages: str) -> dict:
    """Installed versions (importlib.metadata: no import of the packages themselves)."""
    from importlib import metadata

    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def convert_record(side: str, small: dict, large: dict, small_run: dict, large_runs: list, versions: dict,
                   num_shards: int, **extra) -> dict:
    """The `convert` case's JSON record of either side: images/s at the large size (median over runs),
    memory at both sizes (the converter's own peak, not this driver's) and the growth between them."""
    import statistics

    import _harness

    peak_large = max(r["peak_rss_mb"] for r in large_runs)
    record = _harness.record(
        "convert", side, "images_per_s", [r["images_per_s"] for r in large_runs], None, versions,
        images=large["images"], instances=large["instances"], json_mb=large["json_mb"],
        images_small=small["images"], json_mb_small=small["json_mb"],
        images_per_s_small=small_run["images_per_s"],
        wall_s=statistics.median(r["wall_s"] for r in large_runs),
        peak_rss_mb_small=small_run["peak_rss_mb"], peak_rss_mb_large=peak_large,
        rss_growth_mb=round(peak_large - small_run["peak_rss_mb"], 1),
        workers=1, num_shards=num_shards, masks=True, **extra)
    record["peak_rss_mb"] = peak_large  # the converter's, not this driver's
    return record
