"""Instance masks as polygons along pixel edges: COCO polygon lists and GeoJSON-style MultiPolygons.

Coordinates are continuous image pixels (x right, y down; pixel (r, c) covers [c, c + 1) x [r, r + 1)), so
an exact polygon runs along pixel edges and its vertices are whole numbers. A mask's boundary becomes
closed loops (4-connectivity: pixels touching only at a corner belong to different components); an outer
loop has positive shoelace area (y down), a hole negative. Rasterising takes a pixel when its centre is
inside (pycocotools' rule), so unsimplified polygons give back the mask exactly.

`mask_to_multipolygon(mask, tolerance)` groups each hole with the outer loop around it:
    {"type": "MultiPolygon", "coordinates": [[exterior, hole, ...], ...]}
with rings as closed lists of [x, y] (the first point repeated at the end, as GeoJSON wants).
`tolerance` > 0 simplifies each ring with the Douglas-Peucker algorithm (cv2.approxPolyDP; no vertex
moves farther than that many pixels from the exact boundary); rings left with fewer than 3 vertices are
dropped. `multipolygon_to_mask` inverts it.
"""
from typing import List

import cv2
import numpy as np

# Directions as (dx, dy) in image coordinates (y down); index arithmetic below relies on this order.
_RIGHT, _DOWN, _LEFT, _UP = (1, 0), (0, 1), (-1, 0), (0, -1)


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Binary mask [H, W] -> COCO polygons [[x0, y0, x1, y1, ...], ...] along pixel edges.

    Each boundary edge of the pixel set is directed so the set lies on its right (y down); edges are
    chained into closed loops, turning right where two components touch diagonally (4-connectivity).
    Outer loops have positive shoelace area, holes negative. Only corner vertices are emitted.
    """
    mask = np.asarray(mask, bool)
    rows, cols = np.any(mask, 1), np.any(mask, 0)
    if not rows.any():
        return []
    y0, x0 = int(rows.argmax()), int(cols.argmax())  # work on the mask's bounding box only (speed)
    y1, x1 = len(rows) - int(rows[::-1].argmax()), len(cols) - int(cols[::-1].argmax())
    m = np.pad(mask[y0:y1, x0:x1], 1)
    inner = m[1:-1, 1:-1]
    edges = {}  # (x, y, direction) of the edge's start -> end vertex
    sides = (  # (pixels with that side on the boundary, start corner offset (dx, dy), direction)
        (inner & ~m[:-2, 1:-1], (0, 0), _RIGHT),  # top side, walked left to right
        (inner & ~m[1:-1, 2:], (1, 0), _DOWN),  # right side
        (inner & ~m[2:, 1:-1], (1, 1), _LEFT),  # bottom side
        (inner & ~m[1:-1, :-2], (0, 1), _UP),  # left side
    )
    for on_boundary, (ox, oy), (dx, dy) in sides:
        rows, cols = np.nonzero(on_boundary)
        for r, c in zip(rows.tolist(), cols.tolist()):
            edges[(c + x0 + ox, r + y0 + oy, (dx, dy))] = (c + x0 + ox + dx, r + y0 + oy + dy)
    remaining = dict(edges)
    polygons = []
    while remaining:
        first = key = next(iter(remaining))
        vertices = []
        while key in remaining:
            end = remaining.pop(key)
            dx, dy = key[2]
            right_turn = (end[0], end[1], (-dy, dx))
            # At a diagonal touch two edges leave `end`: the right turn stays with the same component,
            # so components touching at a corner become separate polygons (4-connectivity).
            if right_turn in edges:
                nxt = right_turn
            else:
                nxt = next((end[0], end[1], d) for d in (_RIGHT, _DOWN, _LEFT, _UP) if (end[0], end[1], d) in edges)
            if nxt[2] != key[2]:
                vertices.append(end)  # a corner: the direction changes here
            key = nxt
        assert key == first, "boundary edges must form closed loops"
        polygons.append([float(v) for xy in vertices for v in xy])
    return polygons


def signed_area(ring: List[float]) -> float:
    """Shoelace area of a flat [x0, y0, x1, y1, ...] ring; positive for an outer loop (y down)."""
    xy = np.asarray(ring, np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _rasterize(rings: List[List[float]], height: int, width: int) -> np.ndarray:
    """uint8 [height, width]: the union of the rings' interiors (pixel centres inside)."""
    from pycocotools import mask as mask_utils

    if not rings:
        return np.zeros((height, width), np.uint8)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([list(r) for r in rings], height, width)))


def _simplify(ring: List[float], tolerance: float) -> List[float]:
    if tolerance <= 0:
        return ring
    points = np.asarray(ring, np.float32).reshape(-1, 1, 2)
    return [float(v) for v in cv2.approxPolyDP(points, float(tolerance), closed=True).reshape(-1)]


def _closed(ring: List[float]) -> List[List[float]]:
    points = [[ring[i], ring[i + 1]] for i in range(0, len(ring), 2)]
    return points + points[:1]


def mask_to_multipolygon(mask: np.ndarray, tolerance: float = 0.0) -> dict:
    """Binary mask [H, W] -> GeoJSON-style MultiPolygon (module docstring); tolerance in pixels, >= 0."""
    if tolerance < 0:
        raise ValueError(f"polygon tolerance {tolerance}: expected a number of pixels >= 0")
    mask = np.asarray(mask, bool)
    loops = mask_to_polygons(mask)
    exteriors = [loop for loop in loops if signed_area(loop) > 0]
    holes = [loop for loop in loops if signed_area(loop) < 0]
    height, width = mask.shape
    polygons = [[ring] for ring in exteriors]
    if holes:
        # A hole belongs to the smallest outer loop whose filled interior holds the hole's own pixels (an
        # island inside a hole is an outer loop of its own, inside the first).
        interiors = [_rasterize([ring], height, width) for ring in exteriors]
        areas = [signed_area(ring) for ring in exteriors]
        for hole in holes:
            row, col = np.argwhere(_rasterize([hole], height, width))[0]
            owners = [i for i, inside in enumerate(interiors) if inside[row, col]]
            owner = min(owners, key=lambda i: areas[i]) if owners else int(np.argmax(areas))
            polygons[owner].append(hole)
    coordinates = []
    for rings in polygons:
        simplified = [_simplify(ring, tolerance) for ring in rings]
        if len(simplified[0]) < 6:  # the exterior vanished
            continue
        coordinates.append([_closed(ring) for ring in simplified if len(ring) >= 6])
    return {"type": "MultiPolygon", "coordinates": coordinates}


def multipolygon_to_mask(geometry: dict, height: int, width: int) -> np.ndarray:
    """GeoJSON-style MultiPolygon (module docstring) -> uint8 [height, width] 0/1: each polygon's exterior
    minus its holes, pixel centres inside."""
    if geometry.get("type") != "MultiPolygon":
        raise ValueError(f"expected a MultiPolygon geometry, got type {geometry.get('type')!r}")
    mask = np.zeros((height, width), np.uint8)
    for rings in geometry["coordinates"]:
        flat = [[v for point in ring[:-1] for v in point] for ring in rings]
        polygon = _rasterize(flat[:1], height, width)
        if len(flat) > 1:
            polygon &= 1 - _rasterize(flat[1:], height, width)
        mask |= polygon
    return mask
