"""maskrcnn_tf: Mask R-CNN (ResNet-FPN) instance segmentation for TensorFlow 2 / Keras 3.

    import maskrcnn_tf
    detector = maskrcnn_tf.load("runs/tiny")        # run directory, SavedModel or .keras file
    result = detector.predict("image.jpg")          # boxes, scores, category ids/names, masks
    detector.draw("image.jpg", result, "image_detections.png")

Public names: `load` (loading.py), `Predictor` (predictor.py), `MaskRCNN` and `build_model` (model.py),
`Config` and `get_preset` (config.py), `PRESETS` and the presets `tiny` / `coco_r50_fpn_1x` (presets.py),
`draw_detections` (visualize.py). They are imported on first use, so `import maskrcnn_tf` stays light (no TensorFlow).

Conventions (boxes are [y1, x1, y2, x2] absolute pixels of the padded model input, class 0 is background,
static shapes in the graph, ...) are written down in docs/design.md.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "maskrcnn_tf.loading",
    "Predictor": "maskrcnn_tf.predictor",
    "MaskRCNN": "maskrcnn_tf.model",
    "build_model": "maskrcnn_tf.model",
    "Config": "maskrcnn_tf.config",
    "get_preset": "maskrcnn_tf.config",
    "PRESETS": "maskrcnn_tf.presets",
    "tiny": "maskrcnn_tf.presets",
    "coco_r50_fpn_1x": "maskrcnn_tf.presets",
    "draw_detections": "maskrcnn_tf.visualize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # PEP 562: import the defining module when a public name is first used.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maskrcnn_tf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
