"""PyTorch -> Keras weight layouts, and assigning a {variable path: array} table to a model with checks.

PyTorch                                   Keras
Conv2d weight [out, in, kh, kw]           Conv2D kernel [kh, kw, in, out]
ConvTranspose2d weight [in, out, kh, kw]  Conv2DTranspose kernel [kh, kw, out, in] (no spatial flip:
                                          both are the adjoint of a cross-correlation)
Linear weight [out, in]                   Dense kernel [in, out]
A Linear after flattening NCHW [C, H, W] features becomes a Dense over our NHWC flattening [H, W, C].
Box deltas: PyTorch detectors order each group of four as [dx, dy, dw, dh]; ours is [dy, dx, dh, dw].
"""

from typing import Dict, Iterable, Tuple

import numpy as np

BOX_CODE_SIZE = 4
# Our [dy, dx, dh, dw] takes these positions of the PyTorch [dx, dy, dw, dh].
XY_TO_YX = (1, 0, 3, 2)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """Conv2d [out, in, kh, kw] -> Conv2D [kh, kw, in, out]."""
    return np.transpose(weight, (2, 3, 1, 0))


def deconv_kernel(weight: np.ndarray) -> np.ndarray:
    """ConvTranspose2d [in, out, kh, kw] -> Conv2DTranspose [kh, kw, out, in]."""
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """Linear [out, in] -> Dense [in, out]."""
    return np.transpose(weight)


def dense_kernel_after_nchw_flatten(weight: np.ndarray, channels: int, height: int, width: int) -> np.ndarray:
    """Linear [out, C*H*W] over flattened NCHW features -> Dense [H*W*C, out] over flattened NHWC ones."""
    out = weight.shape[0]
    if weight.shape[1] != channels * height * width:
        raise ValueError(f"expected shape {(out, channels * height * width)}, found {weight.shape}")
    return weight.reshape(out, channels, height, width).transpose(2, 3, 1, 0).reshape(height * width * channels, out)


def box_code_order(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Reorders every group of four [dx, dy, dw, dh] along `axis` into [dy, dx, dh, dw]."""
    size = values.shape[axis]
    if size % BOX_CODE_SIZE:
        raise ValueError(f"box delta axis of size {size} is not a multiple of {BOX_CODE_SIZE}")
    index = (np.arange(size) // BOX_CODE_SIZE) * BOX_CODE_SIZE + np.tile(XY_TO_YX, size // BOX_CODE_SIZE)
    return np.take(values, index, axis=axis)


def assign(model, values: Dict[str, np.ndarray], sources: Dict[str, str], required_prefixes: Iterable[str]) -> None:
    """Assigns values[path] to each model variable, after checking the whole table first.

    sources[path]: the checkpoint key (or keys) the value came from, for error messages.
    required_prefixes: every model variable whose path starts with one of these must get a value (the
    detector's weights; other variables such as seed states are left alone).
    Raises ValueError naming the key, the expected and the found shape, or the variable left without
    a value; the model is untouched then.
    """
    from maskrcnn_tf import run_dir

    variables = run_dir.variables_by_path(model)
    for path, value in values.items():
        if path not in variables:
            raise ValueError(f"{sources.get(path, path)}: the model has no variable {path}")
        expected: Tuple[int, ...] = tuple(variables[path].shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"{sources.get(path, path)}: expected shape {expected} (for {path}), "
                             f"found {tuple(value.shape)}")
    missing = [p for p in variables if p not in values and p.startswith(tuple(required_prefixes))]
    if missing:
        raise ValueError(f"the checkpoint gives no value for {len(missing)} model variables, e.g. {missing[0]}")
    for path, value in values.items():
        variables[path].assign(np.asarray(value, np.float32))
