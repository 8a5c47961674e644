"""MultilevelRoIAlign: the RoIAlign op (ops/roi_align.py) as a Keras layer.

A layer (not a bare function call in model.py) so that Keras knows whether the model can be
XLA-compiled: `CropAndResize` has no XLA kernel, so with backend "crop_and_resize" the layer sets
`supports_jit = False` and `jit_compile="auto"` falls back to plain graph mode instead of failing.
The "gather" backend compiles (TPUs, jit_compile=True train steps).
"""

import keras

from maskrcnn_tf import config as config_lib
from maskrcnn_tf.ops import roi_align as roi_align_ops

BACKENDS = roi_align_ops.BACKENDS

_ROI = config_lib.RoIConfig()  # defaults live in config.py


@keras.saving.register_keras_serializable(package="maskrcnn_tf")
class MultilevelRoIAlign(keras.layers.Layer):
    """call(features {"P2": [B, H/4, W/4, C], .., "P5"}, boxes float32 [B, R, 4] [y1, x1, y2, x2] input
    pixels) -> [B, R, output_size, output_size, C] in the features' dtype. Levels P2..P5 only (P6 is
    for the RPN), level per box from its size (docs/design.md section 6)."""

    def __init__(self, *, output_size=_ROI.box_output_size, sampling_ratio=_ROI.sampling_ratio,
                 backend=_ROI.roi_align_backend, gradient="sparse_matmul", aligned=_ROI.aligned,
                 torchvision_level_mapper=_ROI.torchvision_level_mapper, **kwargs):
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"MultilevelRoIAlign: backend={backend!r}; allowed: {BACKENDS}")
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.backend = backend
        # crop_and_resize backend: which gradient implementation (ops/roi_align.GRADIENTS).
        self.gradient = gradient
        # False: torchvision's un-aligned RoIAlign (ops/roi_align.py); sampling_ratio 0 = adaptive.
        self.aligned = aligned
        # True: torchvision's LevelMapper epsilon placement (ops/roi_align.assign_levels).
        self.torchvision_level_mapper = torchvision_level_mapper
        self.supports_jit = backend != "crop_and_resize"
        # Keep boxes float32 under mixed precision (Keras would cast every float input to float16,
        # a 0.5-pixel step at 1024); the op returns the features' dtype.
        self._convert_input_args = False

    def call(self, features, boxes):
        levels = {name: features[name] for name in ("P2", "P3", "P4", "P5")}
        return roi_align_ops.multilevel_roi_align(
            levels, boxes, output_size=self.output_size, sampling_ratio=self.sampling_ratio,
            backend=self.backend, gradient=self.gradient, aligned=self.aligned,
            torchvision_level_mapper=self.torchvision_level_mapper)

    def get_config(self):
        config = super().get_config()
        config.update(output_size=self.output_size, sampling_ratio=self.sampling_ratio, backend=self.backend,
                      gradient=self.gradient, aligned=self.aligned,
                      torchvision_level_mapper=self.torchvision_level_mapper)
        return config
