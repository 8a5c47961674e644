"""Label map JSON: the dataset's category ids <-> contiguous class ids 1..K.

File `{output_prefix}_label_map.json`, written by the converters next to the shards (docs/design.md section 4):
    [{"id": dataset_category_id, "contiguous_id": 1.., "name": "person"}, ...]   sorted by dataset id
`load_label_map` returns what config.DataConfig wants: category_ids[i] is the dataset id of contiguous
class i + 1, class_names[i] its name. Decisions: contiguous ids are assigned in dataset-id order (as
detectron2 and Model Garden do for COCO: 1 -> 1, ..., 90 -> 80); a file whose contiguous ids are not
exactly 1..K, or with a repeated dataset id, is refused with a ValueError naming the file.
"""

import json
from typing import Dict, Iterable, List, Tuple

import tensorflow as tf


def load_label_map(path: str) -> Tuple[Tuple[int, ...], Tuple[str, ...]]:
    """Reads a label map file -> (category_ids, class_names), both ordered by contiguous id 1..K."""
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"label map {path}: not valid JSON ({e})") from e
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"label map {path}: expected a non-empty JSON list of {{id, contiguous_id, name}}")
    for entry in entries:
        if not isinstance(entry, dict) or not {"id", "contiguous_id", "name"} <= set(entry):
            raise ValueError(f"label map {path}: entry {entry!r} lacks one of id, contiguous_id, name")
        if not isinstance(entry["id"], int) or not isinstance(entry["contiguous_id"], int):
            raise ValueError(f"label map {path}: entry {entry!r} has non-integer ids")
    entries = sorted(entries, key=lambda e: e["contiguous_id"])
    contiguous = [e["contiguous_id"] for e in entries]
    if contiguous != list(range(1, len(entries) + 1)):
        raise ValueError(f"label map {path}: contiguous ids must be exactly 1..{len(entries)}, got {contiguous}")
    category_ids = tuple(e["id"] for e in entries)
    if len(set(category_ids)) != len(category_ids):
        raise ValueError(f"label map {path}: repeated dataset category ids {category_ids}")
    return category_ids, tuple(str(e["name"]) for e in entries)


def write_label_map(path: str, categories: Iterable[Dict]) -> List[Dict]:
    """Writes the label map for COCO-style categories (dicts with "id" and "name"; other keys ignored).

    Contiguous ids follow the dataset ids in increasing order. Returns the written list.
    """
    categories = sorted(categories, key=lambda c: int(c["id"]))
    ids = [int(c["id"]) for c in categories]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"label map {path}: need at least one category and unique ids, got {ids}")
    entries = [{"id": int(c["id"]), "contiguous_id": i + 1, "name": str(c["name"])} for i, c in enumerate(categories)]
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(entries, f, indent=1)
    return entries
