"""float64 NumPy references written from the definitions, shared by the tests."""
import numpy as np


def conv2d_same(x, kernel, bias):
    """float64 stride-1 'same' convolution (cross-correlation, as TF), x [N, H, W, Ci], kernel [k, k, Ci, Co]."""
    k = kernel.shape[0]
    pad = k // 2
    height, width = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[3],))
    for dy in range(k):
        for dx in range(k):
            out += padded[:, dy:dy + height, dx:dx + width, :] @ kernel[dy, dx]
    return out + bias


def box_iou(a, b):
    """float64 IoU |A n B| / |A u B| of boxes a [N, 4] x b [M, 4] -> [N, M]; [y1, x1, y2, x2] (or
    [x1, y1, x2, y2] for both: IoU does not depend on the axis order). 0 where the union is empty."""
    a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
    inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
             * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def mask_iou(a, b) -> float:
    """IoU of two binary masks of one shape (anything nonzero is inside); 0 when both are empty."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))
