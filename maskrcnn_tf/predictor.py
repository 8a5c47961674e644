"""Run a trained model (training run or SavedModel) on image files; draw and save the detections.

`Predictor` wraps either a model directory (Keras model restored from its checkpoint, wrapped in the same
export.ServingModule the SavedModel is made of, so both paths run identical graph code) or a SavedModel
written by export.py (loaded with plain `tf.saved_model.load`; its `metadata` signature gives the class
names). `predict(images)` takes image paths, encoded bytes or uint8 RGB arrays, one or a list, and
returns the detections of each in ORIGINAL pixels; `maskrcnn_tf.load(path)` (loading.py) picks the
constructor from what is on disk.

`predict_files` writes per input image `<stem>.png` (masks, boxes, "name score" labels drawn with
visualize.draw_detections) and `<stem>.json` (output_format "png_json"; "polygons" writes each
"segmentation" as a MultiPolygon, polygons.py; "coco_json" writes one results.json of COCO results with
image ids, and images.json):

    {"image": "<input path>", "height": h, "width": w,
     "detections": [{"bbox": [x, y, w, h],          COCO xywh, original pixels (continuous coordinates)
                     "category_id": dataset id, "category_name": str, "score": float,
                     "segmentation": {"size": [h, w], "counts": str}}, ...]}   compressed COCO RLE

so each detection is a COCO result dict without "image_id" (pycocotools.mask.decode reads the mask).
Only detections scoring >= score_threshold are drawn and written, best first; the count below it is
printed.

Memory: the graph returns box-local 28 x 28 masks only (the SavedModel's image_tensor_box_masks
signature), and predict() pastes just the detections it returns (score >= score_threshold), one at a
time and each only into its box's window: a call holds the image, its n returned detections' uint8
h x w masks (none with masks="box", one at a time with masks="rle") and one box window, whatever the
image size and the model's max_detections. Pasting follows the in-graph rule exactly (same values
bit for bit). Images are decoded with
data/image_decoding.py (the decoder the training pipeline and the serving signature use, so pixel values
match; JPEGs with the accurate IDCT, giving PIL's pixels). An unreadable file is reported on stderr with
its path and the reason and skipped; output names that collide (same stem in two folders) get a numeric
suffix.
"""

import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from maskrcnn_tf import export as export_lib
from maskrcnn_tf import polygons, visualize
from maskrcnn_tf.data import image_decoding
from maskrcnn_tf.evaluation.coco_results import encode_masks
from maskrcnn_tf.ops.masks import paste_masks

DEFAULT_SCORE_THRESHOLD = 0.5


class Predictor:
    """Detections of RGB images. Build with `maskrcnn_tf.load`, `from_model_dir`, `from_saved_model` or
    `from_keras_model`."""

    def __init__(self, detect_fn, category_ids: Sequence[int], class_names: Sequence[str]):
        """detect_fn: uint8 [1, h, w, 3] tensor -> output dict of export.py's image_tensor signature.
        category_ids / class_names: K dataset ids and names (contiguous class i + 1 <-> index i)."""
        self._detect = detect_fn
        self.category_ids = [int(c) for c in category_ids]
        self.class_names = [str(n) for n in class_names]

    @classmethod
    def from_model_dir(cls, model_dir: str, checkpoint: Optional[str] = None) -> "Predictor":
        """Restores the run's config and checkpoint (latest when None); ValueError when there is none."""
        from maskrcnn_tf import run_dir  # late import: building the model pulls in Keras

        cfg, model = run_dir.restore_model(model_dir, checkpoint)
        return cls.from_keras_model(model, cfg)

    @classmethod
    def from_keras_model(cls, model, cfg) -> "Predictor":
        """Wraps a built MaskRCNN of cfg in the export module (nothing is written)."""
        module = export_lib.ServingModule(model, cfg, include_pasted_masks=False)
        meta = module.metadata()
        return cls(lambda images: module.serve_tensor_box_masks(images), meta["category_ids"].numpy(),
                   [n.decode("utf-8") for n in meta["class_names"].numpy()])

    @classmethod
    def from_saved_model(cls, export_dir: str) -> "Predictor":
        """Loads a SavedModel written by export.py; ValueError when export_dir is not one."""
        if not tf.saved_model.contains_saved_model(export_dir):
            raise ValueError(f"{export_dir!r} is not a SavedModel directory (no saved_model.pb)")
        loaded = tf.saved_model.load(export_dir)
        missing = {export_lib.SIGNATURE_TENSOR, export_lib.SIGNATURE_METADATA} - set(loaded.signatures)
        if missing:
            raise ValueError(f"{export_dir}: not written by maskrcnn_tf export.py (no signature "
                             f"{', '.join(sorted(missing))})")
        meta = loaded.signatures[export_lib.SIGNATURE_METADATA]()
        # Box-local masks: predict() pastes only what it returns (module docstring, "Memory").
        detect = loaded.signatures.get(export_lib.SIGNATURE_TENSOR_BOX_MASKS,
                                       loaded.signatures[export_lib.SIGNATURE_TENSOR])
        predictor = cls(lambda images: detect(images=images), meta["category_ids"].numpy(),
                        [n.decode("utf-8") for n in meta["class_names"].numpy()])
        predictor._loaded = loaded  # keep the restored variables alive as long as the predictor
        return predictor

    def predict(self, images, score_threshold: float = 0.0, masks: str = "full", polygon_tolerance: float = 0.0):
        """Detections of one image or of many.

        Args:
          images: one image, or a list/tuple of images (or a uint8 [n, h, w, 3] array). An image is a file
            path (str or os.PathLike; any tf.io.gfile location), the encoded bytes of a file (JPEG, PNG,
            BMP, GIF) or a uint8 [h, w, 3] RGB array.
          score_threshold: only detections scoring >= this are returned (and pasted); 0 = all the model
            gives (its own model.detection.score_threshold applies first).
          masks: "full" (uint8 masks at the image size), "rle" (COCO RLE dicts, pasted one at a time),
            "polygons" (GeoJSON-style MultiPolygons along pixel edges, polygons.py, pasted one at a time)
            or "box" (only the box-local 28 x 28 probabilities: nothing pasted).
          polygon_tolerance: masks="polygons": simplification in pixels (0 = exact pixel edges).
        Returns:
          for one image a numpy dict over its n returned detections, best first; for many a list of such
          dicts in input order:
          "boxes" float32 [n, 4] [y1, x1, y2, x2] original pixels; "scores" float32 [n];
          "category_ids" int32 [n] dataset category ids; "category_names" list of n str;
          "classes" int32 [n] contiguous 1..K; "num_below_threshold" int, detections left out;
          "mask_probabilities" float32 [n, 28, 28] (box-local, in the box);
          masks="full": "masks" uint8 [n, h, w] 0/1; masks="rle": "masks_rle" list of n
          {"size": [h, w], "counts": str}; masks="polygons": "polygons" list of n {"type": "MultiPolygon",
          "coordinates": ...} in original pixels (no mask entries for box-only models).
        Raises ValueError naming the input (path, or position in the list) that is not a readable image,
        or a bad masks value.
        """
        if masks not in MASK_FORMATS:
            raise ValueError(f"predict: masks={masks!r}; expected one of {', '.join(MASK_FORMATS)}")
        if _is_many(images):
            return [self._predict_image(to_rgb(image, f"predict: image {i}"), score_threshold, masks,
                                        polygon_tolerance) for i, image in enumerate(images)]
        return self._predict_image(to_rgb(images, "predict"), score_threshold, masks, polygon_tolerance)

    def draw(self, image, result, path: Optional[str] = None,
             score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> np.ndarray:
        """uint8 [h, w, 3] copy of `image` (any input `predict` takes) with `result` (its `predict` output)
        drawn by visualize.draw_detections; also written as PNG to `path` when given."""
        rgb = to_rgb(image, "draw")
        drawn = visualize.draw_detections(rgb, result["boxes"], result["classes"], result["scores"],
                                          masks=result.get("masks"), class_names=self.class_names,
                                          score_threshold=score_threshold)
        if path is not None:
            tf.io.write_file(path, tf.io.encode_png(drawn))
        return drawn

    def _predict_image(self, image: np.ndarray, score_threshold: float, masks: str,
                       polygon_tolerance: float = 0.0) -> Dict[str, np.ndarray]:
        """predict() of one uint8 [h, w, 3] RGB array."""
        outputs = {k: v.numpy() for k, v in self._detect(tf.constant(image[None])).items()}
        n = int(outputs["num_detections"][0])
        scores = outputs["detection_scores"][0, :n].astype(np.float32)
        keep = np.flatnonzero(scores >= score_threshold)  # scores are sorted: a prefix
        category_ids = outputs["detection_classes"][0, keep].astype(np.int32)
        lookup = {c: i + 1 for i, c in enumerate(self.category_ids)}
        result = {
            "boxes": outputs["detection_boxes"][0, keep].astype(np.float32).reshape(-1, 4),
            "scores": scores[keep],
            "category_ids": category_ids,
            "classes": np.array([lookup[int(c)] for c in category_ids], np.int32).reshape(keep.size),
            "num_below_threshold": n - int(keep.size),
        }
        result["category_names"] = [self.class_names[c - 1] if 1 <= c <= len(self.class_names) else str(c)
                                    for c in result["classes"].tolist()]
        if "detection_masks" in outputs:
            probabilities = outputs["detection_masks"][0, keep]
            result["mask_probabilities"] = probabilities
            pasted = (paste_mask(m, box, image.shape[:2]) for m, box in zip(probabilities, result["boxes"]))
            if masks == "full":
                result["masks"] = np.zeros((keep.size, *image.shape[:2]), np.uint8)
                for i, (window, rows, cols) in enumerate(pasted):
                    result["masks"][i, rows, cols] = window
            elif masks == "rle":
                result["masks_rle"] = [encode_window(window, rows, cols, image.shape[:2])
                                       for window, rows, cols in pasted]
            elif masks == "polygons":
                result["polygons"] = [window_polygons(window, rows, cols, polygon_tolerance)
                                      for window, rows, cols in pasted]
        return result


MASK_FORMATS = ("full", "rle", "polygons", "box")


def paste_mask(mask: np.ndarray, box: np.ndarray, image_hw):
    """(uint8 window 0/1, row slice, column slice): mask float [M, M] probabilities pasted into its box
    [y1, x1, y2, x2] (original pixels) of an image of size image_hw, computed only over the box's window
    (the box plus the half mask cell beyond it where pasted values can be nonzero, plus a pixel):
    ops/masks.paste_masks with its origin, so the values equal the full-size paste's."""
    height, width = image_hw
    y1, x1, y2, x2 = (float(v) for v in box)
    if not (y2 > y1 and x2 > x1):
        return np.zeros((0, 0), np.uint8), slice(0, 0), slice(0, 0)
    half_y, half_x = (y2 - y1) / (2 * mask.shape[0]), (x2 - x1) / (2 * mask.shape[1])
    top, bottom = max(0, int(np.floor(y1 - half_y)) - 1), min(height, int(np.ceil(y2 + half_y)) + 1)
    left, right = max(0, int(np.floor(x1 - half_x)) - 1), min(width, int(np.ceil(x2 + half_x)) + 1)
    if bottom <= top or right <= left:
        return np.zeros((0, 0), np.uint8), slice(0, 0), slice(0, 0)
    window = paste_masks(mask[None, None], np.asarray(box, np.float32)[None, None], (bottom - top, right - left),
                         origin=(top, left))[0, 0]
    return (np.asarray(window) >= export_lib.MASK_THRESHOLD).astype(np.uint8), slice(top, bottom), slice(left, right)


def encode_window(window: np.ndarray, rows: slice, cols: slice, image_hw) -> dict:
    """COCO RLE {"size": [h, w], "counts": str} of an h x w mask that is `window` at (rows, cols), 0 elsewhere."""
    full = np.zeros(image_hw, np.uint8)
    full[rows, cols] = window
    return encode_masks(full[None])[0]


def window_polygons(window: np.ndarray, rows: slice, cols: slice, tolerance: float) -> dict:
    """MultiPolygon (polygons.py) in image pixels of a mask that is `window` at (rows, cols), 0 elsewhere."""
    geometry = polygons.mask_to_multipolygon(window, tolerance)
    geometry["coordinates"] = [[[[x + cols.start, y + rows.start] for x, y in ring] for ring in polygon]
                               for polygon in geometry["coordinates"]]
    return geometry


def _is_many(images) -> bool:
    """True for a list/tuple of images or a [n, h, w, 3] array; False for a single image."""
    return isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4)


def to_rgb(image, context: str) -> np.ndarray:
    """uint8 [h, w, 3] RGB of a path, encoded bytes or an RGB array; ValueError "<context>: <what>: <why>"."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return read_image(os.fspath(image))
        except ValueError as e:
            raise ValueError(f"{context}: {os.fspath(image)}: {e}") from e
    if isinstance(image, (bytes, bytearray)):
        try:
            return decode_image(bytes(image))
        except ValueError as e:
            raise ValueError(f"{context}: {len(image)} bytes: {e}") from e
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{context}: expected a path, encoded image bytes or a uint8 [h, w, 3] RGB array, "
                         f"got {type(image).__name__} {array.dtype} {array.shape}")
    return array


def decode_image(data: bytes) -> np.ndarray:
    """uint8 [h, w, 3] RGB of an encoded image, decoded as the training pipeline and the serving signature
    decode; ValueError with the decoder's reason."""
    if len(data) == 0:  # TF's decoder would call it an unknown image format
        raise ValueError("empty file")
    try:
        return image_decoding.decode_image(data).numpy()
    except tf.errors.InvalidArgumentError as e:
        # Keep TF's reason, without the kernel name in {{...}} and the op suffix " [Op:...]".
        reason = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", e.message.splitlines()[0])
        raise ValueError(f"not a decodable image ({reason})") from e


def read_image(path: str) -> np.ndarray:
    """uint8 [h, w, 3] RGB of an image file; ValueError with the reason when it cannot be read."""
    if not tf.io.gfile.exists(path):
        raise ValueError("file not found")
    if tf.io.gfile.isdir(path):
        raise ValueError("is a directory")
    try:
        data = tf.io.read_file(path)
    except tf.errors.OpError as e:  # e.g. permission denied
        raise ValueError(f"cannot read file ({type(e).__name__})") from e
    return decode_image(data.numpy())


def detections_to_json(result: Dict[str, np.ndarray], class_names: Sequence[str], score_threshold: float) -> List[dict]:
    """Predictor.predict output -> list of COCO-style result dicts (module docstring), score >= threshold."""
    keep = np.flatnonzero(result["scores"] >= score_threshold)
    rles = encode_masks(result["masks"][keep]) if "masks" in result and keep.size else [None] * keep.size
    detections = []
    for i, rle in zip(keep, rles):
        y1, x1, y2, x2 = (float(v) for v in result["boxes"][i])
        contiguous = int(result["classes"][i])
        name = class_names[contiguous - 1] if 1 <= contiguous <= len(class_names) else str(contiguous)
        detection = {"bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": int(result["category_ids"][i]),
                     "category_name": name, "score": float(result["scores"][i])}
        if rle is not None:
            detection["segmentation"] = rle
        detections.append(detection)
    return detections


def _unique_stem(path: str, used: set) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    candidate, suffix = stem, 1
    while candidate in used:
        candidate, suffix = f"{stem}_{suffix}", suffix + 1
    used.add(candidate)
    return candidate


OUTPUT_FORMATS = ("png_json", "polygons", "coco_json")


def predict_files(predictor: Predictor, image_paths: Sequence[str], output_dir: str,
                  class_names: Optional[Sequence[str]] = None,
                  score_threshold: float = DEFAULT_SCORE_THRESHOLD, output_format: str = "png_json",
                  polygon_tolerance: float = 0.0, image_ids: Optional[Dict[str, int]] = None):
    """Runs predictor on each image file and writes its detections into output_dir.

    output_format: "png_json" = `<stem>.png` + `<stem>.json` with RLE masks (module docstring);
    "polygons" = the same with each "segmentation" a MultiPolygon (polygons.py; polygon_tolerance in
    pixels); "coco_json" = `results.json` (COCO results: image_id, category_id, bbox xywh, score, RLE
    segmentation; pycocotools' COCO.loadRes reads it) and `images.json` (the COCO "images" and
    "categories" those ids refer to). image_ids: file basename -> COCO image id (e.g. from an annotation
    file); None numbers the images 1..N in input order. class_names: K names (contiguous class i + 1 ->
    class_names[i]); None = the predictor's own.
    Returns (written paths, number of images done). Unreadable images are reported on stderr
    ("predict: skipped PATH: reason") and skipped.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"predict: format {output_format!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    if polygon_tolerance < 0:
        raise ValueError(f"predict: polygon tolerance {polygon_tolerance}; expected pixels >= 0")
    class_names = list(predictor.class_names if class_names is None else class_names)
    tf.io.gfile.makedirs(output_dir)  # gfile: output_dir may be gs://...
    written, used, done = [], set(), 0
    results, images = [], []
    for index, path in enumerate(image_paths):
        try:
            image = read_image(path)
        except ValueError as e:
            print(f"predict: skipped {path}: {e}", file=sys.stderr)
            continue
        masks = "rle" if output_format == "coco_json" else "full"
        result = predictor.predict(image, score_threshold=score_threshold, masks=masks)
        if result["num_below_threshold"]:
            print(f"predict: {path}: {len(result['scores'])} detection(s) >= score_threshold {score_threshold:g}, "
                  f"{result['num_below_threshold']} below it left out", flush=True)
        done += 1
        if output_format == "coco_json":
            image_id = index + 1 if image_ids is None else image_ids[os.path.basename(path)]
            images.append({"id": image_id, "file_name": os.path.basename(path), "height": int(image.shape[0]),
                           "width": int(image.shape[1])})
            for detection, rle in zip(detections_to_json(result, class_names, score_threshold),
                                      result.get("masks_rle", [None] * len(result["scores"]))):
                detection.pop("category_name")
                if rle is not None:
                    detection["segmentation"] = rle
                results.append({"image_id": image_id, **detection})
            continue
        drawn = visualize.draw_detections(image, result["boxes"], result["classes"], result["scores"],
                                          masks=result.get("masks"), class_names=class_names,
                                          score_threshold=score_threshold)
        stem = _unique_stem(path, used)
        png_path = os.path.join(output_dir, stem + ".png")
        json_path = os.path.join(output_dir, stem + ".json")
        tf.io.write_file(png_path, tf.io.encode_png(drawn))
        detections = detections_to_json(result, class_names, score_threshold)
        if output_format == "polygons" and "masks" in result:
            for detection, mask in zip(detections, result["masks"]):
                detection["segmentation"] = polygons.mask_to_multipolygon(mask, polygon_tolerance)
        _write_json(json_path, {"image": path, "height": int(image.shape[0]), "width": int(image.shape[1]),
                                "detections": detections})
        written += [png_path, json_path]
    if output_format == "coco_json" and done:
        categories = [{"id": int(c), "name": n} for c, n in zip(predictor.category_ids, class_names)]
        for name, content in (("results.json", results),
                              ("images.json", {"images": images, "categories": categories, "annotations": []})):
            _write_json(os.path.join(output_dir, name), content)
            written.append(os.path.join(output_dir, name))
    return written, done


def _write_json(path: str, content) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(content, f, indent=1)
