"""The one image decoder of every path: tf.data pipeline, SavedModel signatures, Python API, predict.py.

`decode_image(encoded)`: string [] -> uint8 [h, w, 3] RGB, in graph or eager mode.

Decisions:
- JPEG (leading bytes FF D8 FF, tf.io.is_jpeg, the rule tf.io.decode_image itself classifies by) goes
  to tf.io.decode_jpeg with libjpeg's accurate integer IDCT (JDCT_ISLOW, "INTEGER_ACCURATE"), the
  IDCT PIL (torchvision's and detectron2's readers) and OpenCV use. tf.io.decode_image and
  decode_jpeg's default use the fast one (JDCT_IFAST): up to 22 levels (mean ~1.1, ~2/3 of the
  values) off PIL's pixels on the COCO photos of ../shared/data, so an imported model saw other
  pixels than its reference did. The accurate IDCT gives PIL's pixels exactly, grayscale (expanded
  to 3 equal channels), CMYK and progressive files included (tests/data/test_jpeg_decoding.py);
  it costs a few percent of the decode time (benchmarks/README.md). Always on, not a config field:
  there is nothing to keep the fast IDCT for.
- Everything else (PNG, GIF's first frame, BMP, WebP, JPEG XL) goes to tf.io.decode_image as before.
  Both branches ask for channels=3 (grayscale replicated, alpha dropped) and ignore EXIF orientation,
  as tf.io.decode_image always did (and PIL's Image.open, torchvision's read_image by default).
"""

import tensorflow as tf

# libjpeg's JDCT_ISLOW: PIL's and OpenCV's IDCT (TF's default "" / "INTEGER_FAST" is JDCT_IFAST).
JPEG_DCT_METHOD = "INTEGER_ACCURATE"


def decode_image(encoded) -> tf.Tensor:
    """string [] (tensor or bytes) encoded image -> uint8 [h, w, 3] RGB; InvalidArgumentError from TF's
    decoder when the bytes do not decode."""
    encoded = tf.convert_to_tensor(encoded, tf.string)

    def jpeg():
        return tf.io.decode_jpeg(encoded, channels=3, dct_method=JPEG_DCT_METHOD)

    def other():
        # expand_animations=False: a GIF gives its first frame, so every input is [h, w, 3].
        return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(encoded), jpeg, other), [None, None, 3])
