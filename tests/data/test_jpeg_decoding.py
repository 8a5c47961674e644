"""JPEGs decode to PIL's pixels (torchvision's and detectron2's reader) in every path (issue 31, point 6).

data/image_decoding.py decodes JPEGs with libjpeg's accurate IDCT; TF's default fast IDCT is up to ~20
levels off. Checked here: the decoder itself on generated JPEGs (always) and on the real JPEGs of
../shared/data (skipped without it), and the paths that use it: the tf.data pipeline (build_dataset),
the SavedModel's decode step (export.decode_image in a graph) and the Python API (predictor.read_image,
predictor.decode_image). Each generated case is one where the fast IDCT does differ from PIL, so every
test here fails on the old decode. The SavedModel end to end: tests/e2e/test_export.py; predict.py on a
JPEG and on a PNG of its pixels: tests/e2e/test_predict.py.
"""
import functools
import io

import cv2
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import export, predictor
from maskrcnn_tf.data import image_decoding, pipeline, schema
from tests.conftest import SHARED_DATA

Image = pytest.importorskip("PIL.Image", reason="PIL (a torchvision dependency) is the reference decoder")

# Real photos checked in the pipeline: COCO images with long side 640, all at scale 1 on a 640 x 640 canvas.
REAL_CANVAS = 640


def _photo(height, width, seed=0):
    """uint8 RGB [h, w, 3]: smooth colour waves, noise and a saturated block (work for every IDCT path)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    waves = np.stack([128 + 100 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], axis=-1)
    image = waves + rng.normal(0, 20, waves.shape)
    image[height // 3:height // 2, width // 4:width // 2] = (250, 10, 30)
    return np.clip(image, 0, 255).astype(np.uint8)


def _pil_jpeg(image, mode="RGB", **options):
    buffer = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _cv2_jpeg(image, *params):
    return cv2.imencode(".jpg", image[..., ::-1] if image.ndim == 3 else image, list(params))[1].tobytes()


def _exif_rotated_jpeg(image):
    """A JPEG whose EXIF says "rotate 90 degrees" (orientation 6): every decoder here ignores it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _generated():
    """name -> JPEG bytes: PIL's and OpenCV's encoders, chroma subsamplings, progressive, grayscale,
    CMYK (Adobe, inverted), restart markers, odd sizes, EXIF orientation."""
    photo = _photo(117, 155)
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    return {
        "pil_q95_420": _pil_jpeg(photo, quality=95),
        "pil_q75_444": _pil_jpeg(photo, quality=75, subsampling=0),
        "pil_q90_422": _pil_jpeg(photo, quality=90, subsampling=1),
        "pil_progressive_optimized": _pil_jpeg(photo, quality=60, progressive=True, optimize=True),
        "pil_grayscale": _pil_jpeg(photo, "L", quality=90),
        "pil_grayscale_progressive": _pil_jpeg(photo, "L", quality=90, progressive=True),
        "pil_cmyk": _pil_jpeg(photo, "CMYK", quality=90),
        "pil_cmyk_progressive": _pil_jpeg(photo, "CMYK", quality=90, progressive=True),
        "cv2_default": _cv2_jpeg(photo),
        "cv2_progressive": _cv2_jpeg(photo, cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 85),
        "cv2_restart_markers": _cv2_jpeg(photo, cv2.IMWRITE_JPEG_RST_INTERVAL, 3),
        "cv2_411": _cv2_jpeg(photo, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411),
        "cv2_grayscale": _cv2_jpeg(gray),
        "pil_odd_17x9": _pil_jpeg(photo[:17, :9], quality=90),
        "pil_exif_orientation_6": _exif_rotated_jpeg(photo),
    }


def _pil_pixels(data: bytes) -> np.ndarray:
    """uint8 [h, w, 3]: what torchvision's read_image / detectron2's reader give (no EXIF transpose)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _fast_idct(data: bytes) -> np.ndarray:
    """The old decode (tf.io.decode_image: libjpeg's fast IDCT)."""
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def _real_jpegs():
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not present (only in the development workspace): its subject is the real "
                    "sample (real camera JPEGs decode like PIL; generated JPEGs are checked above)")
    paths = sorted(SHARED_DATA.rglob("*.jpg"))
    assert paths, f"no JPEG under {SHARED_DATA}"
    return paths


@pytest.mark.parametrize("name", sorted(_generated()))
def test_generated_jpeg_decodes_to_pils_pixels(name):
    data = _generated()[name]
    expected = _pil_pixels(data)
    assert not np.array_equal(_fast_idct(data), expected)  # a case where the IDCTs differ
    np.testing.assert_array_equal(image_decoding.decode_image(data).numpy(), expected)
    if "cmyk" not in name and "exif" not in name:  # OpenCV: CMYK conversion 1 level off; applies EXIF
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(bgr[..., ::-1], expected)


def test_jpeg_goes_to_the_accurate_idct_other_formats_decode_as_before():
    """Dispatch on the leading bytes: JPEG -> accurate IDCT; PNG (RGB, RGBA, gray), GIF, BMP, WebP ->
    tf.io.decode_image's pixels as before (channels=3); a file that only starts like a JPEG -> TF's error."""
    jpeg = _generated()["pil_q95_420"]
    assert tf.io.is_jpeg(jpeg)
    np.testing.assert_array_equal(image_decoding.decode_image(jpeg).numpy(), _pil_pixels(jpeg))
    image = _photo(21, 34)
    encoded = []
    for array, fmt, options in ((image, "PNG", {}), (np.dstack([image, image[..., :1]]), "PNG", {}),
                                (image[..., 0], "PNG", {}), (image, "GIF", {}), (image, "BMP", {}),
                                (image, "WEBP", {"lossless": True})):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, fmt, **options)
        encoded.append(buffer.getvalue())
    for data in encoded:
        np.testing.assert_array_equal(image_decoding.decode_image(data).numpy(), _fast_idct(data))
    np.testing.assert_array_equal(image_decoding.decode_image(encoded[0]).numpy(), image)  # lossless
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        image_decoding.decode_image(b"\xff\xd8 starts like a JPEG but is not one")


def test_real_jpegs_decode_to_pils_pixels():
    paths = _real_jpegs()
    fast_differs = 0
    for path in paths:
        data = path.read_bytes()
        expected = _pil_pixels(data)
        np.testing.assert_array_equal(image_decoding.decode_image(data).numpy(), expected, err_msg=str(path))
        fast_differs += not np.array_equal(_fast_idct(data), expected)
    assert fast_differs == len(paths)  # the fast IDCT is off on every real photo


def _pipeline_pixels(tmp_path, encoded, canvas):
    """uint8 [h, w, 3] per encoded image as build_dataset (evaluation) decodes it: on a canvas where each
    image sits at scale 1 (resize is then the identity) with pixel mean 0 and std 1."""
    records = []
    for i, data in enumerate(encoded):
        w, h = Image.open(io.BytesIO(data)).size
        records.append(schema.build_example(
            encoded=data, image_format="jpeg", height=h, width=w, filename=f"{i}.jpg", source_id=str(i),
            boxes_norm_xyxy=np.zeros((0, 4)), labels=[], texts=[], is_crowd=[], areas=[], png_masks=None))
    path = str(tmp_path / "jpeg.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    cfg = config_lib.replace(config_lib.get_preset("tiny"), **{
        "model.image_size": canvas, "model.pixel_mean": (0.0, 0.0, 0.0), "model.pixel_std": (1.0, 1.0, 1.0),
        "data.eval_batch_size": 2})
    pixels = {}
    for batch in pipeline.build_dataset(path, cfg, training=False):
        for image, info, source_id, valid in zip(batch["images"].numpy(), batch["image_info"].numpy(),
                                                 batch["source_id"].numpy(), batch["is_valid"].numpy()):
            if valid:
                np.testing.assert_array_equal(info[2], [1.0, 1.0])  # scale 1: no resampling
                h, w = info[0].astype(int)
                assert np.array_equal(image[:h, :w], np.round(image[:h, :w]))  # whole values, no interpolation
                pixels[int(source_id)] = image[:h, :w].astype(np.uint8)
    return [pixels[i] for i in range(len(encoded))]


def test_pipeline_decodes_generated_jpegs_to_pils_pixels(tmp_path):
    photo = _photo(128, 128, seed=3)
    encoded = [_pil_jpeg(photo[:96], quality=90), _pil_jpeg(photo[:, :80], "L", quality=90),
               _pil_jpeg(photo, "CMYK", quality=90, progressive=True), _cv2_jpeg(photo)]
    for data, pixels in zip(encoded, _pipeline_pixels(tmp_path, encoded, (128, 128))):
        expected = _pil_pixels(data)
        assert not np.array_equal(_fast_idct(data), expected)
        np.testing.assert_array_equal(pixels, expected)


def test_pipeline_decodes_real_jpegs_to_pils_pixels(tmp_path):
    paths = [p for p in _real_jpegs() if "coco_val2017_10" in p.parts
             and max(Image.open(p).size) == REAL_CANVAS]
    assert len(paths) >= 5, paths
    encoded = [p.read_bytes() for p in paths]
    for path, data, pixels in zip(paths, encoded, _pipeline_pixels(tmp_path, encoded, (REAL_CANVAS,) * 2)):
        np.testing.assert_array_equal(pixels, _pil_pixels(data), err_msg=str(path))


def test_serving_decode_step_gives_pils_pixels():
    """export.decode_image, in a graph as the serving_default / serving_box_masks signatures run it."""
    decode = tf.function(lambda encoded: export.decode_image(encoded, tf.constant(0)),
                         input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
    for name in ("pil_q95_420", "pil_grayscale", "pil_cmyk_progressive", "cv2_progressive"):
        data = _generated()[name]
        np.testing.assert_array_equal(decode(tf.constant(data)).numpy(), _pil_pixels(data), err_msg=name)


def test_python_api_reads_jpeg_files_and_bytes_to_pils_pixels(tmp_path):
    for name in ("pil_q95_420", "pil_grayscale", "pil_cmyk", "cv2_411"):
        data = _generated()[name]
        (tmp_path / f"{name}.jpg").write_bytes(data)
        expected = _pil_pixels(data)
        np.testing.assert_array_equal(predictor.read_image(str(tmp_path / f"{name}.jpg")), expected)
        np.testing.assert_array_equal(predictor.decode_image(data), expected)
        np.testing.assert_array_equal(predictor.to_rgb(data, "test"), expected)  # what predict() does
