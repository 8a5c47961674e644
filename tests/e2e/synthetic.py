"""Synthetic batches in the data contract (docs/design.md section 5), made directly in NumPy.

Model tests use these instead of the input pipeline so that a model failure never hides behind a data
failure. Shapes: class 1 = filled rectangle, 2 = filled ellipse, 3 = filled triangle, on a dark
noisy background.
"""
import cv2
import numpy as np

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets


def tiny_test_config(**overrides):
    """The tiny preset shrunk to 128x128 and a handful of proposals: a train step takes ~1 s on CPU."""
    cfg = config_lib.replace(
        presets.tiny(),
        **{
            "model.image_size": (128, 128),
            "model.fpn_num_filters": 32,
            "model.rpn_num_filters": 32,
            "model.rpn.batch_size_per_image": 64,
            "model.rpn.pre_nms_top_k_train": 128,
            "model.rpn.post_nms_top_k_train": 48,
            "model.rpn.pre_nms_top_k_test": 128,
            "model.rpn.post_nms_top_k_test": 48,
            "model.roi.num_samples": 32,
            "model.roi.max_mask_rois": 8,
            "model.heads.fc_dim": 64,
            "model.heads.mask_num_filters": 32,
            "model.detection.max_detections": 10,
            "model.detection.pre_nms_top_k": 100,
            "data.max_instances": 4,
            "data.gt_mask_size": 28,
        },
    )
    return config_lib.replace(cfg, **overrides)


def _draw(shape_class, height, width, box):
    y1, x1, y2, x2 = [int(v) for v in box]
    mask = np.zeros((height, width), np.uint8)
    if shape_class == 1:
        mask[y1:y2, x1:x2] = 1
    elif shape_class == 2:
        cv2.ellipse(mask, (((x1 + x2) / 2, (y1 + y2) / 2), (x2 - x1, y2 - y1), 0), 1, -1)
    else:
        pts = np.array([[x1, y2 - 1], [x2 - 1, y2 - 1], [(x1 + x2) // 2, y1]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    return mask


def make_batch(cfg, instances_per_image, seed=0):
    """instances_per_image: list (one per image) of [(class, [y1, x1, y2, x2]), ...] in pixels.

    Returns the training batch dict of numpy arrays plus "full_masks" (list of [n, H, W] uint8) for
    checking predictions.
    """
    rng = np.random.default_rng(seed)
    height, width = cfg.model.image_size
    n_max, mc = cfg.data.max_instances, cfg.data.gt_mask_size
    mean, std = np.array(cfg.model.pixel_mean), np.array(cfg.model.pixel_std)
    batch = len(instances_per_image)
    images = np.zeros((batch, height, width, 3), np.float32)
    gt_boxes = -np.ones((batch, n_max, 4), np.float32)
    gt_classes = -np.ones((batch, n_max), np.int32)
    gt_masks = np.zeros((batch, n_max, mc, mc), np.float32)
    full_masks = []
    colors = {1: (230, 60, 60), 2: (60, 230, 60), 3: (60, 60, 230)}
    for b, instances in enumerate(instances_per_image):
        rgb = rng.integers(0, 40, size=(height, width, 3)).astype(np.float32)
        masks = []
        for i, (cls, box) in enumerate(instances):
            mask = _draw(cls, height, width, box)
            rgb[mask > 0] = colors[cls]
            ys, xs = np.nonzero(mask)
            tight = [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
            gt_boxes[b, i] = tight
            gt_classes[b, i] = cls
            crop = mask[tight[0]:tight[2], tight[1]:tight[3]].astype(np.float32)
            gt_masks[b, i] = cv2.resize(crop, (mc, mc), interpolation=cv2.INTER_LINEAR)
            masks.append(mask)
        images[b] = (rgb - mean) / std
        full_masks.append(np.array(masks, np.uint8).reshape(-1, height, width))
    image_info = np.tile(np.array([[height, width], [height, width], [1, 1], [0, 0]], np.float32), [batch, 1, 1])
    data = {
        "images": images,
        "image_info": image_info,
        "gt_boxes": gt_boxes,
        "gt_classes": gt_classes,
        "gt_masks": gt_masks,
        "has_masks": np.ones([batch], np.int32),  # int32, not bool: see INTERFACES (Keras MEAN-reduces batches)
    }
    return data, full_masks


TWO_IMAGES = [
    [(1, [10, 12, 50, 60]), (2, [60, 70, 118, 120])],
    [(3, [20, 20, 90, 100]), (1, [95, 10, 122, 50])],
]
