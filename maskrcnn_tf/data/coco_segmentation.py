"""COCO segmentations (polygons, uncompressed or compressed RLE) -> run lengths of the instance mask.

Decisions:
- A mask is exactly pycocotools' annToMask of the annotation (frPyObjects + merge for polygons) at the
  true image size; the run lengths (rle_png.rle_counts format: column-major, 0-runs first) are what
  rle_png.encode_png_from_counts writes as the instance's PNG.
- Polygons are filtered before pycocotools sees them, because frPyObjects reads a list whose first entry
  has 4 numbers as boxes, not polygons: a part with fewer than 3 finite points is removed and counted
  ("polygon_parts_dropped"); no part left is "empty_or_broken_polygon".
- Run lengths that do not cover the image exactly are "malformed_rle" (pycocotools would decode them past
  its buffer); an RLE of another size is "rle_size_mismatch"; a mask without a pixel is "empty_mask".
"""

import math
from typing import List, Optional

import numpy as np

from maskrcnn_tf.data import rle_png
from maskrcnn_tf.data.conversion_report import Stats

MIN_POLYGON_COORDS = 6  # 3 points: fewer cannot enclose a pixel


def finite_floats(values) -> Optional[List[float]]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def segmentation_to_counts(segmentation, height: int, width: int, stats: Stats, where: str):
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> (int64 [m] run lengths, None) or
    (None, drop reason). The runs (rle_png.rle_counts format: column-major, 0-runs first) describe
    exactly pycocotools' annToMask of the annotation for valid input."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            coords = finite_floats(polygon) if isinstance(polygon, (list, tuple)) else None
            if coords is not None and len(coords) >= MIN_POLYGON_COORDS and len(coords) % 2 == 0:
                polygons.append(coords)
        if not polygons:
            return None, "empty_or_broken_polygon"
        if len(polygons) < len(segmentation):
            stats.count("polygon_parts_dropped", f"{where}: {len(segmentation) - len(polygons)} part(s)",
                        n=len(segmentation) - len(polygons))
        counts = rle_png.rle_counts(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))["counts"])
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            return None, "malformed_rle"
        try:
            if [int(size[0]), int(size[1])] != [height, width]:
                return None, "rle_size_mismatch"
            if isinstance(counts, list):  # uncompressed RLE (COCO crowd regions)
                counts = np.asarray(counts)
                if counts.ndim != 1 or counts.dtype.kind not in "iu":
                    return None, "malformed_rle"
                counts = counts.astype(np.int64)
            elif isinstance(counts, (str, bytes)):
                counts = rle_png.rle_counts(counts)
            else:
                return None, "malformed_rle"
            rle_png.check_counts(counts, height, width)
        except (TypeError, ValueError, OverflowError):
            return None, "malformed_rle"
    else:
        return None, "missing_segmentation"
    return (counts, None) if counts[1::2].any() else (None, "empty_mask")
