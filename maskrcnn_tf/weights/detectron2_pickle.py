"""Reads a detectron2 model-zoo checkpoint into {name: np.ndarray} without detectron2 or torch.

Model-zoo files (`model_final_<hash>.pkl`) are a pickle of {"model": {name: np.ndarray}, "__author__": ...,
"matching_heuristics": ...}. Unpickling goes through restricted_pickle.RestrictedUnpickler allowing only
what NumPy's own array pickling names, under both NumPy 1 (numpy.core) and NumPy 2 (numpy._core) module
paths: multiarray._reconstruct, numpy.ndarray, numpy.dtype, multiarray.scalar, numeric._frombuffer
(protocol 5), and _codecs.encode (protocol-2 pickles store raw bytes as a latin-1 string). Object arrays
are refused (their elements would be arbitrary pickled objects). Any other global is refused ("FILE:
refused to load: the pickle names global X.Y (not an array builder)") before anything is called.
Pickles written by Python 2 (Detectron-era files) are read with latin-1 strings, as detectron2 does.

detectron2's own training checkpoints (`.pth`, torch.save of {"model": ..., "iteration": ...}, a zip or, before
PyTorch 1.6, the legacy stream) are read with torch_pickle. The result is the "model" entry, flattened as
torch_pickle.state_dict_of does. docs/design.md section 15 lists the published layouts and their buffers.
"""

import codecs
import os
import pickle
import zipfile
from typing import Dict

import numpy as np

from maskrcnn_tf.weights import restricted_pickle, torch_pickle

LATIN1 = "latin1"


def _dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype} (arrays of pickled objects are not weights)")
    return dtype


def _reconstruct(subtype, shape, dtype):
    """numpy's multiarray._reconstruct: an empty ndarray that the pickle's BUILD fills via __setstate__."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _scalar(dtype, data=None):
    dtype = _dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"scalar of {dtype} needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype)[0]


def _frombuffer(buffer, dtype, shape, order):
    array = np.frombuffer(buffer, _dtype(dtype))
    return array.reshape(shape, order=order).copy()


def _encode(text, encoding=LATIN1):
    # Protocol-2 pickles of bytes: _codecs.encode(str, "latin1"). Nothing else is accepted.
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 strings")
    return text.encode(LATIN1)


ALLOWED_GLOBALS = {"_codecs.encode": _encode, "numpy.ndarray": np.ndarray, "numpy.dtype": _dtype}
for _core in ("numpy.core", "numpy._core"):
    ALLOWED_GLOBALS.update({
        f"{_core}.multiarray._reconstruct": _reconstruct,
        f"{_core}.multiarray.scalar": _scalar,
        f"{_core}.numeric._frombuffer": _frombuffer,
    })


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
    """{parameter name: np.ndarray} of a detectron2 checkpoint (.pkl model-zoo pickle or .pth zip);
    ValueError naming the file when it is unreadable, not a checkpoint, or names a disallowed global."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if zipfile.is_zipfile(path) or torch_pickle.is_legacy_file(path):
        return torch_pickle.load_state_dict(path)
    try:
        with open(path, "rb") as f:
            obj = restricted_pickle.RestrictedUnpickler(f, ALLOWED_GLOBALS, encoding=LATIN1).load()
    except restricted_pickle.RefusedGlobal as e:
        raise ValueError(restricted_pickle.refusal_message(path, e.qualified_name)) from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as e:
        raise ValueError(f"{path}: not a readable detectron2 checkpoint ({type(e).__name__}: {e})") from None
    return torch_pickle.state_dict_of(path, obj)
