"""label_map.py: the converters' {output_prefix}_label_map.json format."""
import json

import pytest

from maskrcnn_tf.data import label_map


def test_write_then_load_orders_by_dataset_id(tmp_path):
    path = str(tmp_path / "train_label_map.json")
    # COCO-like: ids with gaps, given out of order, extra keys ignored.
    written = label_map.write_label_map(path, [{"id": 90, "name": "toothbrush", "supercategory": "x"},
                                               {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}])
    assert written == [{"id": 1, "contiguous_id": 1, "name": "person"}, {"id": 18, "contiguous_id": 2, "name": "dog"},
                       {"id": 90, "contiguous_id": 3, "name": "toothbrush"}]
    assert json.loads(open(path).read()) == written
    assert label_map.load_label_map(path) == ((1, 18, 90), ("person", "dog", "toothbrush"))


def test_load_follows_contiguous_ids_not_file_order(tmp_path):
    path = tmp_path / "m.json"
    # A file listed in another order, with a non-monotonic mapping: contiguous id decides the position.
    path.write_text(json.dumps([{"id": 5, "contiguous_id": 2, "name": "b"},
                                {"id": 9, "contiguous_id": 1, "name": "a"}]))
    assert label_map.load_label_map(str(path)) == ((9, 5), ("a", "b"))


@pytest.mark.parametrize("entries, message", [
    ([{"id": 1, "contiguous_id": 1, "name": "a"}, {"id": 2, "contiguous_id": 3, "name": "b"}], "exactly 1..2"),
    ([{"id": 1, "contiguous_id": 0, "name": "a"}], "exactly 1..1"),
    ([{"id": 4, "contiguous_id": 1, "name": "a"}, {"id": 4, "contiguous_id": 2, "name": "b"}], "repeated"),
    ([{"id": 4, "name": "a"}], "lacks"),
    ([], "non-empty"),
])
def test_load_refuses_bad_files(tmp_path, entries, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message):
        label_map.load_label_map(str(path))
