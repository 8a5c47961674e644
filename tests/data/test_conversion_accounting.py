"""Converters say what they could not convert: annotations lost with skipped images (by reason), no image
written = an error naming the likely cause, many missing images = a loud warning, left-out categories,
repeated and spaced paths in the text format. Every test checks that the counts add up to the input.

COCO data: ../shared/data's samples in the development workspace, else their generated stand-ins
(tests/conftest.py coco_sample)."""
import collections
import glob
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from maskrcnn_tf.data import coco_converter, conversion_report, txt_converter
from tests.conftest import REPO_ROOT, STANDIN_ONE_CLASS_NAME

MISSING = 24  # as in the Roboflow export of the issue that lost 24 images' annotations silently
STANDIN_MISSING = 4  # of the 8 images of the stand-in (tests/conftest.py), still over the warning's share


def accounted(summary):
    """Every annotation of the file lands in exactly one of these."""
    return (summary["instances_written"] + sum(summary["instances_dropped"].values())
            + sum(summary["instances_lost_with_skipped_images"].values()) + summary["instances_beyond_max_images"])


def test_missing_images_lose_their_annotations_by_reason_with_a_loud_warning(coco_sample, tmp_path, capsys):
    sample = coco_sample("potholes")  # the Roboflow export, or a stand-in with its unused parent category
    root = sample.image_dir
    data = json.load(open(sample.annotation_file))
    num_missing = MISSING if sample.real else STANDIN_MISSING
    per_image = collections.Counter(a["image_id"] for a in data["annotations"])
    # Leave out the first 24 (stand-in: 4) images that have annotations; make one more an empty (0-byte) file.
    with_annotations = [im for im in data["images"] if per_image[im["id"]]]
    missing, empty = with_annotations[:num_missing], with_annotations[num_missing]
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for image in data["images"]:
        if image in missing:
            continue
        if image is empty:
            (image_dir / image["file_name"]).write_bytes(b"")
        else:
            os.symlink(root / image["file_name"], image_dir / image["file_name"])
    summary = coco_converter.convert_coco(str(image_dir), str(sample.annotation_file),
                                          str(tmp_path / "out" / "valid"), num_shards=2, include_masks=False,
                                          progress=False)
    lost_missing = sum(per_image[im["id"]] for im in missing)
    assert summary["images_skipped"] == {"missing_image_file": num_missing, "empty_image_file": 1}
    assert summary["instances_lost_with_skipped_images"] == {"missing_image_file": lost_missing,
                                                             "empty_image_file": per_image[empty["id"]]}
    assert summary["examples"]["images_skipped:empty_image_file"] == [f"{image_dir / empty['file_name']}: empty file"]
    assert summary["instances_in_annotation_file"] == len(data["annotations"]) == accounted(summary)
    assert summary["images_written"] == len(data["images"]) - num_missing - 1
    # The unused Roboflow parent category is left out, and the summary says so.
    parent = "pothole" if sample.real else STANDIN_ONE_CLASS_NAME
    assert summary["categories_left_out"] == [
        {"id": 0, "name": parent, "reason": "unused parent (supercategory) of category ids [1]"}]
    warning = capsys.readouterr().err
    assert f"WARNING: {num_missing} of {len(data['images'])} images" in warning
    assert f"their {lost_missing} annotations are lost" in warning
    shown = [line.split(": no such file")[0] for line in warning.split("; first: ")[1].split("; ")]
    assert len(shown) == 3 and set(shown) <= {str(image_dir / im["file_name"]) for im in missing}


def _coco_to_tfrecord(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO_ROOT / "data_prep" / "coco_to_tfrecord.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_every_image_missing_is_an_error_that_names_the_image_dir(coco_sample, tmp_path):
    # The case: coco_tiny's train JSON against the val image folder.
    train_json, val_dir = coco_sample("coco_tiny/train").annotation_file, coco_sample("coco_tiny/val").image_dir
    prefix = tmp_path / "out" / "train"
    proc = _coco_to_tfrecord(f"--image_dir={val_dir}", f"--annotation_file={train_json}",
                             f"--output_prefix={prefix}", "--num_shards=2", "--include_masks=false")
    first_file = json.load(open(train_json))["images"][0]["file_name"]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no image written: --image_dir points at {val_dir} but the annotation "
                           f"file lists files like '{first_file}'"), last
    # No shard or label map a training run could pick up; the summary stays for diagnosis, with every
    # annotation counted as lost with its missing image.
    assert not glob.glob(str(prefix) + "-*") and not os.path.exists(str(prefix) + "_label_map.json")
    summary = json.load(open(str(prefix) + "_summary.json"))
    assert summary["images_written"] == 0 and summary["shards"] == []
    assert summary["instances_lost_with_skipped_images"] == {
        "missing_image_file": summary["instances_in_annotation_file"]} and accounted(summary) > 0


def test_no_annotations_key_is_converted_with_a_warning(coco_sample, tmp_path, capsys):
    sample = coco_sample("coco_val2017_10")
    data = json.load(open(sample.annotation_file))
    num_images = len(data["images"])
    del data["annotations"]
    ann_file = tmp_path / "image_info.json"
    ann_file.write_text(json.dumps(data))
    summary = coco_converter.convert_coco(str(sample.image_dir), str(ann_file), str(tmp_path / "info"),
                                          num_shards=1, progress=False)
    assert (summary["images_written"], summary["instances_written"], summary["instances_in_annotation_file"]) \
        == (num_images, 0, 0)
    assert len(summary["warnings"]) == 1 and "no 'annotations' key" in summary["warnings"][0]
    assert "WARNING:" in capsys.readouterr().err
    # With --skip_empty nothing is left: an error, not an empty dataset.
    with pytest.raises(conversion_report.ConversionError, match=f"no image written: {num_images} of {num_images} "
                                                                "images skipped as no_instances"):
        coco_converter.convert_coco(str(sample.image_dir), str(ann_file), str(tmp_path / "info2"), num_shards=1,
                                    skip_empty=True, progress=False)


def test_txt_paths_with_spaces_and_a_repeated_image(tmp_path, capsys):
    image_dir = tmp_path / "my data"
    (image_dir / "sub dir").mkdir(parents=True)
    cv2.imwrite(str(image_dir / "sub dir" / "a b.jpg"), np.full((40, 60, 3), 128, np.uint8))
    cv2.imwrite(str(image_dir / "c.png"), np.full((40, 60, 3), 64, np.uint8))
    (tmp_path / "list.txt").write_text(
        "sub dir/a b.jpg 1,2,11,12,1\n"  # line 1: a path with spaces
        "c.png 0,0,10,10,2\n"  # line 2
        "sub dir/a b.jpg 5,5,25,25,2 6,6,9,9,1\n"  # line 3: the same image again -> merged into line 1
        "gone dir/x.jpg 1,1,5,5,1 2,2,6,6,1\n"  # line 4: missing image, 2 boxes lost with it
        "c.png 1,2,3,x,1\n")  # line 5: malformed box: skipped, not read as part of a path
    prefix = str(tmp_path / "out" / "t")
    summary = txt_converter.convert_txt(str(image_dir), str(tmp_path / "list.txt"), prefix, progress=False)
    assert summary["lines_merged"] == 1 and summary["lines_skipped"] == {"malformed_line": 1}
    assert summary["images_written"] == 2 and summary["instances_written"] == 4
    assert summary["instances_lost_with_skipped_images"] == {"missing_image_file": 2}
    assert summary["examples"]["lines_merged"] == [
        "line 3: sub dir/a b.jpg already on line 1; its 2 box(es) merged there"]
    assert "WARNING: 1 line(s) repeat an earlier line's image" in capsys.readouterr().err
    from tests.data.test_txt_converter import read_records

    first, second = read_records(prefix)
    assert first["source_id"] == b"1" and first["filename"] == b"sub dir/a b.jpg"
    assert first["labels"].tolist() == [1, 2, 1] and second["labels"].tolist() == [2]
    # Nothing written at all: an error that names the cause.
    (tmp_path / "gone.txt").write_text("gone dir/x.jpg 1,1,5,5,1\n")
    with pytest.raises(conversion_report.ConversionError, match="no image written: --image_dir points at .* but "
                                                                "the annotation file lists files like "
                                                                "'gone dir/x.jpg'"):
        txt_converter.convert_txt(str(image_dir), str(tmp_path / "gone.txt"), str(tmp_path / "out" / "g"),
                                  progress=False)


def test_unwritable_output_prefix_is_a_one_line_error(coco_sample, tmp_path):
    sample = coco_sample("coco_val2017_10")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _coco_to_tfrecord(f"--image_dir={sample.image_dir}", f"--annotation_file={sample.annotation_file}",
                             f"--output_prefix={blocker / 'out' / 'val'}", "--num_shards=1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(blocker) in last, last
    assert blocker.read_text() == "not a directory" and os.listdir(tmp_path) == ["a_file"]
