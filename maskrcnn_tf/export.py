"""SavedModel export: a tf.Module with serving signatures around the Keras MaskRCNN (docs/design.md section 7).

Signatures (all outputs are batched, D = cfg.model.detection.max_detections):

    serving_default(images: string [None])            encoded image bytes (JPEG, PNG, GIF, BMP, WebP,
                                                      JPEG XL; data/image_decoding.py), any size
    image_tensor(images: uint8 [None, None, None, 3]) RGB images of one common size
    serving_box_masks(images: string [None])          as serving_default, without detection_masks_pasted
    image_tensor_box_masks(images: uint8 [...])       as image_tensor, without detection_masks_pasted
    metadata()                                        class names, category ids, config JSON

    -> num_detections        int32   [B]
       detection_boxes       float32 [B, D, 4]  [y1, x1, y2, x2] ORIGINAL image pixels, clipped to the
                                                image; rows >= num_detections are -1
       detection_scores      float32 [B, D]
       detection_classes     int32   [B, D]     DATASET category ids (cfg.data.category_ids), 0 = padding
       detection_masks       float32 [B, D, M, M] mask probabilities in the box (M = 28)
       detection_masks_pasted uint8  [B, D, H, W] 0/1 (only with include_pasted_masks), H, W = the
                                                largest original size of the batch; 0 outside each
                                                image's own extent (only for include_mask models)
An empty batch (B = 0) gives empty outputs of these shapes (H = W = 0).

Memory: the box-local outputs cost B x D x (M x M + 6) x 4 bytes. detection_masks_pasted costs B x D x H x W
bytes of output, and pasting holds up to twice that (the pasted rows, then the stacked output) plus one
float32 H x W buffer; the *_box_masks signatures skip it (clients paste the 28 x 28 masks into their
boxes themselves, e.g. with ops/masks.paste_masks).

Decisions:
- Preprocessing is the evaluation pipeline's, built from the same functions (data/transforms.py):
  `resize_geometry` without jitter, `normalize_image` then `resize_and_crop_image` (normalise before
  resize, as the pipeline does), zero padding bottom/right to cfg.model.image_size. So an exported model
  sees exactly the pixels evaluation sees.
- Each image is preprocessed on its own inside `tf.map_fn` (images of different sizes in one request
  become one fixed-size batch); decoding runs on the CPU as in Model Garden's export_base (GPU servers
  have no JPEG decoder kernels, and it keeps the accelerator free).
- Bytes that are not an image are caught before decoding by their magic number so the error names the
  problem ("input i is not a decodable image"); TF's own decoder message would only say "Unknown image
  file format". Truncated files with a valid header still fail in the decoder with TF's message.
- Back-mapping inverts the pipeline's resize exactly as evaluation/coco_results.map_boxes_to_original
  does: (box + offset) / scale, then clip to the original (h, w). Expressed in TF here because the
  NumPy version cannot run inside the graph.
- Pasted masks use ops/masks.paste_masks with the back-mapped boxes (no second resampling) and the
  evaluation threshold (>= 0.5). Pasting runs one detection at a time (tf.map_fn, one iteration in
  flight), thresholding to uint8 at once, so the float buffer is one H x W image, not D x H x W: at a
  4000 x 3000 photo and D = 100 that is 48 MB instead of 4.8 GB. The uint8 output itself is
  B x D x H x W; clients that cannot afford it use the *_box_masks signatures (or export with
  include_pasted_masks=False).
- The model (the _detect function) is traced once and shared by every serving signature; pasting is a
  separate step after it.
- Class names, category ids and the config JSON are returned by a constant `metadata` signature, so a
  server (or `saved_model_cli`) can show names without any file besides the SavedModel.
- The graph has no Python control flow on tensors, so the functions are traced with autograph=False
  (faster tracing, no AutoGraph conversion warnings).
- Keras 3 layers held in Python lists are invisible to TF's object graph (run_dir.py), so the module
  tracks `model.variables` explicitly (as keras.export.ExportArchive does); the Keras model itself is
  kept out of the object graph (only the traced functions and the variables are saved).
"""

import json
import logging

import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.data import image_decoding, transforms
from maskrcnn_tf.ops import masks as mask_ops

# A pasted mask pixel is foreground at probability >= this (one threshold for the package).
MASK_THRESHOLD = config_lib.MASK_THRESHOLD
# image_info rows (data pipeline contract).
_ORIGINAL_SIZE, _SCALE, _OFFSET = 0, 2, 3
# Leading bytes of the formats tf.io.decode_image reads besides JPEG (checked with tf.io.is_jpeg):
# PNG, GIF, BMP, JPEG XL (bare codestream and ISO container). WebP is "RIFF" + size + "WEBP" (_is_image).
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"\xff\x0a",
                b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a")
_WEBP_RIFF, _WEBP_TAG, _WEBP_TAG_OFFSET = b"RIFF", b"WEBP", 8
_PADDING_BOX = -1.0
NOT_AN_IMAGE = "is not a decodable image (JPEG, PNG, GIF, BMP, WebP or JPEG XL expected)"
SIGNATURE_BYTES = "serving_default"
SIGNATURE_TENSOR = "image_tensor"
SIGNATURE_BYTES_BOX_MASKS = "serving_box_masks"
SIGNATURE_TENSOR_BOX_MASKS = "image_tensor_box_masks"
SIGNATURE_METADATA = "metadata"
# Detections pasted at a time: one bounds the float32 buffer to H x W.
_PASTE_PARALLEL_ITERATIONS = 1


def _is_image(encoded: tf.Tensor) -> tf.Tensor:
    """bool []: string [] starts like one of the formats tf.io.decode_image reads."""
    known = [tf.equal(tf.strings.substr(encoded, 0, len(magic)), magic) for magic in _IMAGE_MAGIC]
    # substr fails when the start lies beyond the string: pad short inputs before reading at an offset.
    padded = tf.strings.join([encoded, b"\0" * (_WEBP_TAG_OFFSET + len(_WEBP_TAG))])
    webp = (tf.equal(tf.strings.substr(encoded, 0, len(_WEBP_RIFF)), _WEBP_RIFF)
            & tf.equal(tf.strings.substr(padded, _WEBP_TAG_OFFSET, len(_WEBP_TAG)), _WEBP_TAG))
    return tf.reduce_any(tf.stack([tf.io.is_jpeg(encoded), webp] + known))


def decode_image(encoded: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """string [] encoded image (index int32 [] for the error message) -> uint8 [h, w, 3] RGB.

    Raises InvalidArgumentError "input <index> is not a decodable image ..." for other bytes.
    """
    check = tf.debugging.Assert(_is_image(encoded), [f"{SIGNATURE_BYTES}: input", index, NOT_AN_IMAGE])
    with tf.control_dependencies([check]):
        # JPEG with the accurate IDCT (PIL's pixels); a GIF gives its first frame.
        return image_decoding.decode_image(encoded)


def preprocess_image(image: tf.Tensor, cfg: config_lib.Config):
    """uint8 RGB [h, w, 3] -> (float32 [H, W, 3] normalised, resized, zero-padded model input,
    image_info float32 [4, 2]); H, W = cfg.model.image_size. Same steps as the evaluation pipeline."""
    height, width = cfg.model.image_size
    no_jitter = (1.0, 1.0)
    image_info = transforms.resize_geometry(tf.shape(image)[:2], (height, width), no_jitter,
                                            seed=tf.zeros([2], tf.int64), mode=cfg.model.resize_mode,
                                            short_side=cfg.model.resize_short_side,
                                            max_long_side=cfg.model.resize_max_long_side)
    normalized = transforms.normalize_image(image, cfg.model.pixel_mean, cfg.model.pixel_std)
    resized = transforms.resize_and_crop_image(normalized, image_info)  # [valid_h, valid_w, 3]
    padded = tf.image.pad_to_bounding_box(resized, 0, 0, height, width)  # [H, W, 3]
    return tf.ensure_shape(padded, [height, width, 3]), image_info


def boxes_to_original(boxes: tf.Tensor, image_info: tf.Tensor) -> tf.Tensor:
    """boxes float32 [B, D, 4] [y1, x1, y2, x2] pixels of the padded model input, image_info [B, 4, 2]
    -> [B, D, 4] pixels of the original images, clipped to [0, h] x [0, w] (TF twin of
    evaluation/coco_results.map_boxes_to_original)."""
    scale = tf.tile(image_info[:, _SCALE], [1, 2])[:, None, :]  # [B, 1, 4] (sy, sx, sy, sx)
    offset = tf.tile(image_info[:, _OFFSET], [1, 2])[:, None, :]  # [B, 1, 4]
    upper = tf.tile(image_info[:, _ORIGINAL_SIZE], [1, 2])[:, None, :]  # [B, 1, 4] (h, w, h, w)
    return tf.clip_by_value((boxes + offset) / scale, 0.0, upper)


def _paste_one_detection(args, height, width):
    """(mask [M, M], box [4] original pixels, original_hw float [2]) -> uint8 [H, W] 0/1."""
    mask, box, original_hw = args

    def paste():
        pasted = mask_ops.paste_masks(mask[None, None], box[None, None], (height, width))[0, 0]  # [H, W]
        # Pixels beyond this image's own extent (other images of the batch are larger) stay 0.
        hw = tf.cast(tf.round(original_hw), tf.int32)
        inside_rows = tf.range(height) < hw[0]  # [H]
        inside_cols = tf.range(width) < hw[1]  # [W]
        inside = inside_rows[:, None] & inside_cols[None, :]  # [H, W]
        return tf.cast((pasted >= MASK_THRESHOLD) & inside, tf.uint8)  # [H, W]

    # Padding rows (box -1) and other empty boxes paste to zeros: skip their H x W work.
    has_area = (box[2] > box[0]) & (box[3] > box[1])
    return tf.cond(has_area, paste, lambda: tf.zeros([height, width], tf.uint8))


def paste_detections(masks: tf.Tensor, boxes: tf.Tensor, original_hw: tf.Tensor) -> tf.Tensor:
    """masks float32 [B, D, M, M], boxes [B, D, 4] original pixels, original_hw float32 [B, 2]
    -> uint8 [B, D, H, W] 0/1 at the largest original size of the batch (module docstring)."""
    shape = tf.shape(masks)
    batch, detections, mask_size = shape[0], shape[1], shape[2]
    # max(.., 0): an empty batch gives H = W = 0 (reduce_max of nothing is -inf).
    largest = tf.cast(tf.round(tf.maximum(tf.reduce_max(original_hw, axis=0), 0.0)), tf.int32)  # [2]
    flat = (tf.reshape(masks, [-1, mask_size, mask_size]), tf.reshape(boxes, [-1, 4]),
            tf.repeat(original_hw, detections, axis=0))  # [B * D, M, M], [B * D, 4], [B * D, 2]

    def paste_all():
        return tf.map_fn(lambda args: _paste_one_detection(args, largest[0], largest[1]), flat,
                         fn_output_signature=tf.TensorSpec([None, None], tf.uint8),
                         parallel_iterations=_PASTE_PARALLEL_ITERATIONS)  # [B * D, H, W]

    # Stacking zero results of an unknown shape fails inside map_fn: no detection, no pasting.
    pasted = tf.cond(batch * detections > 0, paste_all, lambda: tf.zeros([0, largest[0], largest[1]], tf.uint8))
    return tf.reshape(pasted, tf.concat([[batch, detections], largest], axis=0))  # [B, D, H, W]


class ServingModule(tf.Module):
    """The exported object: Keras MaskRCNN + preprocessing + back-mapping, three tf.functions.

    Also used in-process by predictor.Predictor.from_model_dir, so the Keras and the SavedModel paths run
    the same graph code.
    """

    def __init__(self, model, cfg: config_lib.Config, include_pasted_masks: bool = True):
        super().__init__(name="mask_rcnn_serving")
        config_lib.validate(cfg)
        self._cfg = cfg
        self._include_pasted_masks = bool(include_pasted_masks) and cfg.model.include_mask
        # Hidden from tracking: the functions below capture its variables, which are tracked here.
        self._model_holder = (lambda: model)
        self.model_variables = list(model.variables)
        # Contiguous class c -> dataset id lookup[c]; index 0 (padding) stays 0.
        category_ids = cfg.data.category_ids or tuple(range(1, cfg.model.num_classes + 1))
        self._category_lookup = tf.constant((0,) + tuple(category_ids), tf.int32)  # [K + 1]
        self._metadata = {
            "class_names": tf.constant(list(cfg.data.class_names) or [str(i) for i in category_ids],
                                       tf.string),  # [K]
            "category_ids": tf.constant(category_ids, tf.int32),  # [K]
            "config_json": tf.constant(json.dumps(config_lib.to_dict(cfg))),
        }
        # One tf.function with a fixed signature shared by both serving signatures: the Keras model is
        # traced (and stored in the SavedModel) once, not once per signature, which halves export time.
        height, width = cfg.model.image_size
        self._detect_fn = tf.function(self._detect, autograph=False, input_signature=[
            tf.TensorSpec([None, height, width, 3], tf.float32), tf.TensorSpec([None, 4, 2], tf.float32)])

    # ----------------------------------------------------------------------------- signatures

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")], autograph=False)
    def serve_bytes(self, images):
        """string [B] encoded images of any sizes -> the output dict of the module docstring."""
        return self._with_pasted_masks(*self._detect_or_empty(*self._preprocess_bytes(images)))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
                 autograph=False)
    def serve_tensor(self, images):
        """uint8 RGB [B, h, w, 3] (one size for the batch) -> the output dict of the module docstring."""
        return self._with_pasted_masks(*self._detect_or_empty(*self._preprocess_tensor(images)))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")], autograph=False)
    def serve_bytes_box_masks(self, images):
        """As serve_bytes, without detection_masks_pasted (memory independent of the image size)."""
        return self._detect_or_empty(*self._preprocess_bytes(images))[0]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
                 autograph=False)
    def serve_tensor_box_masks(self, images):
        """As serve_tensor, without detection_masks_pasted."""
        return self._detect_or_empty(*self._preprocess_tensor(images))[0]

    @tf.function(input_signature=[], autograph=False)
    def metadata(self):
        """{"class_names": string [K], "category_ids": int32 [K], "config_json": string []}."""
        return dict(self._metadata)

    # ------------------------------------------------------------------------------- the graph

    def _preprocess_bytes(self, images):
        """string [B] -> (float32 [B, H, W, 3] model inputs, image_info [B, 4, 2])."""
        def decode_and_preprocess(args):
            encoded, index = args
            return preprocess_image(decode_image(encoded, index), self._cfg)

        with tf.device("/cpu:0"):
            indices = tf.range(tf.shape(images)[0])
            return tf.map_fn(
                decode_and_preprocess, (images, indices),
                fn_output_signature=(tf.TensorSpec(list(self._cfg.model.image_size) + [3], tf.float32),
                                     tf.TensorSpec([4, 2], tf.float32)))  # [B, H, W, 3], [B, 4, 2]

    def _preprocess_tensor(self, images):
        """uint8 [B, h, w, 3] -> (float32 [B, H, W, 3] model inputs, image_info [B, 4, 2])."""
        return tf.map_fn(
            lambda image: preprocess_image(image, self._cfg), images,
            fn_output_signature=(tf.TensorSpec(list(self._cfg.model.image_size) + [3], tf.float32),
                                 tf.TensorSpec([4, 2], tf.float32)))  # [B, H, W, 3], [B, 4, 2]

    def _detect_or_empty(self, inputs, image_info):
        """_detect_fn, or its outputs with zero rows for an empty batch (the model cannot run on none)."""
        outputs = self._detect_fn.get_concrete_function().structured_outputs[0]  # static but for B

        def empty():
            return {k: tf.zeros([0] + t.shape[1:].as_list(), t.dtype) for k, t in outputs.items()}, image_info

        return tf.cond(tf.shape(inputs)[0] > 0, lambda: self._detect_fn(inputs, image_info), empty)

    def _with_pasted_masks(self, result, image_info):
        """Adds detection_masks_pasted to _detect's result when the module pastes."""
        if self._include_pasted_masks:
            result = dict(result, detection_masks_pasted=paste_detections(
                result["detection_masks"], result["detection_boxes"], image_info[:, _ORIGINAL_SIZE]))
        return result

    def _detect(self, inputs, image_info):
        """Model + back-mapping on preprocessed inputs float32 [B, H, W, 3] and image_info [B, 4, 2]
        -> (the output dict without detection_masks_pasted, image_info)."""
        outputs = self._model_holder()({"images": inputs, "image_info": image_info}, training=False)
        num = outputs["num_detections"]  # [B]
        max_detections = tf.shape(outputs["detection_scores"])[1]
        is_detection = tf.range(max_detections)[None, :] < num[:, None]  # [B, D]
        boxes = boxes_to_original(outputs["detection_boxes"], image_info)  # [B, D, 4]
        boxes = tf.where(is_detection[..., None], boxes, _PADDING_BOX)
        classes = tf.where(is_detection, outputs["detection_classes"], 0)
        result = {
            "num_detections": tf.cast(num, tf.int32),
            "detection_boxes": boxes,
            "detection_scores": tf.where(is_detection, outputs["detection_scores"], 0.0),
            "detection_classes": tf.gather(self._category_lookup, classes),  # [B, D] dataset ids
        }
        if "detection_masks" in outputs:
            masks = tf.where(is_detection[..., None, None], outputs["detection_masks"], 0.0)  # [B, D, M, M]
            result["detection_masks"] = masks
        return result, image_info

    def signatures(self) -> dict:
        return {
            SIGNATURE_BYTES: self.serve_bytes.get_concrete_function(),
            SIGNATURE_TENSOR: self.serve_tensor.get_concrete_function(),
            SIGNATURE_BYTES_BOX_MASKS: self.serve_bytes_box_masks.get_concrete_function(),
            SIGNATURE_TENSOR_BOX_MASKS: self.serve_tensor_box_masks.get_concrete_function(),
            SIGNATURE_METADATA: self.metadata.get_concrete_function(),
        }


def export_saved_model(model, cfg: config_lib.Config, export_dir: str, include_pasted_masks: bool = True) -> str:
    """Writes a SavedModel of `model` (a built MaskRCNN of `cfg`) with the signatures of the module
    docstring into export_dir (created; an existing SavedModel there is overwritten). Returns export_dir.
    """
    module = ServingModule(model, cfg, include_pasted_masks=include_pasted_masks)
    tf.io.gfile.makedirs(export_dir)  # gfile: export_dir may be gs://...
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_drop_renamed_inputs_note)
    try:
        tf.saved_model.save(module, export_dir, signatures=module.signatures())
    finally:
        absl_logger.removeFilter(_drop_renamed_inputs_note)
    return export_dir


def _drop_renamed_inputs_note(record: logging.LogRecord) -> bool:
    """Logging filter: False for TF's INFO note that a signature's inputs "with unsupported characters"
    get new names. Those inputs are the captured variables (numbered, renamed unknown_N), one note per
    signature listing all of them: noise to a user, while the real input, `images`, keeps its name."""
    return "with unsupported characters which will be renamed" not in record.getMessage()
