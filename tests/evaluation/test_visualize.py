"""draw_detections: shape/dtype, masks tinted, untouched background, score threshold, colours."""
import numpy as np

from maskrcnn_tf.visualize import MASK_ALPHA, class_color, draw_detections

HEIGHT, WIDTH = 120, 160
GREY = 100


def _scene():
    image = np.full([HEIGHT, WIDTH, 3], GREY, np.uint8)
    boxes = np.array([[40.0, 30.0, 90.0, 80.0],  # [y1, x1, y2, x2]
                      [95.0, 110.0, 115.0, 155.0]])
    classes = np.array([1, 2])
    scores = np.array([0.93, 0.2])  # the second is below the default threshold 0.5
    masks = np.zeros([2, HEIGHT, WIDTH], np.float32)
    masks[0, 50:80, 40:70] = 0.9
    masks[1, 97:113, 115:150] = 0.9
    return image, boxes, classes, scores, masks


def test_masks_tint_inside_and_leave_far_pixels_alone():
    image, boxes, classes, scores, masks = _scene()
    original = image.copy()
    out = draw_detections(image, boxes, classes, scores, masks, class_names=("person", "car"))
    assert out.shape == (HEIGHT, WIDTH, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(image, original)  # input not modified
    # Inside the mask, away from its contour and from the box and label: the translucent blend
    # (1 - alpha) * 100 + alpha * colour, by the documented formula.
    expected = np.round((1 - MASK_ALPHA) * GREY + MASK_ALPHA * np.array(class_color(1)))
    np.testing.assert_array_equal(out[65, 55], expected.astype(np.uint8))
    # Far from any drawn detection (bottom-left corner), and the whole area of the detection below
    # the score threshold (bottom-right): unchanged.
    np.testing.assert_array_equal(out[100:, :20], original[100:, :20])
    np.testing.assert_array_equal(out[92:, 105:], original[92:, 105:])
    # The box outline of the drawn detection is in its class colour.
    np.testing.assert_array_equal(out[85, 30], class_color(1))


def test_lower_threshold_draws_more_and_boxes_only_work():
    image, boxes, classes, scores, masks = _scene()
    out = draw_detections(image, boxes, classes, scores, masks, score_threshold=0.1)
    assert (out[97:113, 115:150] != GREY).any()  # second detection drawn now
    boxes_only = draw_detections(image, boxes, classes, scores, None)
    assert (boxes_only[65, 55] == GREY).all()  # no mask tint without masks
    np.testing.assert_array_equal(boxes_only[85, 30], class_color(1))


def test_class_colours_are_deterministic_and_distinct():
    colours = [class_color(c) for c in range(1, 81)]
    assert colours == [class_color(c) for c in range(1, 81)]
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours)
    assert len(set(colours)) == 80
    # Neighbouring classes are far apart (golden-ratio hue steps), not near-identical shades.
    assert min(np.abs(np.subtract(colours[i], colours[i + 1])).sum() for i in range(79)) > 60
