"""The TFRecord schema (tf.train.Example), compatible with TF Model Garden's COCO converter.

One record per image. Keys (docs/design.md section 5):
  image/encoded         bytes   original JPEG/PNG file bytes, never re-encoded
  image/format          bytes   "jpeg" | "png"
  image/height, width   int64   original size in pixels
  image/filename        bytes
  image/source_id       bytes   str(image_id)
  image/object/bbox/{xmin,ymin,xmax,ymax}  float  normalized 0..1 (COCO-style x/y; converted to our
                                                  [y1, x1, y2, x2] pixels only in the pipeline)
  image/object/class/label  int64  the dataset's own category id
  image/object/class/text   bytes  category name
  image/object/is_crowd     int64  0 | 1
  image/object/area         float  annotation area in original pixels
  image/object/mask         bytes  one PNG (single channel, 0/1) per instance at the original image size;
                                   the key is absent when the dataset has no masks
`build_example` is the only writer and `parse_example` the only reader of these keys.
"""

from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
FILENAME = "image/filename"
SOURCE_ID = "image/source_id"
XMIN = "image/object/bbox/xmin"
YMIN = "image/object/bbox/ymin"
XMAX = "image/object/bbox/xmax"
YMAX = "image/object/bbox/ymax"
LABEL = "image/object/class/label"
TEXT = "image/object/class/text"
IS_CROWD = "image/object/is_crowd"
AREA = "image/object/area"
MASK = "image/object/mask"


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _floats(values) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(values, np.float32).tolist()))


def _ints(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(values, np.int64).tolist()))


def build_example(
    *,
    encoded: bytes,
    image_format: str,
    height: int,
    width: int,
    filename: str,
    source_id: str,
    boxes_norm_xyxy: np.ndarray,
    labels: Sequence[int],
    texts: Sequence[str],
    is_crowd: Sequence[int],
    areas: Sequence[float],
    png_masks: Optional[Sequence[bytes]] = None,
) -> tf.train.Example:
    """Builds one record. boxes_norm_xyxy: float [n, 4] as (xmin, ymin, xmax, ymax) normalized 0..1.

    png_masks None means "this dataset has no masks" and leaves the mask key out.
    """
    boxes = np.asarray(boxes_norm_xyxy, np.float32).reshape(-1, 4)  # [n, 4]
    n = boxes.shape[0]
    if not (len(labels) == len(texts) == len(is_crowd) == len(areas) == n):
        raise ValueError(f"{filename}: per-instance lists disagree in length (boxes: {n})")
    feature: Dict[str, tf.train.Feature] = {
        ENCODED: _bytes([encoded]),
        FORMAT: _bytes([image_format.encode()]),
        HEIGHT: _ints([height]),
        WIDTH: _ints([width]),
        FILENAME: _bytes([filename.encode()]),
        SOURCE_ID: _bytes([str(source_id).encode()]),
        XMIN: _floats(boxes[:, 0]),
        YMIN: _floats(boxes[:, 1]),
        XMAX: _floats(boxes[:, 2]),
        YMAX: _floats(boxes[:, 3]),
        LABEL: _ints(labels),
        TEXT: _bytes([t.encode() for t in texts]),
        IS_CROWD: _ints(is_crowd),
        AREA: _floats(areas),
    }
    if png_masks is not None:
        if len(png_masks) != n:
            raise ValueError(f"{filename}: {len(png_masks)} masks for {n} boxes")
        feature[MASK] = _bytes(png_masks)
    return tf.train.Example(features=tf.train.Features(feature=feature))


_FEATURES = {
    ENCODED: tf.io.FixedLenFeature((), tf.string),
    FORMAT: tf.io.FixedLenFeature((), tf.string, default_value="jpeg"),
    HEIGHT: tf.io.FixedLenFeature((), tf.int64, default_value=-1),
    WIDTH: tf.io.FixedLenFeature((), tf.int64, default_value=-1),
    FILENAME: tf.io.FixedLenFeature((), tf.string, default_value=""),
    SOURCE_ID: tf.io.FixedLenFeature((), tf.string, default_value=""),
    XMIN: tf.io.VarLenFeature(tf.float32),
    YMIN: tf.io.VarLenFeature(tf.float32),
    XMAX: tf.io.VarLenFeature(tf.float32),
    YMAX: tf.io.VarLenFeature(tf.float32),
    LABEL: tf.io.VarLenFeature(tf.int64),
    TEXT: tf.io.VarLenFeature(tf.string),
    IS_CROWD: tf.io.VarLenFeature(tf.int64),
    AREA: tf.io.VarLenFeature(tf.float32),
    MASK: tf.io.VarLenFeature(tf.string),
}


def parse_example(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Parses one serialized record into dense tensors (graph-safe; no image decoding).

    Returns: encoded string [], format string [], height/width int64 [], filename string [],
    source_id string [], boxes_norm float32 [n, 4] as [ymin, xmin, ymax, xmax] (our order),
    labels int64 [n], texts string [n], is_crowd int64 [n] (0 when the key is absent), areas float32 [n],
    png_masks string [n_masks] (n_masks = 0 when the record has no masks, else n).
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    dense = {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for k, v in parsed.items()}
    boxes_norm = tf.stack([dense[YMIN], dense[XMIN], dense[YMAX], dense[XMAX]], axis=-1)  # [n, 4]
    num_instances = tf.shape(boxes_norm)[0]
    is_crowd = dense[IS_CROWD]
    # Model Garden's records may omit is_crowd; absent means "not crowd".
    is_crowd = tf.cond(tf.size(is_crowd) == num_instances, lambda: is_crowd,
                       lambda: tf.zeros([num_instances], tf.int64))
    return {
        "encoded": dense[ENCODED],
        "format": dense[FORMAT],
        "height": dense[HEIGHT],
        "width": dense[WIDTH],
        "filename": dense[FILENAME],
        "source_id": dense[SOURCE_ID],
        "boxes_norm": boxes_norm,
        "labels": dense[LABEL],
        "texts": dense[TEXT],
        "is_crowd": is_crowd,
        "areas": dense[AREA],
        "png_masks": dense[MASK],
    }


def encode_png_mask(mask: np.ndarray) -> bytes:
    """uint8/bool [H, W] binary mask -> PNG bytes (single channel, values 0/1)."""
    import cv2  # local import: only converters need OpenCV

    ok, buf = cv2.imencode(".png", np.asarray(mask, np.uint8))
    if not ok:
        raise ValueError("could not PNG-encode a mask")
    return buf.tobytes()
