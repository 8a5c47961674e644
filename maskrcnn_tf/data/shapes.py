"""A synthetic COCO-format instance segmentation dataset: squares, circles and triangles.

`make_shapes_dataset` writes output_dir/{train,val}/<image id>.jpg|png and
output_dir/annotations/instances_{train,val}.json (categories 1 square, 2 circle, 3 triangle). It is the
built-in dataset for demos and tests that must run without a download.

Decisions:
- Each image: a flat or linear-gradient background, 1..4 shapes (random kind, colour contrasting with
  the background, size 10-35% of the side, rotation, position fully inside the image), Gaussian noise
  over everything. Later shapes are drawn on top of earlier ones.
- Occlusion is resolved top-down: a shape's visible mask is its full mask minus the shapes kept above
  it. A shape left with under MIN_VISIBLE_FRACTION of its pixels visible is removed from the image
  altogether (not drawn and not annotated, so no unannotated fragments remain), as is one whose visible
  part has a hole (COCO polygons are a union of outlines and cannot express holes). Kept shapes are then
  painted bottom-up with their full masks, so the visible pixels of each equal its annotated mask.
- Polygons are the outlines of the visible mask along pixel EDGES (integer corner coordinates, one
  polygon per 4-connected component). pycocotools rasterises a polygon by testing pixel centres, which
  sit 0.5 px from every such edge, so annToMask reproduces the mask exactly; every polygon is checked
  against pycocotools anyway and a mismatch removes the shape. bbox = the mask's extent
  (x, y, w, h; continuous pixels), area = the mask's pixel count.
- Determinism: image i of a split depends only on (seed, split, i), so a val set does not change when
  num_train does.
"""

import json
import os
from typing import Dict, List, Tuple

import numpy as np

from maskrcnn_tf.polygons import mask_to_polygons

CATEGORIES = (
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
)
SPLITS = ("train", "val")
MIN_VISIBLE_FRACTION = 0.3  # an instance occluded to less than this is removed
SIZE_RANGE = (0.10, 0.35)  # shape size (square side, circle diameter, triangle side) / image side
MIN_COLOUR_DISTANCE = 120  # L1 distance (0..765) between a shape's colour and the background mean
COLOUR_TRIES = 20
NOISE_STD = 6.0  # pixel noise, grey levels
JPEG_QUALITY = 95


def _polygons_reproduce(polygons: List[List[float]], mask: np.ndarray) -> bool:
    from pycocotools import mask as mask_utils

    if not polygons or any(len(p) < 6 for p in polygons):
        return False
    h, w = mask.shape
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))
    return bool(np.array_equal(decoded, mask.astype(np.uint8)))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [S, S, 3]: a flat colour or a linear gradient between two colours."""
    c0 = rng.uniform(0, 255, 3)
    if rng.random() < 0.5:
        return np.broadcast_to(c0, (size, size, 3)).astype(np.float32)
    c1 = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # [S, S]
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)  # [S, S] in 0..1
    return (c0 + t[..., None] * (c1 - c0)).astype(np.float32)  # [S, S, 3]


def _shape_mask(rng: np.random.Generator, category_id: int, size: int) -> np.ndarray:
    """bool [S, S] full mask of one shape placed fully inside the image."""
    import cv2

    extent = rng.uniform(*SIZE_RANGE) * size
    half_diag = extent / np.sqrt(2) if category_id == 1 else extent / 2 if category_id == 2 else extent / np.sqrt(3)
    cx, cy = rng.uniform(half_diag, size - half_diag, 2)
    canvas = np.zeros((size, size), np.uint8)
    if category_id == 2:
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), max(int(round(extent / 2)), 1), 1, -1)
    else:
        corners = 4 if category_id == 1 else 3
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(corners) / corners
        points = np.stack([cx + half_diag * np.cos(angles), cy + half_diag * np.sin(angles)], 1)  # [V, 2]
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def make_image(rng: np.random.Generator, image_size: int, num_shapes: Tuple[int, int] = (1, 4)):
    """-> (uint8 [S, S, 3] RGB image, [(category_id, visible bool mask [S, S], polygons)], bottom-up)."""
    background = _background(rng, image_size)
    mean = background.reshape(-1, 3).mean(0)
    shapes = []  # (category_id, full mask, colour), bottom to top
    for _ in range(int(rng.integers(num_shapes[0], num_shapes[1] + 1))):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        colour = rng.uniform(0, 255, 3)
        for _ in range(COLOUR_TRIES):
            if np.abs(colour - mean).sum() >= MIN_COLOUR_DISTANCE:
                break
            colour = rng.uniform(0, 255, 3)
        full = _shape_mask(rng, category_id, image_size)
        if full.any():
            shapes.append((category_id, full, colour))
    kept = []  # top to bottom
    occupied = np.zeros((image_size, image_size), bool)
    for category_id, full, colour in reversed(shapes):
        visible = full & ~occupied
        if visible.sum() < MIN_VISIBLE_FRACTION * full.sum():
            continue
        polygons = mask_to_polygons(visible)
        if not _polygons_reproduce(polygons, visible):
            continue  # a hole: not expressible as COCO polygons
        kept.append((category_id, full, colour, visible, polygons))
        occupied |= full
    image = background.copy()
    for _, full, colour, _, _ in reversed(kept):
        image[full] = colour
    image += NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, [(c, v, p) for c, _, _, v, p in reversed(kept)]


def make_shapes_dataset(output_dir: str, num_train: int, num_val: int, image_size: int, seed: int, *,
                        num_shapes: Tuple[int, int] = (1, 4), image_format: str = "jpg") -> Dict[str, str]:
    """Writes the dataset; returns {"train_images", "train_annotations", "val_images", "val_annotations"}.

    Image ids: train 1..num_train, val num_train+1.. (unique across splits); annotation ids likewise.
    image_format "jpg" (quality 95) or "png".
    """
    import cv2

    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    paths = {}
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    image_id = annotation_id = 0
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        split_dir = os.path.join(output_dir, split)
        os.makedirs(split_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            image, instances = make_image(rng, image_size, num_shapes)
            image_id += 1
            file_name = f"{image_id:06d}.{image_format}"
            params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if image_format == "jpg" else []
            ok, buf = cv2.imencode("." + image_format, image[..., ::-1], params)  # OpenCV wants BGR
            if not ok:
                raise RuntimeError(f"could not encode {file_name}")
            buf.tofile(os.path.join(split_dir, file_name))
            images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
            for category_id, visible, polygons in instances:
                rows, cols = np.nonzero(visible)
                x0, y0 = int(cols.min()), int(rows.min())
                annotation_id += 1
                annotations.append({
                    "id": annotation_id, "image_id": image_id, "category_id": category_id,
                    "bbox": [float(x0), float(y0), float(cols.max() + 1 - x0), float(rows.max() + 1 - y0)],
                    "area": float(visible.sum()), "segmentation": polygons, "iscrowd": 0})
        annotation_path = os.path.join(output_dir, "annotations", f"instances_{split}.json")
        with open(annotation_path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"info": {"description": f"synthetic shapes, seed {seed}"}, "licenses": [],
                       "images": images, "annotations": annotations, "categories": list(CATEGORIES)}))
        paths[f"{split}_images"] = split_dir
        paths[f"{split}_annotations"] = annotation_path
    return paths
