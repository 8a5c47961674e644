"""A COCO JSON's "categories" -> the label map the converter writes, and the categories it leaves out.

Rule: every category listed gets a contiguous id (1..K in dataset-id order), used or not, so train and
val conversions of one dataset agree. One exception: a category that no annotation uses AND whose name is
the supercategory of another category is a Roboflow-style "parent" (potholes' id 0 "pothole" above id 1
"pothole") and is left out; the summary lists it under "categories_left_out". COCO's "person" (its own
supercategory) is not a parent of another category, so it stays.
"""

from typing import Dict, List, Sequence, Tuple

from maskrcnn_tf.data.conversion_report import ConversionError


def label_map_and_left_out(categories: Sequence[Dict], used: set) -> Tuple[List[Dict], List[Dict]]:
    """-> (label map [{"id", "contiguous_id", "name"}] sorted by dataset id,
           left out [{"id", "name", "reason"}]). ConversionError for a malformed or repeated category."""
    cats = []
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise ConversionError(f"malformed category entry: {c!r}")
        cats.append(c)
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise ConversionError(f"duplicate category ids in 'categories': {sorted(ids)}")

    def parent_of(c):
        """Ids of the other categories whose supercategory is c's name, when no annotation uses c."""
        if c["id"] in used:
            return []
        return [o["id"] for o in cats if o is not c and o.get("supercategory") == c["name"]]

    kept, left_out = [], []
    for c in sorted(cats, key=lambda c: c["id"]):
        children = parent_of(c)
        if children:
            left_out.append({"id": c["id"], "name": str(c["name"]),
                             "reason": f"unused parent (supercategory) of category ids {children}"})
        else:
            kept.append(c)
    label_map = [{"id": c["id"], "contiguous_id": i + 1, "name": str(c["name"])} for i, c in enumerate(kept)]
    return label_map, left_out


def build_label_map(categories: Sequence[Dict], annotations: Sequence[Dict]) -> List[Dict]:
    """[{"id", "contiguous_id", "name"}] sorted by dataset id, from parsed categories and annotations."""
    used = {a.get("category_id") for a in annotations if isinstance(a, dict)}
    return label_map_and_left_out(categories, used)[0]
