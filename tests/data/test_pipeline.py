"""pipeline.build_dataset on small records written into tmp_path with schema.build_example.

Images are PNG (lossless) so pixel colours can be checked exactly; 64x64 / 128x128 model inputs.
"""
import cv2
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.data import pipeline, schema
from tests.conftest import STANDIN_SHAPES

IMAGE_SIZE = (64, 64)
MAX_INSTANCES = 4
MASK_SIZE = 16
BATCH = 2


def _config(**overrides):
    cfg = config_lib.replace(config_lib.get_preset("tiny"), **{
        "model.image_size": IMAGE_SIZE, "data.max_instances": MAX_INSTANCES, "data.gt_mask_size": MASK_SIZE,
        "data.train_batch_size": BATCH, "data.eval_batch_size": BATCH, "data.shuffle_buffer": 8,
        "model.pixel_mean": (0.0, 0.0, 0.0), "model.pixel_std": (1.0, 1.0, 1.0)})
    return config_lib.replace(cfg, **overrides)


def _record(source_id, boxes_xyxy, labels=None, height=48, width=40, masks=True, crowd=None, encoded=None):
    """One record: grey image with each box (x1, y1, x2, y2 pixels) filled in its own colour and a
    rectangle mask per box."""
    n = len(boxes_xyxy)
    image = np.full((height, width, 3), 20, np.uint8)
    mask_arrays = np.zeros((n, height, width), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes_xyxy):
        image[y1:y2, x1:x2] = (40 + 20 * i, 200, 100)
        mask_arrays[i, y1:y2, x1:x2] = 1
    if encoded is None:
        encoded = cv2.imencode(".png", image[..., ::-1])[1].tobytes()  # cv2 writes BGR
    boxes_norm = np.asarray(boxes_xyxy, np.float64).reshape(n, 4) / [width, height, width, height]
    return schema.build_example(
        encoded=encoded, image_format="png", height=height, width=width, filename=f"img_{source_id}.png",
        source_id=str(source_id), boxes_norm_xyxy=boxes_norm, labels=[1] * n if labels is None else labels,
        texts=["shape"] * n, is_crowd=[0] * n if crowd is None else crowd, areas=[1.0] * n,
        png_masks=[schema.encode_png_mask(m) for m in mask_arrays] if masks else None)


def _write(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return str(path)


def _numpy(batch):
    return {key: value.numpy() for key, value in batch.items()}


TRAIN_SPEC = {
    "images": ((BATCH, *IMAGE_SIZE, 3), np.float32),
    "image_info": ((BATCH, 4, 2), np.float32),
    "gt_boxes": ((BATCH, MAX_INSTANCES, 4), np.float32),
    "gt_classes": ((BATCH, MAX_INSTANCES), np.int32),
    "gt_masks": ((BATCH, MAX_INSTANCES, MASK_SIZE, MASK_SIZE), np.float32),
    "has_masks": ((BATCH,), np.int32),
}
EVAL_SPEC = {**TRAIN_SPEC, "source_id": ((BATCH,), np.int64), "is_valid": ((BATCH,), np.int32)}


def _check_spec(dataset, spec):
    # Static shapes (element_spec) and the values' shapes and dtypes, exactly as docs/design.md section 5 says.
    assert set(dataset.element_spec) == set(spec)
    for key, (shape, dtype) in spec.items():
        assert tuple(dataset.element_spec[key].shape) == shape, key
        assert dataset.element_spec[key].dtype == tf.as_dtype(dtype), key


def test_training_batches_follow_the_contract_with_zero_and_too_many_instances(tmp_path):
    many = [(2 * i, 2 * i, 2 * i + side, 2 * i + side) for i, side in enumerate([6, 30, 8, 20, 12, 24, 4])]
    path = _write(tmp_path / "train.tfrecord", [_record(1, []), _record(2, many)])
    pipeline.reset_instance_stats()
    dataset = pipeline.build_dataset(path, _config(**{"data.seed": 3, "data.flip_probability": 0.0}),
                                     training=True)
    _check_spec(dataset, TRAIN_SPEC)
    batches = [_numpy(b) for b in dataset.take(3)]  # training repeats: 3 batches from 2 records
    empty_seen = many_seen = False
    # The 48-px height fits the 64-px input; the width becomes round(40 * 64 / 48) = 53.
    scale = np.array([64 / 48, 53 / 40, 64 / 48, 53 / 40])
    for batch in batches:
        for key, (shape, dtype) in TRAIN_SPEC.items():
            assert batch[key].shape == shape and batch[key].dtype == dtype, key
        for i in range(BATCH):
            if batch["gt_classes"][i, 0] == -1:  # the record with no instance: pure padding
                empty_seen = True
                assert np.all(batch["gt_boxes"][i] == -1) and not batch["gt_masks"][i].any()
            else:
                many_seen = True
                # The 4 largest sides are 30, 20, 24, 12 (record indices 1, 3, 5, 4), kept in record order.
                kept = np.array([many[j] for j in (1, 3, 4, 5)], np.float64)[:, [1, 0, 3, 2]] * scale  # yxyx
                np.testing.assert_allclose(batch["gt_boxes"][i], kept, atol=1e-4)
    assert empty_seen and many_seen
    assert pipeline.instance_stats()["num_truncated"] >= 3  # 7 - 4 per image with too many instances


def test_eval_pads_the_last_batch_and_keeps_source_ids(tmp_path):
    path = _write(tmp_path / "val.tfrecord", [_record(100 + i, [(4, 4, 20, 20)]) for i in range(5)])
    dataset = pipeline.build_dataset(path, _config(), training=False)
    _check_spec(dataset, EVAL_SPEC)
    batches = [_numpy(b) for b in dataset]
    assert len(batches) == 3  # ceil(5 / 2)
    np.testing.assert_array_equal(np.concatenate([b["source_id"] for b in batches]), [100, 101, 102, 103, 104, -1])
    np.testing.assert_array_equal(np.concatenate([b["is_valid"] for b in batches]), [True] * 5 + [False])
    last = batches[-1]
    assert np.all(last["gt_boxes"][1] == -1) and np.all(last["gt_classes"][1] == -1)
    assert not last["images"][1].any() and not last["has_masks"][1]
    np.testing.assert_allclose(last["image_info"][0], [[48, 40], [64, 53], [64 / 48, 53 / 40], [0, 0]], rtol=1e-6)
    # No augmentation in eval: the box is the record's box times the scale.
    np.testing.assert_allclose(last["gt_boxes"][0, 0], np.array([4, 4, 20, 20]) * np.tile([64 / 48, 53 / 40], 2),
                               rtol=1e-6)


def test_crowd_excluded_classes_mapped_and_records_without_masks(tmp_path):
    path = _write(tmp_path / "a.tfrecord", [
        _record(1, [(0, 0, 10, 10), (10, 10, 30, 30), (5, 5, 25, 15)], labels=[18, 7, 18], crowd=[0, 1, 0]),
        _record(2, [(0, 0, 10, 10), (2, 2, 30, 40)], labels=[7, 42], masks=False),
    ])
    config = _config(**{"model.num_classes": 2, "data.category_ids": (7, 18)})
    batch = _numpy(next(iter(pipeline.build_dataset(path, config, training=False))))
    # Record 1: the crowd instance (id 7) is out; 18 -> contiguous 2. Record 2: 7 -> 1, 42 is unknown.
    np.testing.assert_array_equal(batch["gt_classes"], [[2, 2, -1, -1], [1, -1, -1, -1]])
    np.testing.assert_array_equal(batch["has_masks"], [True, False])
    # The rectangles fill their boxes: every cell >= 0.5 (bilinear samples in the outer half pixel
    # mix in the outside) and the interior exactly 1.
    assert batch["gt_masks"][0, :2].min() >= 0.5
    np.testing.assert_array_equal(batch["gt_masks"][0, :2, 2:-2, 2:-2], 1.0)
    assert not batch["gt_masks"][1].any()


def test_same_seed_same_batches(tmp_path):
    paths = [_write(tmp_path / f"s{k}.tfrecord", [_record(10 * k + i, [(i, i, 20 + i, 30)]) for i in range(4)])
             for k in range(2)]
    config = _config(**{"data.seed": 11, "data.scale_jitter": (0.8, 1.3)})

    def first_batches(cfg):
        return [_numpy(b) for b in pipeline.build_dataset(str(tmp_path / "s*.tfrecord"), cfg, True).take(4)]

    first, second = first_batches(config), first_batches(config)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = first_batches(config_lib.replace(config, **{"data.seed": 12}))
    assert any(not np.array_equal(a["gt_boxes"], b["gt_boxes"]) for a, b in zip(first, other))
    assert len(paths) == 2


def test_input_pipelines_read_disjoint_files_with_per_replica_batches(tmp_path):
    for k in range(4):
        _write(tmp_path / f"shard-{k}.tfrecord", [_record(10 * k + i, [(2, 2, 9, 9)]) for i in range(2)])
    config = _config(**{"data.eval_batch_size": 4})
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        dataset = pipeline.build_dataset(str(tmp_path / "shard-*"), config, training=False, input_context=context)
        assert dataset.element_spec["images"].shape[0] == 2  # global 4 over 2 replicas
        seen.append({int(s) for b in dataset for s, v in zip(b["source_id"], b["is_valid"]) if v})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == {0, 1, 10, 11, 20, 21, 30, 31}


def test_errors_name_the_pattern_and_the_broken_record(tmp_path):
    with pytest.raises(ValueError, match="nothing-here"):
        pipeline.build_dataset(str(tmp_path / "nothing-here-*"), _config(), training=True)
    path = _write(tmp_path / "bad.tfrecord", [_record(7, [(1, 1, 5, 5)]),
                                              _record(8, [(1, 1, 5, 5)], encoded=b"\xff\xd8 not a jpeg")])
    with pytest.raises(tf.errors.InvalidArgumentError, match="img_8.png"):
        list(pipeline.build_dataset(path, _config(), training=False))


def test_count_records(tmp_path):
    _write(tmp_path / "c-0.tfrecord", [_record(i, []) for i in range(3)])
    _write(tmp_path / "c-1.tfrecord", [_record(i, [(1, 1, 4, 4)]) for i in range(2)])
    assert pipeline.count_records(str(tmp_path / "c-*")) == 5
    truncated = tmp_path / "c-2.tfrecord"
    truncated.write_bytes((tmp_path / "c-1.tfrecord").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        pipeline.count_records(str(truncated))


def test_coco_val2017_records_decode_with_boxes_matching_the_json(coco_sample, tmp_path):
    from pycocotools.coco import COCO

    sample = coco_sample("coco_val2017_10")  # real COCO images, or the generated stand-in (with a crowd too)
    coco = COCO(str(sample.annotation_file))
    category_ids = tuple(sorted(coco.getCatIds()))
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        h, w = info["height"], info["width"]
        boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        # Inline writer (the converter is another engineer's module): original bytes, annToMask PNGs.
        records.append(schema.build_example(
            encoded=(sample.image_dir / info["file_name"]).read_bytes(), image_format="jpeg", height=h, width=w,
            filename=info["file_name"], source_id=str(image_id), boxes_norm_xyxy=boxes / [w, h, w, h],
            labels=[a["category_id"] for a in anns], texts=["x"] * len(anns),
            is_crowd=[a["iscrowd"] for a in anns], areas=[a["area"] for a in anns],
            png_masks=[schema.encode_png_mask(coco.annToMask(a)) for a in anns]))
    path = _write(tmp_path / "coco.tfrecord", records)
    size = 256
    config = config_lib.replace(config_lib.get_preset("tiny"), **{
        "model.image_size": (size, size), "model.num_classes": len(category_ids),
        "data.category_ids": category_ids, "data.max_instances": 40, "data.eval_batch_size": 4})
    checked = 0
    for batch in pipeline.build_dataset(path, config, training=False):
        batch = _numpy(batch)
        for i in np.nonzero(batch["is_valid"])[0]:
            image_id = int(batch["source_id"][i])
            info = coco.loadImgs(image_id)[0]
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
            scale = batch["image_info"][i, 2]
            np.testing.assert_allclose(batch["image_info"][i, 0], [info["height"], info["width"]])
            np.testing.assert_allclose(batch["image_info"][i, 1], np.round(batch["image_info"][i, 0] * scale))
            num = int((batch["gt_classes"][i] > 0).sum())
            assert num == len(anns)
            x, y, w, h = np.array([a["bbox"] for a in anns], np.float64).T
            expected = np.stack([y, x, y + h, x + w], axis=1) * np.tile(scale, 2)  # [n, 4] in input pixels
            np.testing.assert_allclose(batch["gt_boxes"][i, :num], expected, atol=1e-2)
            classes = [category_ids.index(a["category_id"]) + 1 for a in anns]
            np.testing.assert_array_equal(batch["gt_classes"][i, :num], classes)
            # Masks: the crop of each instance is non-empty (an off-by-box crop of a COCO mask would be
            # mostly empty) and all values are in [0, 1].
            areas = batch["gt_masks"][i, :num].mean(axis=(1, 2))
            assert np.all(areas > 0.05) and batch["gt_masks"][i].max() <= 1.0
            checked += 1
    assert checked == len(coco.getImgIds()) == (10 if sample.real else STANDIN_SHAPES["num_val"])


def test_records_have_masks_reads_the_first_record(tmp_path):
    # train.py says in one line that box-only records (the TXT converter's) leave the mask head untrained.
    with_masks = _write(tmp_path / "masks.tfrecord", [_record(1, [(0, 0, 10, 10)]), _record(2, [(0, 0, 5, 5)])])
    boxes_only = _write(tmp_path / "boxes.tfrecord", [_record(1, [(0, 0, 10, 10)], masks=False)])
    assert pipeline.records_have_masks(with_masks) is True
    assert pipeline.records_have_masks(boxes_only) is False
