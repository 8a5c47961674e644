"""Reads a PyTorch `.pth` checkpoint into {name: np.ndarray} without importing torch.

torch.save (PyTorch >= 1.6) writes a zip archive:
    PREFIX/data.pkl      pickle of the object; each tensor is torch._utils._rebuild_tensor_v2(storage,
                         storage_offset, size, stride, requires_grad, backward_hooks[, metadata]), each
                         storage a persistent id ("storage", torch.<Type>Storage, key, location, numel)
    PREFIX/data/<key>    the raw bytes of storage <key> (numel elements of the storage's dtype)
    PREFIX/byteorder     "little" or "big" (absent in old files: little)
Unpickling goes through restricted_pickle.RestrictedUnpickler: the only globals resolved are the tensor and
parameter builders, the typed storage classes, collections.OrderedDict and torch.Size, all replaced by
NumPy stand-ins; any other global is refused ("FILE: refused to load: the pickle names global X.Y (not an
array builder)") before anything is called.

torch.save before PyTorch 1.6 (and `_use_new_zipfile_serialization=False` since) writes the legacy format,
one stream of consecutive pickles and raw bytes (torch/serialization.py `_legacy_save` / `_legacy_load`):
    pickle  LEGACY_MAGIC_NUMBER (0x1950a86a20f9469cfc6c)
    pickle  LEGACY_PROTOCOL_VERSION (1001)
    pickle  sys_info {"protocol_version": 1001, "little_endian": bool, "type_sizes": {...}}
    pickle  the object; each storage a persistent id ("storage", torch.<Type>Storage, key, location, numel,
            view_metadata None or (view key, offset, numel))
    pickle  the sorted list of storage keys
    then, for each key in that order: numel as a little-endian int64, then numel elements (little endian)
torchvision's COCO_V1 detection files date from torchvision 0.3 (May 2019, PyTorch 1.1), before the zip
format: their names still end in the SHA-256 prefix of that upload, so they are in this format. It is read
with the same allow-list: the object pickle is unpickled twice, once to collect the storage records (no
tensor built), then, after the storage bytes are read, to build the tensors. The older tar format
(PyTorch < 0.4) is refused with a message.

Decisions:
- Tensors come back as C-contiguous copies with their logical shape (strides and storage offsets applied,
  bounds checked against the storage size first). bfloat16 (no NumPy dtype) is returned as float32, which
  holds every bfloat16 value exactly; every other supported dtype keeps its NumPy equivalent.
- The state dict is the object itself, or its "model" / "state_dict" entry (detectron2 training
  checkpoints, many training scripts). Nested dicts are flattened with "." between the keys (what
  torch's module names look like); a leaf that is not a tensor is a ValueError naming it.
- A pickled module (torch.save(model) rather than its state_dict) names its classes and is refused.
"""

import collections
import io
import os
import pickle
import tarfile
import zipfile
from typing import Dict

import numpy as np

from maskrcnn_tf.weights import restricted_pickle

# torch's typed storage classes -> element dtype of their raw bytes (little endian, fixed on load).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,  # raw bits, widened to float32 below
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
BFLOAT16_STORAGE = "BFloat16Storage"
STATE_DICT_ENTRIES = ("model", "state_dict")
# Legacy torch.save files start with a pickled magic number and protocol version (torch/serialization.py).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
INT64_BYTES = 8


class _StorageType:
    """Stand-in for torch.<Type>Storage: only remembers which one the pickle named."""

    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A storage read from the archive: a 1-D array of its elements."""

    def __init__(self, array: np.ndarray, is_bfloat16: bool):
        self.array = array
        self.is_bfloat16 = is_bfloat16


def _ordered_dict(*args):
    # OrderedDict called with the pickle's arguments; it builds a dict, never calls anything in them.
    return collections.OrderedDict(*args)


def _size(values=()):
    """torch.Size pickles as torch.Size((d0, d1, ...)): a tuple of ints."""
    return tuple(int(v) for v in values)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *state):
    return data


def _rebuild_tensor(path: str):
    """torch._utils._rebuild_tensor_v2 stand-in: storage + offset + size + stride -> np.ndarray."""

    def rebuild(storage, storage_offset, size, stride, requires_grad=None, backward_hooks=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise ValueError(f"{path}: a tensor's storage is {type(storage).__name__}, not a storage record")
        size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
        if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
            raise ValueError(f"{path}: tensor with size {size}, stride {stride}, offset {offset} is malformed")
        elements = storage.array
        if 0 in size:
            array = np.zeros(size, elements.dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= elements.size:
                raise ValueError(f"{path}: tensor with size {size}, stride {stride}, offset {offset} reaches "
                                 f"element {last} of a storage of {elements.size}")
            itemsize = elements.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(elements[offset:], shape=size,
                                                   strides=tuple(s * itemsize for s in stride), writeable=False)
            array = np.array(view, order="C")  # a copy (ascontiguousarray would make 0-d arrays 1-d)
        if storage.is_bfloat16:
            # bfloat16 is the upper half of a float32: shift the bits into place.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    return rebuild


def _skip_tensor(*args, **kwargs):
    """_rebuild_tensor_v2 stand-in of the legacy format's first pass (storage bytes not read yet)."""
    return None


def _allowed_globals(path: str, rebuild=None) -> dict:
    allowed = {
        "collections.OrderedDict": _ordered_dict,
        "torch._utils._rebuild_tensor_v2": rebuild or _rebuild_tensor(path),
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch.Size": _size,
    }
    allowed.update({f"torch.{name}": _StorageType(name) for name in STORAGE_DTYPES})
    return allowed


def _read_archive(path: str, archive: zipfile.ZipFile):
    """The unpickled object of an opened torch zip archive."""
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(f"{path}: a zip file but not a torch.save checkpoint (no PREFIX/data.pkl entry)")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: byteorder record says {byteorder!r}; expected little or big")
    storages = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ValueError(f"{path}: unexpected persistent id {pid!r} (expected a storage record)")
        _, storage_type, key, _, numel = pid
        key = str(key)
        if key not in storages:
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise ValueError(f"{path}: storage {key} is missing from the archive ({entry})")
            dtype = np.dtype(STORAGE_DTYPES[storage_type.name]).newbyteorder("<" if byteorder == "little" else ">")
            raw = archive.read(entry)
            if len(raw) < int(numel) * dtype.itemsize:
                raise ValueError(f"{path}: storage {key} holds {len(raw)} bytes, fewer than its "
                                 f"{numel} elements of {dtype.itemsize} bytes")
            elements = np.frombuffer(raw, dtype, count=int(numel)).astype(dtype.newbyteorder("="))
            storages[key] = _Storage(elements, storage_type.name == BFLOAT16_STORAGE)
        return storages[key]

    unpickler = restricted_pickle.RestrictedUnpickler(
        io.BytesIO(archive.read(pickles[0])), _allowed_globals(path), persistent_load=persistent_load)
    return unpickler.load()


def is_legacy_file(path: str) -> bool:
    """Whether `path` starts like a legacy (non-zip) torch.save file: a pickled LEGACY_MAGIC_NUMBER."""
    with open(path, "rb") as f:
        head = f.read(32)
    # A pickle (PROTO opcode) whose first value is the 10-byte long, stored in little endian.
    return head[:1] == b"\x80" and LEGACY_MAGIC_NUMBER.to_bytes(10, "little") in head


def _legacy_record(path: str, pid):
    """(storage key, storage type name, numel, view (key, offset, numel) or None) of a legacy persistent id."""
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _StorageType)):
        raise ValueError(f"{path}: unexpected persistent id {pid!r} (expected a storage record)")
    _, storage_type, key, _, numel, view = pid
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"{path}: storage {key!r} has {numel!r} elements")
    if view is not None:
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise ValueError(f"{path}: storage {key!r} has a malformed view record {view!r}")
        if view[1] + view[2] > numel:
            raise ValueError(f"{path}: a view of storage {key!r} reaches element {view[1] + view[2]} of {numel}")
    return str(key), storage_type.name, numel, view


def _read_legacy(path: str, f):
    """The unpickled object of a legacy torch.save stream (module docstring), read through the allow-list."""

    def plain():  # magic number, protocol version, sys_info, storage keys: no globals, no persistent ids
        return restricted_pickle.RestrictedUnpickler(f, {}).load()

    if plain() != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{path}: not a torch.save checkpoint (no legacy magic number)")
    version = plain()
    if version != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{path}: legacy torch.save protocol version {version!r}, expected {LEGACY_PROTOCOL_VERSION}")
    sys_info = plain()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ValueError(f"{path}: written on a big-endian machine (sys_info {sys_info!r}); not supported")
    start = f.tell()
    records = {}

    def collect(pid):
        key, type_name, numel, _ = _legacy_record(path, pid)
        if records.setdefault(key, (type_name, numel)) != (type_name, numel):
            raise ValueError(f"{path}: storage {key} is recorded as {records[key]} and as {(type_name, numel)}")
        return None

    restricted_pickle.RestrictedUnpickler(f, _allowed_globals(path, _skip_tensor), persistent_load=collect).load()
    keys = plain()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(records):
        raise ValueError(f"{path}: the storage key list does not match the storages the pickle names")
    storages = {}
    for key in map(str, keys):
        type_name, numel = records[key]
        dtype = np.dtype(STORAGE_DTYPES[type_name]).newbyteorder("<")
        head = f.read(INT64_BYTES)
        written = int.from_bytes(head, "little", signed=True) if len(head) == INT64_BYTES else None
        if written != numel:
            raise ValueError(f"{path}: storage {key} records {written} elements where the pickle says {numel} "
                             "(truncated or corrupt file)")
        raw = f.read(numel * dtype.itemsize)
        if len(raw) < numel * dtype.itemsize:
            raise ValueError(f"{path}: storage {key} holds {len(raw)} bytes, fewer than its {numel} elements of "
                             f"{dtype.itemsize} bytes (truncated file)")
        storages[key] = _Storage(np.frombuffer(raw, dtype).astype(dtype.newbyteorder("=")),
                                 type_name == BFLOAT16_STORAGE)

    def load(pid):
        key, _, _, view = _legacy_record(path, pid)
        storage = storages[key]
        if view is None:
            return storage
        _, offset, numel = view
        return _Storage(storage.array[offset:offset + numel], storage.is_bfloat16)

    f.seek(start)
    return restricted_pickle.RestrictedUnpickler(f, _allowed_globals(path), persistent_load=load).load()


def _flatten(path: str, obj, prefix: str, out: Dict[str, np.ndarray]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(path, value, name + ".", out)
        elif isinstance(value, np.ndarray):
            out[name] = value
        else:
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")


def state_dict_of(path: str, obj) -> Dict[str, np.ndarray]:
    """The flat {name: array} of an unpickled checkpoint object (module docstring: "model" / "state_dict"
    entries, nested dicts)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for entry in STATE_DICT_ENTRIES:
        if isinstance(obj.get(entry), dict):
            obj = obj[entry]
            break
    out = {}
    _flatten(path, obj, "", out)
    if not out:
        raise ValueError(f"{path}: the state dict holds no tensors")
    return out


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
    """{parameter name: np.ndarray} of a torch.save checkpoint; ValueError naming the file when it is not
    one, is truncated, or names a global outside the allow-list (then nothing in it has run)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    legacy = not zipfile.is_zipfile(path) and is_legacy_file(path)
    if not legacy and not zipfile.is_zipfile(path):
        if tarfile.is_tarfile(path):
            raise ValueError(f"{path}: the tar torch.save format of PyTorch < 0.4, not supported; re-save it with "
                             "torch.save(torch.load(f), f2) using any PyTorch >= 1.6")
        raise ValueError(f"{path}: not a torch.save checkpoint (neither a zip archive nor the legacy format; "
                         "truncated or another format)")
    try:
        if legacy:
            with open(path, "rb") as f:
                obj = _read_legacy(path, f)
        else:
            with zipfile.ZipFile(path) as archive:
                obj = _read_archive(path, archive)
    except restricted_pickle.RefusedGlobal as e:
        raise ValueError(restricted_pickle.refusal_message(path, e.qualified_name)) from None
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, zipfile.LargeZipFile, OSError) as e:
        raise ValueError(f"{path}: unreadable torch checkpoint ({type(e).__name__}: {e})") from None
    except (TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: malformed torch checkpoint ({type(e).__name__}: {e})") from None
    return state_dict_of(path, obj)
