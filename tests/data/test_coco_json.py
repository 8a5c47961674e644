"""coco_json: the streaming index equals json.load on real and awkward files, at any chunk size."""
import json
import subprocess
import sys

import numpy as np
import pytest

from maskrcnn_tf.data import coco_json
from tests.conftest import REPO_ROOT, shared_data

# Chunk sizes that cut every value somewhere (1 byte), inside numbers/strings (7), and the default.
CHUNKS = (1, 7, 4096, coco_json.CHUNK_BYTES)


def _check_against_json_load(path, chunk_bytes):
    data = json.load(open(path, "rb"))
    index = coco_json.index_coco_json(str(path), chunk_bytes)
    assert index.images == [{k: v for k, v in e.items() if k in coco_json.IMAGE_KEYS} if isinstance(e, dict) else e
                            for e in data["images"]]
    assert index.categories == data["categories"]
    well_formed = [a for a in data.get("annotations", []) if isinstance(a, dict) and "image_id" in a]
    assert coco_json.read_annotations(str(path), index.annotation_offsets, index.annotation_lengths) == well_formed
    ids = [a["image_id"] for a in well_formed]
    for i, image_id in enumerate(ids):
        if i in index.non_int_image_ids:
            assert index.non_int_image_ids[i] == image_id
        else:
            assert index.annotation_image_ids[i] == image_id
    assert index.used_category_ids == {a.get("category_id") for a in data.get("annotations", [])
                                       if isinstance(a, dict)}
    return index


@pytest.mark.parametrize("chunk_bytes", CHUNKS)
def test_real_coco_file_indexes_like_json_load(chunk_bytes):
    # COCO's own file as written by its tools (the generated and awkward files are checked below).
    root = shared_data("coco_val2017_10", "COCO's own annotation file indexes like json.load")
    index = _check_against_json_load(root / "annotations" / "instances_val2017_subset.json", chunk_bytes)
    assert len(index.images) == 10 and len(index.annotation_offsets) == 77  # shared data README
    assert index.num_malformed_annotations == 0 and index.annotations_is_list


@pytest.mark.parametrize("chunk_bytes", CHUNKS[:3])
@pytest.mark.parametrize("bom", [False, True])
def test_non_ascii_pretty_printed_file_with_odd_entries(tmp_path, chunk_bytes, bom):
    data = {
        "info": {"description": "données 中文 ☃"},
        "categories": [{"id": 1, "name": "chat", "supercategory": "animal"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "note": "naïve ☃" * 3},
            {"id": 2, "image_id": "seven", "category_id": 1, "bbox": [1.5e2, 2, 3, 4]},
            {"id": 3, "category_id": 2},  # no image_id: malformed
            "not an object",
            {"id": 4, "image_id": 2**70, "category_id": [1]},  # beyond int64; unhashable category
            {"id": 5, "image_id": 7.0, "category_id": 1, "segmentation": {"counts": "ü", "size": [1, 1]}},
        ],
        "images": [{"id": 7, "file_name": "é.jpg", "height": 2, "width": 3, "flickr_url": "x"}, 5],
    }
    text = json.dumps(data, ensure_ascii=False, indent=3)
    path = tmp_path / "a.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    data["annotations"][4]["category_id"] = None  # json.load's set would fail on the list too
    index = coco_json.index_coco_json(str(path), chunk_bytes)
    assert index.num_malformed_annotations == 2
    assert index.malformed_annotations == [repr({"id": 3, "category_id": 2}), repr("not an object")]
    assert sorted(index.non_int_image_ids) == [1, 2, 3]  # "seven", 2**70, 7.0
    assert index.images[0] == {"id": 7, "file_name": "é.jpg", "height": 2, "width": 3} and index.images[1] == 5
    spans = coco_json.read_annotations(str(path), index.annotation_offsets, index.annotation_lengths)
    assert [a["id"] for a in spans] == [1, 2, 4, 5] and spans[0]["note"] == "naïve ☃" * 3


@pytest.mark.parametrize("text, message", [
    ('{"images": [', "Expecting value"),
    ("", "Expecting value"),
    ('{"images": [{"id": 1},]}', "Expecting value at byte 22"),
    ('{"images": [1 2]}', "expected ',' or ']'"),
    ('{"a": 1} x', "extra data"),
])
def test_invalid_json_raises_value_error_with_a_byte_offset(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        coco_json.index_coco_json(str(path), 4)


def test_top_level_array_and_utf16_are_refused(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(coco_json.TopLevelNotObject):
        coco_json.index_coco_json(str(path))
    path.write_bytes('{"images": []}'.encode("utf-16-le"))
    with pytest.raises(ValueError, match="not UTF-8"):
        coco_json.index_coco_json(str(path))


MEMORY_TEST_CHUNK = 1 << 20


def _peak_rss_mb_of_indexing(path):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking (pytest) process.
    code = ("import sys; from maskrcnn_tf.data import coco_json; "
            f"coco_json.index_coco_json(sys.argv[1], {MEMORY_TEST_CHUNK}); "
            "print([int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO_ROOT, check=True, capture_output=True,
                         text=True)
    return float(out.stdout)


def test_memory_does_not_follow_the_file_size(tmp_path):
    # 15000 annotations with 200-point polygons: ~45 MB of JSON, which json.load would hold as ~5x
    # that in Python objects. The index keeps ~30 bytes per annotation and about two chunks of text, so
    # a 15x larger file adds only a few MB.
    rng = np.random.default_rng(0)
    polygon = [round(v, 2) for v in rng.uniform(0, 500, 400).tolist()]

    def write(path, num_images):
        with open(path, "w") as f:
            f.write('{"categories": [{"id": 1, "name": "a"}], "images": [')
            f.write(",".join(json.dumps({"id": i, "file_name": f"{i}.jpg", "height": 500, "width": 500})
                             for i in range(num_images)))
            f.write('], "annotations": [')
            f.write(",".join(json.dumps({"id": i, "image_id": i // 10, "category_id": 1, "bbox": [0, 0, 1, 1],
                                         "segmentation": [polygon]}) for i in range(num_images * 10)))
            f.write("]}")

    write(tmp_path / "small.json", 100)
    write(tmp_path / "large.json", 1500)
    growth = _peak_rss_mb_of_indexing(tmp_path / "large.json") - _peak_rss_mb_of_indexing(tmp_path / "small.json")
    size_mb = (tmp_path / "large.json").stat().st_size / 2**20
    assert size_mb > 40
    # Bound: text buffers (3 chunks), the index (~0.5 MB here) and allocator slack; json.load: > 5 x size_mb.
    assert growth < 3 * MEMORY_TEST_CHUNK / 2**20 + 6, (growth, size_mb)
