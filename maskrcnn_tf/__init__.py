"""maskrcnn_tf: Mask R-CNN (ResNet-FPN) instance segmentation for TensorFlow 2 / Keras 3.

Conventions used by every module (DESIGN.md section 3):

- Boxes are `[y1, x1, y2, x2]`, float32, absolute pixels of the resized, padded model input, with
  continuous coordinates: pixel i covers [i, i + 1), so height = y2 - y1 (no +1). Padded rows are -1.
  Only names ending in `_norm` hold 0..1 coordinates. COCO `[x, y, w, h]` appears only at the data
  and evaluation edges.
- Shape letters: B batch, N max gt instances (padded), A anchors over all levels, R proposals,
  S sampled RoIs, K foreground classes (class 0 = background; logits have K + 1 columns), H, W padded
  image, C channels, M mask size, D max detections.
- Box deltas are `[dy, dx, dh, dw]`; weights (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for the box
  head; dh, dw are clamped at log(1000 / 16) before exp.
- Feature levels are keys "P2".."P6" (backbone "C2".."C5"), stride 2**level. Aspect ratio = height / width.
- Class ids: records keep the dataset's category ids; the pipeline maps them to contiguous 1..K
  (`DataConfig.category_ids`), evaluation maps them back.
- Static shapes everywhere in the graph (fixed image size, gt padded to N, fixed top-k, padded NMS).
"""

__version__ = "0.1.0"
