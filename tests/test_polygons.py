"""polygons.py: masks as polygons along pixel edges (outer rings and holes) and back.

Known answers: a filled rectangle's polygon is its four corners; shapes with holes, and an island inside a
hole, come back pixel for pixel from exact polygons and with IoU >= 0.98 from simplified ones."""
import cv2
import numpy as np
import pytest

from maskrcnn_tf.polygons import mask_to_multipolygon, multipolygon_to_mask
from tests.numpy_reference import mask_iou


def _ring_target():
    """A disc with a hole holding an island (which has a hole), and a frame: 3 outer rings, 3 holes."""
    mask = np.zeros((120, 160), np.uint8)
    cv2.circle(mask, (60, 60), 50, 1, -1)
    cv2.circle(mask, (60, 60), 25, 0, -1)
    cv2.circle(mask, (60, 60), 12, 1, -1)
    cv2.circle(mask, (60, 60), 5, 0, -1)
    cv2.rectangle(mask, (120, 10), (150, 100), 1, -1)
    cv2.rectangle(mask, (130, 40), (140, 60), 0, -1)
    return mask


def test_a_rectangle_is_its_four_pixel_edge_corners_as_a_closed_ring():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:9] = 1  # rows 2..4, columns 3..8: pixel edges x 3..9, y 2..5
    geometry = mask_to_multipolygon(mask)
    assert geometry["type"] == "MultiPolygon" and len(geometry["coordinates"]) == 1
    (ring,) = geometry["coordinates"][0]
    assert ring[0] == ring[-1]  # closed, as GeoJSON wants
    assert sorted(map(tuple, ring[:-1])) == [(3, 2), (3, 5), (9, 2), (9, 5)]


def test_holes_and_an_island_in_a_hole_round_trip_exactly():
    mask = _ring_target()
    geometry = mask_to_multipolygon(mask)
    # Disc with its hole, island with its hole, frame with its hole.
    assert sorted(len(polygon) for polygon in geometry["coordinates"]) == [2, 2, 2]
    np.testing.assert_array_equal(multipolygon_to_mask(geometry, *mask.shape), mask)


@pytest.mark.parametrize("tolerance", [0.5, 1.0])
def test_simplified_polygons_have_fewer_vertices_and_iou_at_least_0_98(tolerance):
    mask = _ring_target()
    exact, simplified = mask_to_multipolygon(mask), mask_to_multipolygon(mask, tolerance)
    count = lambda g: sum(len(ring) for polygon in g["coordinates"] for ring in polygon)  # noqa: E731
    # Measured: 478 vertices exact, 422 at 0.5 px and 70 at 1 px; IoU 1.0 at 0.5 px (single-pixel stair
    # corners go), 0.981 at 1 px (the 5 px hole loses most).
    assert count(simplified) < count(exact) * (0.9 if tolerance < 1 else 0.2)
    assert mask_iou(multipolygon_to_mask(simplified, *mask.shape), mask) >= 0.98


def test_shapes_dataset_masks_round_trip_through_polygons():
    from maskrcnn_tf.data import shapes

    rng = np.random.default_rng(0)
    for _ in range(5):
        _, instances = shapes.make_image(rng, 96, (2, 4))
        for _, mask, _ in instances:  # visible parts: occluded shapes may come in several pieces
            np.testing.assert_array_equal(multipolygon_to_mask(mask_to_multipolygon(mask), *mask.shape),
                                          mask.astype(np.uint8))


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="tolerance -1"):
        mask_to_multipolygon(np.ones((4, 4), np.uint8), -1)
    with pytest.raises(ValueError, match="expected a MultiPolygon"):
        multipolygon_to_mask({"type": "Polygon", "coordinates": []}, 4, 4)
    assert mask_to_multipolygon(np.zeros((4, 4), np.uint8)) == {"type": "MultiPolygon", "coordinates": []}
