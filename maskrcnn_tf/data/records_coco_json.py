"""Box-only COCO-format ground truth read back from written TFRecords (the TXT converter's
`{output_prefix}_annotations.json`, the `--val_json` that eval.py needs for TXT data).

`coco_json_from_records(shard_paths, categories)` returns the dict; `iter_tfrecord(path)` yields a file's
serialized records.

Decisions:
- Read back from the shards, not recomputed from the text list: the JSON holds exactly what the records
  hold (after clipping and dropped boxes, without skipped images), so the ids and file names cannot drift
  from the records. images: {"id": int(image/source_id), "file_name": image/filename, "height", "width"},
  sorted by id.
- Annotations: "bbox" [x, y, w, h] in original pixels (the records' normalised box times the image
  size, rounded to 1e-3 px to drop float32 noise), "area" the record's area, "iscrowd" the record's
  is_crowd, "category_id" the record's dataset id (as in the label map), no "segmentation" (so
  evaluation runs bbox only). Ids 1..M in image-id order (pycocotools treats annotation id 0 as
  "unmatched").
- "categories" are the label map's entries ({"id", "name"}), also classes no record uses.
- Records are parsed with protobuf only (no TensorFlow op runs): the converters fork worker processes,
  and a TF runtime started in the parent would make later forks unsafe.
"""

import struct
from typing import Dict, Iterable, Iterator, Sequence

from tensorflow.core.example import example_pb2

from maskrcnn_tf.data import schema

_HEADER_BYTES, _FOOTER_BYTES = 12, 4  # uint64 length + uint32 crc; uint32 crc
_DECIMALS = 3


def iter_tfrecord(path: str) -> Iterator[bytes]:
    """The serialized records of one local TFRecord file, in order (framing checked, CRCs not)."""
    with open(path, "rb") as f:
        while True:
            header = f.read(_HEADER_BYTES)
            if not header:
                return
            if len(header) < _HEADER_BYTES:
                raise ValueError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(_FOOTER_BYTES)) < _FOOTER_BYTES:
                raise ValueError(f"{path}: truncated record")
            yield data


def _values(feature_map, key):
    if key not in feature_map:
        return []
    feature = feature_map[key]
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


def coco_json_from_records(shard_paths: Sequence[str], categories: Iterable[Dict],
                           description: str = "") -> Dict:
    """COCO instances dict (images, box-only annotations, categories) of the records in shard_paths.

    Args:
      shard_paths: local TFRecord files written by schema.build_example.
      categories: dicts with "id" (dataset category id) and "name" (a label map's entries).
      description: goes to "info"/"description".
    Raises:
      ValueError: a record whose image/source_id is not an integer, or two records with one id.
    """
    images, boxes = {}, []
    for path in shard_paths:
        for serialized in iter_tfrecord(path):
            features = example_pb2.Example.FromString(serialized).features.feature
            source_id = b"".join(_values(features, schema.SOURCE_ID)).decode()
            try:
                image_id = int(source_id)
            except ValueError:
                raise ValueError(f"{path}: image/source_id {source_id!r} is not an integer") from None
            if image_id in images:
                raise ValueError(f"{path}: image id {image_id} occurs twice")
            height = int(_values(features, schema.HEIGHT)[0])
            width = int(_values(features, schema.WIDTH)[0])
            name = b"".join(_values(features, schema.FILENAME)).decode("utf-8", "replace")
            images[image_id] = {"id": image_id, "file_name": name, "height": height, "width": width}
            columns = [_values(features, key) for key in (schema.XMIN, schema.YMIN, schema.XMAX, schema.YMAX,
                                                          schema.LABEL, schema.AREA)]
            crowd = _values(features, schema.IS_CROWD) or [0] * len(columns[0])
            for xmin, ymin, xmax, ymax, label, area, is_crowd in zip(*columns, crowd):
                x1, y1 = round(xmin * width, _DECIMALS), round(ymin * height, _DECIMALS)
                w, h = round(xmax * width - x1, _DECIMALS), round(ymax * height - y1, _DECIMALS)
                boxes.append((image_id, {"category_id": int(label), "bbox": [x1, y1, w, h],
                                         "area": round(float(area), _DECIMALS), "iscrowd": int(is_crowd)}))
    annotations = []
    for number, (image_id, annotation) in enumerate(sorted(boxes, key=lambda b: b[0]), start=1):
        annotations.append({"id": number, "image_id": image_id, **annotation})
    return {"info": {"description": description},
            "images": [images[i] for i in sorted(images)],
            "annotations": annotations,
            "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]}
