"""COCO -> TFRecord converter: faithful records on real COCO data, determinism, bad input, atomicity.

COCO data: ../shared/data's coco_val2017_10 in the development workspace, else its generated stand-in
(tests/conftest.py coco_sample: shapes images, polygons and one crowd region as uncompressed RLE)."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO

from maskrcnn_tf.data import coco_categories, coco_converter, schema, shapes, sharded_writer
from tests.conftest import REPO_ROOT, shared_data



def read_records(output_prefix):
    """All records of a conversion as numpy dicts (schema.parse_example), keyed by source id."""
    records = {}
    for path in sorted(glob.glob(output_prefix + "-*-of-*.tfrecord")):
        for serialized in tf.data.TFRecordDataset(path):
            parsed = {k: v.numpy() for k, v in schema.parse_example(serialized).items()}
            records[int(parsed["source_id"])] = parsed
    return records


def serialized_set(output_prefix):
    return {r.numpy() for p in glob.glob(output_prefix + "-*.tfrecord") for r in tf.data.TFRecordDataset(p)}


@pytest.fixture(scope="module")
def coco10(coco_sample, tmp_path_factory):
    sample = coco_sample("coco_val2017_10")
    prefix = str(tmp_path_factory.mktemp("coco10") / "val")
    summary = coco_converter.convert_coco(str(sample.image_dir), str(sample.annotation_file), prefix, num_shards=3,
                                          num_workers=1, progress=False)
    return sample, prefix, summary


def test_records_match_coco_json_and_pycocotools(coco10):
    sample, prefix, summary = coco10
    coco = COCO(str(sample.annotation_file))
    records = read_records(prefix)
    all_anns = coco.loadAnns(coco.getAnnIds(iscrowd=None))
    counts = (len(coco.getImgIds()), len(all_anns), sum(a["iscrowd"] for a in all_anns))
    if sample.real:  # README of ../shared/data: 10 images, 77 instances of which 1 crowd, 80 categories listed.
        assert counts == (10, 77, 1) and len(coco.dataset["categories"]) == 80
    assert sorted(records) == sorted(coco.getImgIds())
    assert (summary["images_written"], summary["instances_written"], summary["crowd_instances"]) == counts
    assert summary["images_skipped"] == {} and summary["instances_dropped"] == {}
    assert all(os.path.exists(p) for p in sharded_writer.shard_paths(prefix, 3))
    num_crowd_checked = 0
    for image_id, rec in records.items():
        info = coco.loadImgs(image_id)[0]
        with open(sample.image_dir / info["file_name"], "rb") as f:
            assert rec["encoded"] == f.read(), "image bytes must be copied unchanged"
        assert (rec["height"], rec["width"], rec["format"]) == (info["height"], info["width"], b"jpeg")
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
        assert len(rec["labels"]) == len(anns) == len(rec["png_masks"])
        assert rec["labels"].tolist() == [a["category_id"] for a in anns]
        assert rec["is_crowd"].tolist() == [a["iscrowd"] for a in anns]
        h, w = info["height"], info["width"]
        for k, ann in enumerate(anns):
            x, y, bw, bh = ann["bbox"]
            expected = np.array([y / h, x / w, (y + bh) / h, (x + bw) / w])  # parse_example: [ymin, xmin, ...]
            np.testing.assert_allclose(rec["boxes_norm"][k], expected, atol=1e-4)
            mask = cv2.imdecode(np.frombuffer(rec["png_masks"][k], np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(mask, coco.annToMask(ann))
            num_crowd_checked += ann["iscrowd"]
    assert num_crowd_checked == 1, "the crowd instance (uncompressed RLE) is decoded too"
    label_map = json.load(open(prefix + "_label_map.json"))
    assert [c["id"] for c in label_map] == sorted(c["id"] for c in coco.dataset["categories"])
    assert [c["contiguous_id"] for c in label_map] == list(range(1, len(coco.dataset["categories"]) + 1))


def test_one_and_two_workers_write_the_same_examples(coco10, tmp_path):
    sample, prefix, summary = coco10
    prefix2 = str(tmp_path / "val")
    coco_converter.convert_coco(str(sample.image_dir), str(sample.annotation_file), prefix2, num_shards=3,
                                num_workers=2, progress=False)
    assert len(serialized_set(prefix2)) == summary["images_written"] >= 3
    assert serialized_set(prefix2) == serialized_set(prefix)
    # Deterministic assignment: shard i holds the same images whatever the worker count.
    for a, b in zip(sharded_writer.shard_paths(prefix, 3), sharded_writer.shard_paths(prefix2, 3)):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_planted_bad_input_is_counted_and_good_records_written(coco_sample, tmp_path):
    sample = coco_sample("coco_val2017_10")
    data = json.load(open(sample.annotation_file))
    image_dir = tmp_path / "images"
    shutil.copytree(sample.image_dir, image_dir)
    images = data["images"]
    corrupt, missing = images[0], images[1]
    full = (image_dir / corrupt["file_name"]).read_bytes()
    (image_dir / corrupt["file_name"]).write_bytes(full[:len(full) // 2])  # a truncated download
    os.remove(image_dir / missing["file_name"])
    bad_ids = {corrupt["id"], missing["id"]}
    good_image = next(im for im in images if im["id"] not in bad_ids)
    good_anns = [a for a in data["annotations"] if a["image_id"] not in bad_ids]
    base = dict(image_id=good_image["id"], category_id=1, iscrowd=0, area=100.0)
    planted = [
        dict(base, id=-1, bbox=[10, 10, -5, 20], segmentation=[[10, 10, 20, 10, 20, 30]]),  # negative width
        dict(base, id=-2, bbox=[10, 10, 20, 20], segmentation=[[10, 10, 30, 30]]),  # 2-point polygon
        dict(base, id=-3, bbox=[10, 10, 20, 20], segmentation=[[10, 10, 30, 10, 30, 30]], image_id=-99),
        dict(base, id=-4, bbox=[10, 10, 20, 20], segmentation=[[10, 10, 30, 10, 30, 30]], category_id=999),
        # Partly outside on the right: kept, its box clipped to the image width.
        dict(base, id=-5, bbox=[good_image["width"] - 10, 10, 40, 20],
             segmentation=[[good_image["width"] - 10, 10, good_image["width"] - 1, 10,
                            good_image["width"] - 1, 30]]),
    ]
    data["annotations"] = data["annotations"] + planted
    del data["info"], data["licenses"]  # JSON without info/licenses keys is fine
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(json.dumps(data))
    prefix = str(tmp_path / "out" / "bad")
    summary = coco_converter.convert_coco(str(image_dir), str(ann_file), prefix, num_shards=2, num_workers=2,
                                          progress=False)
    assert summary["images_skipped"] == {"undecodable_image": 1, "missing_image_file": 1}
    assert summary["instances_dropped"] == {"degenerate_box": 1, "empty_or_broken_polygon": 1,
                                            "unknown_image": 1, "unknown_category": 1}
    assert summary["boxes_clipped"] == 1
    records = read_records(prefix)
    assert sorted(records) == sorted(im["id"] for im in images if im["id"] not in bad_ids)
    assert summary["images_written"] == len(images) - 2
    assert summary["instances_written"] == len(good_anns) + 1 == sum(len(r["labels"]) for r in records.values())
    clipped = records[good_image["id"]]["boxes_norm"][-1]
    np.testing.assert_allclose(clipped[3], 1.0)  # xmax clipped to the image width
    assert any("annotation -1" in m for m in summary["examples"]["instances_dropped:degenerate_box"])


def test_unreadable_annotation_file_stops_with_a_clear_message(tmp_path):
    with pytest.raises(coco_converter.ConversionError, match="annotation file not found"):
        coco_converter.convert_coco(str(tmp_path), str(tmp_path / "nope.json"), str(tmp_path / "o"), 1)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(coco_converter.ConversionError, match="cannot read annotation file"):
        coco_converter.convert_coco(str(tmp_path), str(broken), str(tmp_path / "o"), 1)
    assert not glob.glob(str(tmp_path / "o*"))
    # The CLI turns it into a one-line message and exit status 1 (absl app: SystemExit, no traceback).
    from maskrcnn_tf.programs import coco_to_tfrecord as cli

    cli.FLAGS(["coco_to_tfrecord", f"--image_dir={tmp_path}", f"--annotation_file={broken}",
               f"--output_prefix={tmp_path / 'o'}"])
    try:
        with pytest.raises(SystemExit, match="^error: cannot read annotation file"):
            cli.app_main([])
    finally:
        cli.FLAGS.unparse_flags()


def test_roboflow_unused_parent_category_is_left_out():
    root = shared_data("potholes", "the Roboflow export's unused parent category")
    data = json.load(open(root / "valid" / "_annotations.coco.json"))
    # README: id 0 "pothole" is an unused parent (supercategory of id 1); id 1 is the real class.
    assert coco_categories.build_label_map(data["categories"], data["annotations"]) == [
        {"id": 1, "contiguous_id": 1, "name": "pothole"}]
    # The same category used by an annotation stays: only unused parents go.
    used = data["annotations"] + [{"image_id": 0, "category_id": 0}]
    assert [c["id"] for c in coco_categories.build_label_map(data["categories"], used)] == [0, 1]


def test_killed_conversion_leaves_no_final_names(tmp_path):
    paths = shapes.make_shapes_dataset(str(tmp_path / "shapes"), num_train=40, num_val=0, image_size=48, seed=0)
    prefix = str(tmp_path / "out" / "train")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(  # 0.2 s per image read (tests/data/slow_conversion.py)
        [sys.executable, str(REPO_ROOT / "tests" / "data" / "slow_conversion.py"), "0.2",
         f"--image_dir={paths['train_images']}",
         f"--annotation_file={paths['train_annotations']}", f"--output_prefix={prefix}", "--num_shards=4",
         "--num_workers=2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # the child imports TensorFlow first; the machine may be busy
        while not glob.glob(prefix + "*.tmp-*"):
            assert proc.poll() is None and time.monotonic() < deadline, "conversion never started writing"
            time.sleep(0.02)
        # 40 images x 0.2 s over 2 workers: about 4 s of writing left when the first tmp file appears.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Orphaned workers notice their parent is gone and stop after their current image.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        written = os.listdir(tmp_path / "out")
        assert written and all(".tmp-" in name for name in written), written
        assert not glob.glob(prefix + "-*-of-*.tfrecord") and not glob.glob(prefix + "_*.json")
        # The next run over the same prefix deletes the dead run's *.tmp-<pid> files and writes everything.
        rerun = subprocess.run(
            [sys.executable, str(REPO_ROOT / "data_prep" / "coco_to_tfrecord.py"),
             f"--image_dir={paths['train_images']}",
             f"--annotation_file={paths['train_annotations']}", f"--output_prefix={prefix}", "--num_shards=4"],
            env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert f"removed {len(written)} unfinished file(s) of an interrupted conversion" in rerun.stderr
        assert sorted(os.listdir(tmp_path / "out")) == sorted(
            [os.path.basename(p) for p in sharded_writer.shard_paths(prefix, 4)] + ["train_label_map.json",
                                                                                  "train_summary.json"])
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group, should anything be left
        except ProcessLookupError:
            pass


def test_rle_segmentations_are_checked_and_annotation_order_does_not_matter(coco_sample, tmp_path):
    # Annotations in reverse file order (no longer grouped by image), plus planted RLEs: a valid compressed
    # string and an uncompressed list (kept, masks equal pycocotools' decode), and three whose run lengths
    # do not cover the image or are not integers (dropped as malformed_rle; pycocotools would decode them
    # past its buffer).
    from pycocotools import mask as mask_utils

    sample = coco_sample("coco_val2017_10")
    data = json.load(open(sample.annotation_file))
    num_annotations = len(data["annotations"])
    image = data["images"][0]
    h, w = image["height"], image["width"]
    block = np.zeros((h, w), np.uint8)
    block[10:40, 20:90] = 1
    compressed = mask_utils.encode(np.asfortranarray(block))
    compressed["counts"] = compressed["counts"].decode("ascii")
    # Column-major runs of the same block: 20 columns and 10 rows of 0s, then 70 x (30 1s, h - 30 0s).
    uncompressed = [h * 20 + 10] + [30, h - 30] * 69 + [30, h * w - (h * 20 + 10) - 70 * 30 - 69 * (h - 30)]
    base = dict(image_id=image["id"], category_id=1, iscrowd=0, area=2100.0, bbox=[20, 10, 70, 30])
    planted = [
        dict(base, id=-1, segmentation=compressed),
        dict(base, id=-2, iscrowd=1, segmentation={"size": [h, w], "counts": uncompressed}),
        dict(base, id=-3, segmentation={"size": [h, w], "counts": uncompressed[:-1]}),  # short by a run
        dict(base, id=-4, segmentation={"size": [h, w], "counts": [float(c) for c in uncompressed]}),
        dict(base, id=-5, segmentation={"size": [h, w], "counts": compressed["counts"] + "1"}),
    ]
    data["annotations"] = planted + data["annotations"][::-1]
    ann_file = tmp_path / "rle.json"
    ann_file.write_text(json.dumps(data))
    prefix = str(tmp_path / "out" / "rle")
    summary = coco_converter.convert_coco(str(sample.image_dir), str(ann_file), prefix, num_shards=3,
                                          progress=False)
    assert summary["instances_dropped"] == {"malformed_rle": 3}
    assert summary["instances_written"] == num_annotations + 2
    records = read_records(prefix)
    for image_id, rec in records.items():
        anns = [a for a in data["annotations"] if a["image_id"] == image_id and a["id"] not in (-3, -4, -5)]
        assert rec["labels"].tolist() == [a["category_id"] for a in anns]  # file order within the image
    first = records[image["id"]]
    for k in (0, 1):  # the two valid planted RLEs come first in the file
        decoded = cv2.imdecode(np.frombuffer(first["png_masks"][k], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(decoded, block)
    assert first["is_crowd"][:2].tolist() == [0, 1]


def test_max_images_cut_is_not_an_unknown_image(coco10, tmp_path):
    sample, _, _ = coco10
    prefix = str(tmp_path / "cut")
    summary = coco_converter.convert_coco(str(sample.image_dir), str(sample.annotation_file), prefix, num_shards=1,
                                          max_images=3, progress=False)
    assert summary["images_written"] == 3 and summary["instances_dropped"] == {}
    first_three = [im["id"] for im in json.load(open(sample.annotation_file))["images"][:3]]
    assert sorted(read_records(prefix)) == sorted(first_three)
