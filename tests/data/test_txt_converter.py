"""Text-list (MindSpore format) -> box-only TFRecords: good lines written, bad lines reported by number."""
import json

import cv2
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.data import conversion_report, schema, sharded_writer, txt_converter

H, W = 40, 60  # image size of the planted test images


def read_records(output_prefix):
    records = []
    for path in sharded_writer.shard_paths(output_prefix, 1):
        for serialized in tf.data.TFRecordDataset(path):
            records.append({k: v.numpy() for k, v in schema.parse_example(serialized).items()})
    return records


def test_txt_list_with_malformed_line_and_escaping_path(tmp_path):
    image_dir = tmp_path / "data"
    (image_dir / "sub").mkdir(parents=True)
    cv2.imwrite(str(image_dir / "a.jpg"), np.full((H, W, 3), 128, np.uint8))
    cv2.imwrite(str(image_dir / "sub" / "b.png"), np.full((H, W, 3), 64, np.uint8))
    cv2.imwrite(str(tmp_path / "outside.jpg"), np.full((H, W, 3), 0, np.uint8))
    (tmp_path / "names.txt").write_text("background\nsquare\ncircle\n")
    (tmp_path / "list.txt").write_text(
        "a.jpg 10,5,30,25,1 0,0,60,40,2\n"  # line 1: two good boxes
        "sub/b.png 1,2,3,x,1\n"  # line 2: malformed coordinate
        "../outside.jpg 1,1,5,5,1\n"  # line 3: escapes --image_dir
        "\n"  # line 4: blank, ignored
        "sub/b.png 50,30,70,50,2 9,9,5,20,1 3,3,8,8,7\n"  # line 5: clipped, degenerate, unknown class
        "/abs/a.jpg 1,1,5,5,1\n")  # line 6: absolute path
    prefix = str(tmp_path / "out" / "train")
    summary = txt_converter.convert_txt(str(image_dir), str(tmp_path / "list.txt"), prefix,
                                        class_names_file=str(tmp_path / "names.txt"), progress=False)
    assert summary["lines_skipped"] == {"malformed_line": 1, "path_outside_image_dir": 2}
    assert summary["examples"]["lines_skipped:malformed_line"][0].startswith("line 2:")
    assert [m.split(":")[0] for m in summary["examples"]["lines_skipped:path_outside_image_dir"]] == \
        ["line 3", "line 6"]
    assert summary["instances_dropped"] == {"degenerate_box": 1, "unknown_category": 1}
    assert (summary["images_written"], summary["instances_written"], summary["boxes_clipped"]) == (2, 3, 1)
    # "background" on line 0 of names.txt is not a class: ids 1, 2 -> contiguous 1, 2.
    assert json.load(open(prefix + "_label_map.json")) == [
        {"id": 1, "contiguous_id": 1, "name": "square"}, {"id": 2, "contiguous_id": 2, "name": "circle"}]

    first, second = read_records(prefix)
    assert first["source_id"] == b"1" and second["source_id"] == b"5"  # the line numbers
    assert first["encoded"] == (image_dir / "a.jpg").read_bytes() and second["format"] == b"png"
    assert first["png_masks"].shape == (0,), "box-only records carry no mask key"
    # [ymin, xmin, ymax, xmax] normalized; pixel boxes (x1, y1, x2, y2) divided by (W, H).
    np.testing.assert_allclose(first["boxes_norm"], [[5 / H, 10 / W, 25 / H, 30 / W], [0, 0, 1, 1]], atol=1e-6)
    assert first["labels"].tolist() == [1, 2] and first["texts"].tolist() == [b"square", b"circle"]
    np.testing.assert_allclose(first["areas"], [20 * 20, 60 * 40])
    # Line 5's first box (50,30)-(70,50) clipped to the 60x40 image -> (50,30)-(60,40).
    np.testing.assert_allclose(second["boxes_norm"], [[30 / H, 50 / W, 1, 1]], atol=1e-6)


def test_txt_without_names_uses_the_ids_seen(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((H, W, 3), np.uint8))
    (tmp_path / "list.txt").write_text("a.jpg 1,1,9,9,0 2,2,8,8,4\n")
    prefix = str(tmp_path / "t")
    txt_converter.convert_txt(str(tmp_path), str(tmp_path / "list.txt"), prefix, progress=False)
    # 0-based ids are fine: they stay dataset ids in the records and map to contiguous 1..K.
    assert json.load(open(prefix + "_label_map.json")) == [
        {"id": 0, "contiguous_id": 1, "name": "class_0"}, {"id": 4, "contiguous_id": 2, "name": "class_4"}]
    assert read_records(prefix)[0]["labels"].tolist() == [0, 4]
    with pytest.raises(conversion_report.ConversionError, match="annotation file not found"):
        txt_converter.convert_txt(str(tmp_path), str(tmp_path / "missing.txt"), prefix)


def test_txt_conversion_writes_the_records_coco_json_that_pycocotools_scores(tmp_path, capsys):
    """{prefix}_annotations.json: the records' images (ids = line numbers, file names as listed) and their
    boxes after clipping and dropping; perfect detections built from the text list score box AP 1.0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(30)
    image_dir = tmp_path / "images"
    (image_dir / "sub").mkdir(parents=True)
    lines, expected = [], {}  # expected: line number -> [(x, y, w, h, cls, crowd)] as the JSON must hold
    for number in range(1, 9):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        name = f"sub/img {number}.png" if number % 3 == 0 else f"img_{number}.jpg"
        cv2.imwrite(str(image_dir / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            x2, y2 = x1 + int(rng.integers(5, w - x1 + 1)), y1 + int(rng.integers(5, h - y1 + 1))
            boxes.append((x1, y1, x2, y2, int(rng.integers(1, 3)), 0))
        if number == 2:
            boxes.append((w - 5, h - 5, w + 20, h + 20, 2, 1))  # crowd, clipped to (w - 5, h - 5, w, h)
        if number == 5:
            boxes = []  # an image without boxes: in the JSON, no annotation
        tokens = " ".join(f"{x1},{y1},{x2},{y2},{c}" + (f",{crowd}" if crowd else "")
                          for x1, y1, x2, y2, c, crowd in boxes)
        lines.append(f"{name} {tokens}".rstrip())
        expected[number] = (name, h, w, [(x1, y1, min(x2, w) - x1, min(y2, h) - y1, c, crowd)
                                         for x1, y1, x2, y2, c, crowd in boxes])
    lines.append("img_1.jpg 1,2,x,4,1")  # line 9: malformed, skipped: not in the JSON
    lines.append("img_4.jpg 9,9,3,20,1")  # line 10: img_4 again, its degenerate box dropped (merged into 4)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "out" / "val")
    summary = txt_converter.convert_txt(str(image_dir), str(tmp_path / "list.txt"), prefix, num_shards=3,
                                        progress=False)
    assert summary["annotations_json"] == prefix + "_annotations.json"
    gt = json.load(open(prefix + "_annotations.json"))

    # The images: exactly the records' ids and file names, with their sizes.
    records = [r for i in range(3) for r in _shard_records(prefix, i, 3)]
    assert sorted((int(r["source_id"]), r["filename"].decode()) for r in records) == \
        [(image["id"], image["file_name"]) for image in gt["images"]]
    assert [(image["id"], image["file_name"], image["height"], image["width"]) for image in gt["images"]] == \
        [(n, name, h, w) for n, (name, h, w, _) in sorted(expected.items())]
    # Box-only annotations with COCO's keys; ids from 1 (pycocotools reads id 0 as "unmatched").
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(gt["annotations"]) + 1))
    assert all(set(a) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} for a in gt["annotations"])
    got = sorted((a["image_id"], *a["bbox"], a["category_id"], a["iscrowd"]) for a in gt["annotations"])
    want = sorted((n, *box) for n, (_, _, _, boxes) in expected.items() for box in boxes)
    np.testing.assert_allclose(np.array(got, np.float64), np.array(want, np.float64), atol=1e-3)
    np.testing.assert_allclose(sorted(a["area"] for a in gt["annotations"]),
                               sorted(b[2] * b[3] for _, (_, _, _, boxes) in expected.items() for b in boxes))
    assert gt["categories"] == [{"id": 1, "name": "class_1"}, {"id": 2, "name": "class_2"}]

    # pycocotools: detections made from the text list itself (image id = line number) score AP 1.0.
    coco_gt = COCO(prefix + "_annotations.json")
    detections = [{"image_id": n, "category_id": c, "bbox": [x, y, bw, bh], "score": 0.9}
                  for n, (_, _, _, boxes) in expected.items() for x, y, bw, bh, c, crowd in boxes if not crowd]
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert coco_eval.stats[0] == pytest.approx(1.0) and coco_eval.stats[8] == pytest.approx(1.0)
    # The same detections one image id off (a 0-based numbering) do not: the ids are the line numbers.
    shifted = [{**d, "image_id": d["image_id"] - 1} for d in detections if d["image_id"] > 1]
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(shifted), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert coco_eval.stats[0] < 0.2


def _shard_records(prefix, index, count):
    path = sharded_writer.shard_paths(prefix, count)[index]
    return [{k: v.numpy() for k, v in schema.parse_example(s).items()} for s in tf.data.TFRecordDataset(path)]
