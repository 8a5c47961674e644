"""The synthetic shapes dataset: exact polygon masks (area fields, boxes, pycocotools round trip)."""
import json
import os

import cv2
import numpy as np
from pycocotools.coco import COCO

from maskrcnn_tf.data import shapes


def test_mask_to_polygons_reproduces_masks_through_pycocotools():
    # An L shape plus a pixel touching it only diagonally: two 4-connected components -> two outlines.
    mask = np.zeros((8, 9), np.uint8)
    mask[1:5, 2:4] = 1
    mask[4, 4:7] = 1
    mask[5, 7] = 1  # diagonal neighbour of (4, 6)
    polygons = shapes.mask_to_polygons(mask)
    assert len(polygons) == 2
    # Hand-derived outline of the L along pixel edges (corners only), clockwise in image coordinates.
    assert sorted(polygons, key=len)[-1] == [4.0, 1.0, 4.0, 4.0, 7.0, 4.0, 7.0, 5.0, 2.0, 5.0, 2.0, 1.0]
    assert shapes._polygons_reproduce(polygons, mask)
    # A ring has a hole, which a union of COCO polygons cannot express: detected, not silently wrong.
    ring = np.zeros((7, 7), np.uint8)
    ring[1:6, 1:6] = 1
    ring[3, 3] = 0
    assert not shapes._polygons_reproduce(shapes.mask_to_polygons(ring), ring)


def test_shapes_dataset_masks_areas_boxes(tmp_path):
    paths = shapes.make_shapes_dataset(str(tmp_path), num_train=12, num_val=3, image_size=96, seed=3)
    coco = COCO(paths["train_annotations"])
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["circle", "square", "triangle"]
    assert len(coco.getImgIds()) == 12
    num_overlapping = 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = cv2.imread(os.path.join(paths["train_images"], info["file_name"]))
        assert image.shape == (96, 96, 3)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert anns, "the top shape is never occluded, so every image has an instance"
        union = np.zeros((96, 96), np.int32)
        for ann in anns:
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"] > 0
            rows, cols = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            # The box is the mask's tight extent in continuous pixels: encloses it and touches each side.
            assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            union += mask
        assert union.max() <= 1, "occluded parts must be removed from the earlier masks"
        boxes = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                 for a in anns]
        num_overlapping += sum(min(p[2], q[2]) > max(p[0], q[0]) and min(p[3], q[3]) > max(p[1], q[1])
                               for i, p in enumerate(boxes) for q in boxes[i + 1:])
    assert num_overlapping > 0, "some shapes must overlap"
    val = json.load(open(paths["val_annotations"]))
    assert {im["id"] for im in val["images"]}.isdisjoint(coco.getImgIds())


def test_shapes_dataset_is_deterministic(tmp_path):
    a = shapes.make_shapes_dataset(str(tmp_path / "a"), 4, 2, 64, seed=7)
    b = shapes.make_shapes_dataset(str(tmp_path / "b"), 6, 2, 64, seed=7)
    ja, jb = json.load(open(a["val_annotations"])), json.load(open(b["val_annotations"]))
    # Val image i depends only on (seed, split, i); ids shift with num_train, the content does not.
    assert [x["segmentation"] for x in ja["annotations"]] == [x["segmentation"] for x in jb["annotations"]]
    train_a, train_b = json.load(open(a["train_annotations"])), json.load(open(b["train_annotations"]))
    assert train_a["annotations"] == train_b["annotations"][:len(train_a["annotations"])]
