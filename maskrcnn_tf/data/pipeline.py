"""tf.data input pipeline: sharded TFRecords (schema.py) -> batches of the docs/design.md section 5 contract.

`build_dataset(file_pattern, config, training, input_context=None)` yields dicts (docs/design.md section 5):
  images float32 [B, H, W, 3]; image_info float32 [B, 4, 2]; gt_boxes float32 [B, N, 4];
  gt_classes int32 [B, N]; gt_masks float32 [B, N, Mc, Mc]; has_masks int32 [B] (1/0);
  eval only: source_id int64 [B], is_valid int32 [B] (1/0).
The per-image geometry is in transforms.py (its docstring states those decisions).

Decisions (beyond docs/design.md):
- Training repeats forever (training is step based, train.total_steps); `count_records` gives the
  number of images for epochs -> steps. Evaluation is one pass.
- Sharding is per file: with an input_context of P input pipelines, pipeline i reads files i, i + P, ...
  (sorted names) and a ValueError asks for more shards when there are fewer files than pipelines. The
  batch per pipeline is input_context.get_per_replica_batch_size(global batch) (global =
  data.train_batch_size / data.eval_batch_size).
- Order of work: file shuffle -> parallel interleave of TFRecord files -> example shuffle -> decode ->
  transforms -> batch(drop_remainder=True) -> prefetch; every parallel stage uses AUTOTUNE.
- Copy-paste (training with data.copy_paste_probability > 0; transforms.py docstring): after decoding,
  each example's true extents are recorded, consecutive examples are paired with padded_batch(2,
  drop_remainder=True), transforms.transform_pair transforms each with the other as its paste source,
  and unbatch splits the pairs again; every record is still decoded once. With the switch at 0 the
  per-example path above runs unchanged.
- Determinism: with data.seed set, file and example shuffles use it, augmentation is stateless with a
  per-example seed folded from (seed, input pipeline id, example index), and tf.data keeps element
  order; the same seed gives the same batches. Without a seed, the pipeline is free to reorder
  (tf.data `deterministic=False`) for speed.
- An undecodable record (image bytes that data/image_decoding.py rejects, a mask PNG that does not decode
  or whose count or size disagrees) is never skipped silently: each record is decoded inside a
  one-element dataset with ignore_errors (TF logs its own reason as a warning), a failure becomes a
  flagged placeholder, and the next map stops iteration with InvalidArgumentError "could not decode
  record: filename ... source_id ...". A corrupt training record is a data bug, to fix at conversion.
- has_masks: True when every instance of the record has a mask PNG (vacuously True for an image
  without instances); False for box-only records (the `image/object/mask` key absent), and for every
  record when config.model.include_mask is False (masks are then not even decoded). gt_masks is zero
  whenever has_masks is False.
- Instances left out of the targets are counted process-wide: `instance_stats()` returns
  {"num_crowd", "num_unmapped", "num_vanished", "num_truncated", "num_occluded", "images_truncated"} and
  `reset_instance_stats()` zeroes them. Images with more than data.max_instances instances also log
  a warning naming the image (the first MAX_TRUNCATION_WARNINGS of them). The counts are updated by a
  small py callback that runs only for images where something was left out (crowd regions, unknown
  classes, jitter-cropped instances, > N instances (pasted ones included), instances hidden by pasted
  objects), never on the common path.
- Evaluation keeps every image: B - 1 dummy examples (is_valid False, source_id -1, zero image,
  image_info of an unscaled full-size image, gt padding) are appended before batch(drop_remainder=True),
  which pads the last batch and drops exactly the unused dummies. source_id is image/source_id parsed
  as int64 (COCO image id); a non-integer source_id stops evaluation with a message naming the record.
"""

import random
import struct
import threading
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.data import image_decoding, schema, transforms

AUTOTUNE = tf.data.AUTOTUNE
# Upper bound of TFRecord files read at once per input pipeline (each open file holds a read buffer).
MAX_INTERLEAVE_CYCLE = 16
# Warnings logged for images with more than max_instances instances: each image once per process (every
# epoch and the evaluation see it again), for at most this many images; the counters keep counting.
MAX_TRUNCATION_WARNINGS = 10
# TFRecord framing: uint64 length, uint32 length CRC, payload, uint32 payload CRC.
_TFRECORD_HEADER_BYTES = 12
_TFRECORD_FOOTER_BYTES = 4
_SOURCE_ID_PATTERN = "-?[0-9]+"
_EVAL_DUMMY_SOURCE_ID = -1
# The mapped functions use tf.cond explicitly; skipping AutoGraph's source conversion makes building a
# dataset several times faster.
_no_autograph = tf.autograph.experimental.do_not_convert


# ------------------------------------------------------------------------------------------- counters


class _InstanceStats:
    """Thread-safe process-wide counts of gt instances the pipeline left out (see module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._counts = {key: 0 for key in transforms.STAT_KEYS}
            self._counts["images_truncated"] = 0
            self._warned = set()  # file names already warned about

    def add(self, filename: bytes, counts: np.ndarray) -> np.int64:
        """py callback: counts int32 [len(STAT_KEYS)] of one image."""
        with self._lock:
            for key, value in zip(transforms.STAT_KEYS, counts.tolist()):
                self._counts[key] += int(value)
            truncated = int(counts[transforms.STAT_KEYS.index("num_truncated")])
            if truncated > 0:
                self._counts["images_truncated"] += 1
                if filename not in self._warned and len(self._warned) < MAX_TRUNCATION_WARNINGS:
                    self._warned.add(filename)
                    logging.warning("data: %s has %d more instances than data.max_instances; kept the "
                                    "largest (see pipeline.instance_stats())", filename.decode(errors="replace"),
                                    truncated)
        return np.int64(0)

    def result(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._counts)


_STATS = _InstanceStats()


def instance_stats() -> Dict[str, int]:
    """Counts since the last reset, over every dataset of this process: num_crowd (crowd instances
    excluded), num_unmapped (category id not in data.category_ids), num_vanished (cropped away by scale
    jitter), num_truncated (instances beyond data.max_instances), num_occluded (hidden by objects pasted
    on top, data.copy_paste_probability), images_truncated."""
    return _STATS.result()


def reset_instance_stats() -> None:
    _STATS.reset()


def _record_stats(filename: tf.Tensor, stats: Dict[str, tf.Tensor]) -> tf.Tensor:
    counts = tf.stack([stats[key] for key in transforms.STAT_KEYS])  # [len(STAT_KEYS)]
    return tf.cond(tf.reduce_any(counts > 0),
                   lambda: tf.numpy_function(_STATS.add, [filename, counts], tf.int64, stateful=True),
                   lambda: tf.constant(0, tf.int64))


# -------------------------------------------------------------------------------------------- files


def _match_files(file_pattern) -> List[str]:
    patterns = [file_pattern] if isinstance(file_pattern, str) else list(file_pattern)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise ValueError(f"data: no files match {file_pattern!r}")
    return files


def count_records(file_pattern) -> int:
    """Number of records in the files matching file_pattern (a glob or a list of globs).

    Walks the TFRecord framing (12-byte header, seek over the payload) without reading or parsing the
    payloads: cheap even for COCO's 118k images. Raises ValueError for no match or a truncated file.
    """
    total = 0
    for path in _match_files(file_pattern):
        size = tf.io.gfile.stat(path).length
        with tf.io.gfile.GFile(path, "rb") as f:
            position = 0
            while position < size:
                header = f.read(_TFRECORD_HEADER_BYTES)
                if len(header) < _TFRECORD_HEADER_BYTES:
                    raise ValueError(f"data: {path} is truncated at byte {position}")
                (length,) = struct.unpack("<Q", header[:8])
                position += _TFRECORD_HEADER_BYTES + length + _TFRECORD_FOOTER_BYTES
                if position > size:
                    raise ValueError(f"data: {path} is truncated (record ends at byte {position} > {size})")
                f.seek(position)
                total += 1
    return total


def records_have_masks(file_pattern) -> bool:
    """Whether the dataset carries masks, from its first record (a converter writes the mask key for
    every record of a dataset with masks, none for a box-only one such as the TXT converter's)."""
    for path in _match_files(file_pattern):
        for serialized in tf.data.TFRecordDataset(path).take(1):
            return schema.MASK in tf.train.Example.FromString(serialized.numpy()).features.feature
    return False


def count_training_records(file_pattern) -> int:
    """count_records, but zero records is a ValueError naming the pattern: a training pipeline repeats
    forever, and repeating an empty dataset never yields a batch (the run would hang)."""
    total = count_records(file_pattern)
    if total == 0:
        raise ValueError(f"data: no records in {file_pattern!r} (every matching file is empty)")
    return total


# ------------------------------------------------------------------------------------------- decode


def _decode(parsed: Dict[str, tf.Tensor], include_mask: bool) -> Dict[str, tf.Tensor]:
    """Parsed record (schema.parse_example) -> decoded example (transforms.py docstring) + metadata."""
    image = image_decoding.decode_image(parsed["encoded"])  # uint8 [h, w, 3], JPEG with the accurate IDCT
    image_hw = tf.shape(image)[:2]
    num_instances = tf.shape(parsed["labels"])[0]
    num_masks = tf.shape(parsed["png_masks"])[0]
    has_masks = tf.equal(num_masks, num_instances) & include_mask
    checks = [tf.debugging.assert_equal(
        (num_masks == 0) | (num_masks == num_instances), True,
        message="record has a mask count different from its instance count")]

    def decode_masks():
        masks = tf.map_fn(lambda png: tf.io.decode_png(png, channels=1)[..., 0], parsed["png_masks"],
                          fn_output_signature=tf.TensorSpec([None, None], tf.uint8))  # [n, hm, wm]
        with tf.control_dependencies([tf.debugging.assert_equal(tf.shape(masks)[1:3], image_hw,
                                                                 message="mask size differs from image size")]):
            # PNGs may store 0/1 (ours) or 0/255 (other writers): binarise.
            return tf.cast(masks > 0, tf.uint8)

    def no_masks():
        return tf.zeros([num_instances, 1, 1], tf.uint8)  # [n, 1, 1] placeholder, cropped to zeros

    with tf.control_dependencies(checks):
        masks = tf.cond(has_masks & (num_instances > 0), decode_masks, no_masks)
    scale = tf.tile(tf.cast(image_hw, tf.float32), [2])  # [4]
    return {
        "image": image,
        "boxes": parsed["boxes_norm"] * scale,  # [n, 4] original pixels
        "classes": parsed["labels"],
        "is_crowd": parsed["is_crowd"] > 0,
        "masks": masks,
        "has_masks": has_masks,
        "filename": parsed["filename"],
        "source_id": parsed["source_id"],
        "decoded": tf.constant(True),
    }


def _placeholder(parsed: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Same structure as `_decode`, flagged decoded=False, for a record whose decoding failed."""
    return {
        "image": tf.zeros([1, 1, 3], tf.uint8),
        "boxes": tf.zeros([0, 4], tf.float32),
        "classes": tf.zeros([0], tf.int64),
        "is_crowd": tf.zeros([0], tf.bool),
        "masks": tf.zeros([0, 1, 1], tf.uint8),
        "has_masks": tf.constant(False),
        "filename": parsed["filename"],
        "source_id": parsed["source_id"],
        "decoded": tf.constant(False),
    }


def _decode_or_flag(parsed: Dict[str, tf.Tensor], include_mask: bool) -> tf.data.Dataset:
    """A one-element dataset: the decoded record, or the flagged placeholder when decoding failed."""
    one = tf.data.Dataset.from_tensors(parsed)
    decoded = one.map(_no_autograph(lambda p: _decode(p, include_mask))).ignore_errors(log_warning=True)
    return decoded.concatenate(one.map(_no_autograph(_placeholder))).take(1)


def _assert_decoded(example: Dict[str, tf.Tensor]) -> tf.Operation:
    return tf.debugging.Assert(example["decoded"], ["could not decode record: filename", example["filename"],
                                                    "source_id", example["source_id"],
                                                    "(the warning just above gives TF's reason)"])


# ---------------------------------------------------------------------------------------- the dataset


def build_dataset(file_pattern, config: config_lib.Config, training: bool,
                  input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
    """Batches of the contract (module docstring) from TFRecords matching file_pattern.

    Args:
      file_pattern: a glob (or a list of globs) of TFRecord files in the schema.py format.
      config: config.Config (validated here); reads model.image_size, model.pixel_mean/std,
        model.num_classes, model.include_mask and data.*.
      training: True = augmented, shuffled, repeated forever, dict without source_id / is_valid;
        False = one pass in file order, last batch padded with is_valid False examples.
      input_context: from strategy.distribute_datasets_from_function; None = one input pipeline, one
        replica.
    Raises:
      ValueError: no file matches, fewer files than input pipelines, or a batch that does not divide
        over the replicas.
    """
    config_lib.validate(config)
    model_cfg, data_cfg = config.model, config.data
    files = _match_files(file_pattern)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    if len(files) < num_pipelines:
        raise ValueError(f"data: {file_pattern!r} matches {len(files)} files but there are {num_pipelines} "
                         "input pipelines; write at least one shard per pipeline")
    global_batch = data_cfg.train_batch_size if training else data_cfg.eval_batch_size
    batch_size = input_context.get_per_replica_batch_size(global_batch) if input_context else global_batch
    seed = data_cfg.seed
    deterministic = seed is not None or not training
    # Stateless augmentation needs some seed: without data.seed a fresh one per build (not reproducible).
    base_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    pipeline_seed = tf.random.experimental.stateless_fold_in(tf.constant([base_seed, 0], tf.int64),
                                                             pipeline_id)  # [2]

    dataset = tf.data.Dataset.from_tensor_slices(files).shard(num_pipelines, pipeline_id)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    cycle_length = min(-(-len(files) // num_pipelines), MAX_INTERLEAVE_CYCLE)
    dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=cycle_length, num_parallel_calls=AUTOTUNE,
                                 deterministic=deterministic)
    if training:
        dataset = dataset.shuffle(data_cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(_no_autograph(schema.parse_example), num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    dataset = dataset.interleave(_no_autograph(lambda p: _decode_or_flag(p, model_cfg.include_mask)),
                                 cycle_length=AUTOTUNE,
                                 num_parallel_calls=AUTOTUNE, deterministic=deterministic)

    category_ids = data_cfg.category_ids or tuple(range(1, model_cfg.num_classes + 1))
    transform_kwargs = dict(output_size=tuple(model_cfg.image_size), mask_size=data_cfg.gt_mask_size,
                            max_instances=data_cfg.max_instances, category_ids=category_ids,
                            pixel_mean=model_cfg.pixel_mean, pixel_std=model_cfg.pixel_std,
                            resize_mode=model_cfg.resize_mode, resize_short_side=model_cfg.resize_short_side,
                            resize_max_long_side=model_cfg.resize_max_long_side)
    if training:
        transform_kwargs.update(flip_probability=data_cfg.flip_probability, scale_range=data_cfg.scale_jitter)

    @_no_autograph
    def transform(index, example):
        with tf.control_dependencies([_assert_decoded(example)]):
            example_seed = tf.random.experimental.stateless_fold_in(pipeline_seed, index)  # [2]
            features, stats = transforms.transform_example(example, seed=example_seed, **transform_kwargs)
        with tf.control_dependencies([_record_stats(example["filename"], stats)]):
            # Flags are int32 1/0, not bool: Keras fit under a MirroredStrategy MEAN-reduces a batch
            # to build the model and fails on bool tensors.
            features["has_masks"] = tf.cast(features["has_masks"], tf.int32)
        if not training:
            features["source_id"] = _parse_source_id(example)
            features["is_valid"] = tf.constant(1, tf.int32)
        return features

    copy_paste = training and data_cfg.copy_paste_probability > 0
    if not copy_paste:
        dataset = dataset.enumerate().map(transform, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    else:
        dataset = _paired_transforms(dataset, pipeline_seed, transform_kwargs, data_cfg.copy_paste_probability,
                                     deterministic)
    if not training:
        dummy = _eval_dummy(dataset.element_spec, tuple(model_cfg.image_size))
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(dummy).repeat(batch_size - 1))
    dataset = dataset.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE,
                            deterministic=deterministic)
    dataset = dataset.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options)


# Keys of a decoded example that transforms.py reads, and the ones padded_batch pads (with their true
# extents recorded first, so each example can be cut back out of its pair).
_PAIR_KEYS = ("image", "boxes", "classes", "is_crowd", "masks", "has_masks", "filename", "source_id", "decoded")


def _paired_transforms(dataset: tf.data.Dataset, pipeline_seed: tf.Tensor, transform_kwargs, probability: float,
                       deterministic: bool) -> tf.data.Dataset:
    """Training with copy-paste: consecutive decoded examples are paired (each record decoded once), each
    is transformed with the other as its paste source (transforms.transform_pair), and the pairs are
    split again. Example seeds are the per-example path's (pipeline seed folded with the example index),
    so an example that draws no paste is transformed exactly as without copy-paste."""

    @_no_autograph
    def with_extents(index, example):
        example = {key: example[key] for key in _PAIR_KEYS}
        example["index"] = index
        example["image_hw"] = tf.shape(example["image"])[:2]
        example["mask_shape"] = tf.shape(example["masks"])  # [3] (n, hm, wm)
        return example

    def member(pair, i):
        h, w = tf.unstack(pair["image_hw"][i])
        n, hm, wm = tf.unstack(pair["mask_shape"][i])
        example = {key: pair[key][i] for key in ("has_masks", "filename", "source_id", "decoded")}
        example.update(image=pair["image"][i, :h, :w], boxes=pair["boxes"][i, :n], classes=pair["classes"][i, :n],
                       is_crowd=pair["is_crowd"][i, :n], masks=pair["masks"][i, :n, :hm, :wm])
        return example

    @_no_autograph
    def transform_pair(pair):
        examples = [member(pair, 0), member(pair, 1)]
        with tf.control_dependencies([_assert_decoded(e) for e in examples]):
            seeds = [tf.random.experimental.stateless_fold_in(pipeline_seed, pair["index"][i]) for i in range(2)]
            outputs = transforms.transform_pair(*examples, seeds=seeds, copy_paste_probability=probability,
                                                **transform_kwargs)
        features = []
        for example, (example_features, stats) in zip(examples, outputs):
            with tf.control_dependencies([_record_stats(example["filename"], stats)]):
                example_features["has_masks"] = tf.cast(example_features["has_masks"], tf.int32)
            features.append(example_features)
        return {key: tf.stack([f[key] for f in features]) for key in features[0]}  # each [2, ...]

    dataset = dataset.enumerate().map(with_extents, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    dataset = dataset.padded_batch(2, drop_remainder=True)
    dataset = dataset.map(transform_pair, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return dataset.unbatch()


def _parse_source_id(example: Dict[str, tf.Tensor]) -> tf.Tensor:
    source_id = example["source_id"]
    check = tf.debugging.Assert(tf.strings.regex_full_match(source_id, _SOURCE_ID_PATTERN),
                                ["evaluation needs an integer image/source_id: filename", example["filename"],
                                 "source_id", source_id])
    with tf.control_dependencies([check]):
        return tf.strings.to_number(source_id, out_type=tf.int64)


def _eval_dummy(element_spec: Dict[str, tf.TensorSpec], image_size) -> Dict[str, tf.Tensor]:
    """A padding example for the last eval batch: zeros / gt padding, is_valid False."""
    dummy = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}
    dummy["gt_boxes"] = -tf.ones(element_spec["gt_boxes"].shape, tf.float32)
    dummy["gt_classes"] = -tf.ones(element_spec["gt_classes"].shape, tf.int32)
    size = tf.constant(image_size, tf.float32)  # [2]
    # An unscaled full-size image: mapping boxes back through it never divides by zero.
    dummy["image_info"] = tf.stack([size, size, tf.ones([2]), tf.zeros([2])])  # [4, 2]
    dummy["source_id"] = tf.constant(_EVAL_DUMMY_SOURCE_ID, tf.int64)
    dummy["is_valid"] = tf.constant(0, tf.int32)
    return dummy
