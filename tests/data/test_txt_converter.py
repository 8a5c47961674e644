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
