"""float64 NumPy references shared by the layer tests."""
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
