"""weights/torch_pickle.py: files written by torch.save, compared with torch.load(weights_only=True)."""
import collections
import os
import re
import zipfile

import numpy as np
import pytest

from tests.torch_oracle import import_torch  # noqa: E402

torch = import_torch()

from maskrcnn_tf.weights import torch_pickle  # noqa: E402


def _as_numpy(tensor):
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()  # bfloat16 -> float32 is exact
    return tensor.numpy()


def test_every_supported_dtype_and_layout_equals_torch_load(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, 6, generator=generator)
    state = collections.OrderedDict()
    state["float32"] = torch.randn(3, 4, generator=generator)
    state["float64"] = torch.randn(5, generator=generator, dtype=torch.float64)
    state["float16"] = torch.randn(2, 3, generator=generator).half()
    state["bfloat16"] = torch.randn(7, generator=generator).bfloat16()
    state["int64"] = torch.randint(-1000, 1000, (3, 2), generator=generator)
    state["int32"] = torch.randint(-1000, 1000, (4,), generator=generator, dtype=torch.int32)
    state["int16"] = torch.randint(-1000, 1000, (4,), generator=generator, dtype=torch.int16)
    state["int8"] = torch.randint(-100, 100, (4,), generator=generator, dtype=torch.int8)
    state["uint8"] = torch.randint(0, 255, (4,), generator=generator, dtype=torch.uint8)
    state["bool"] = torch.rand(6, generator=generator) > 0.5
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 3)
    # Views into one shared storage: transposed (non-contiguous), offset slices, a strided slice.
    state["transposed"] = base.permute(2, 0, 1)
    state["offset_slice"] = base[2, 1:4]
    state["strided"] = base[:, ::2, 1::3]
    state["parameter"] = torch.nn.Parameter(torch.randn(2, 2, generator=generator))
    path = tmp_path / "tensors.pth"
    torch.save(state, path)

    ours = torch_pickle.load_state_dict(str(path))
    reference = torch.load(path, weights_only=True)  # torch's own restricted loader: the oracle
    assert list(ours) == list(reference)
    for name, tensor in reference.items():
        expected = _as_numpy(tensor.detach())
        assert ours[name].shape == expected.shape, name
        assert ours[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
    assert ours["transposed"].flags.c_contiguous


def test_model_entry_and_nested_dicts_are_flattened(tmp_path):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    checkpoint = {"model": {"backbone": module.state_dict(), "head.weight": torch.ones(2)}, "iteration": 7}
    path = tmp_path / "trainer.pth"
    torch.save(checkpoint, path)
    ours = torch_pickle.load_state_dict(str(path))
    expected = {f"backbone.{k}": v for k, v in module.state_dict().items()}
    expected["head.weight"] = torch.ones(2)
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)
    assert ours["backbone.1.num_batches_tracked"].dtype == np.int64


def test_state_dict_entry_is_used(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 2}, path)
    ours = torch_pickle.load_state_dict(str(path))
    assert list(ours) == ["w"]
    np.testing.assert_array_equal(ours["w"], [0.0, 1.0, 2.0])


def test_disallowed_global_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            # Unpickling this calls os.mkdir(marker): proof of execution if the directory appears.
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": Payload()}, path)
    with pytest.raises(ValueError) as error:
        torch_pickle.load_state_dict(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: refused to load: the pickle names global ")
    assert "posix.mkdir" in message or "os.mkdir" in message
    assert "\n" not in message
    assert not marker.exists()


def test_truncated_and_non_zip_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(100, 100)}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    for path in (truncated, text, tmp_path / "missing.pth"):
        with pytest.raises(ValueError) as error:
            torch_pickle.load_state_dict(str(path))
        assert str(error.value).startswith(f"{path}: ")
        assert "\n" not in str(error.value)


def test_short_storage_record_is_refused(tmp_path):
    """A zip whose storage holds fewer bytes than the pickle claims (a corrupted archive that still has a
    valid central directory) is refused instead of reading past the buffer."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(10)}, good)
    bad = tmp_path / "short.pth"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[:8] if name.endswith("/data/0") else data)
    with pytest.raises(ValueError, match=r"short\.pth: storage 0 holds 8 bytes"):
        torch_pickle.load_state_dict(str(bad))


def test_out_of_bounds_stride_is_refused(tmp_path):
    """A pickle claiming a view larger than its storage: ValueError, never a read outside the buffer."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(4)}, good)
    with zipfile.ZipFile(good) as source:
        names = source.namelist()
        pickled = source.read([n for n in names if n.endswith("data.pkl")][0])
        # Size (4,) stride (1,) is pickled as K\x04\x85 ... K\x01\x85: make the size 400.
        tampered = pickled.replace(b"K\x04\x85", b"M\x90\x01\x85", 1)
        assert tampered != pickled
        bad = tmp_path / "huge_view.pth"
        with zipfile.ZipFile(bad, "w") as target:
            for name in names:
                target.writestr(name, tampered if name.endswith("data.pkl") else source.read(name))
    with pytest.raises(ValueError, match=r"huge_view\.pth: tensor with size \(400,\)"):
        torch_pickle.load_state_dict(str(bad))


def _legacy_state():
    """Every supported dtype, views into one shared storage, a Parameter, and a state_dict's _metadata."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(4, 5, 6, generator=generator)
    state = collections.OrderedDict()
    state["float32"] = torch.randn(3, 4, generator=generator)
    state["float64"] = torch.randn(5, generator=generator, dtype=torch.float64)
    state["float16"] = torch.randn(2, 3, generator=generator).half()
    state["bfloat16"] = torch.randn(7, generator=generator).bfloat16()
    state["int64"] = torch.randint(-1000, 1000, (3, 2), generator=generator)
    state["uint8"] = torch.randint(0, 255, (4,), generator=generator, dtype=torch.uint8)
    state["bool"] = torch.rand(6, generator=generator) > 0.5
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 3)
    state["transposed"] = base.permute(2, 0, 1)
    state["offset_slice"] = base[2, 1:4]
    state["strided"] = base[:, ::2, 1::3]
    state["parameter"] = torch.nn.Parameter(torch.randn(2, 2, generator=generator))
    state._metadata = collections.OrderedDict([("", {"version": 1}), ("backbone.fpn", {"version": 1})])
    return state


def test_legacy_format_equals_torch_load(tmp_path):
    """The pre-1.6 stream (magic number, protocol, sys_info, object, storage keys, raw storages): what the
    published COCO_V1 files use (docs/design.md section 15)."""
    path = tmp_path / "legacy.pth"
    torch.save(_legacy_state(), path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path) and torch_pickle.is_legacy_file(str(path))
    ours = torch_pickle.load_state_dict(str(path))
    reference = torch.load(path, weights_only=False)  # our own file: torch's full loader is the oracle
    assert list(ours) == list(reference)
    for name, tensor in reference.items():
        expected = _as_numpy(tensor.detach())
        assert ours[name].shape == expected.shape and ours[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
    # A detectron2 training checkpoint of that time: {"model": ..., "iteration": ...} in the same stream.
    trainer = tmp_path / "model_0004999.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "iteration": 4999}, trainer, _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(torch_pickle.load_state_dict(str(trainer))["w"], [0.0, 1.0, 2.0])


def test_legacy_format_truncated_or_unsafe_is_a_one_line_error(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(1000)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    cases = {}
    for name, cut in (("in_storage", len(data) - 100), ("in_pickle", 120)):
        cases[name] = tmp_path / f"{name}.pth"
        cases[name].write_bytes(data[:cut])
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    cases["evil"] = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": Payload()}, cases["evil"], _use_new_zipfile_serialization=False)
    patterns = {"in_storage": r"storage \S+ holds 3900 bytes, fewer than its 1000 elements",
                "in_pickle": r"unreadable torch checkpoint|not a torch\.save checkpoint",
                "evil": r"refused to load: the pickle names global (posix|os)\.mkdir"}
    for name, case in cases.items():
        with pytest.raises(ValueError) as error:
            torch_pickle.load_state_dict(str(case))
        message = str(error.value)
        assert message.startswith(f"{case}: ") and "\n" not in message, (name, message)
        assert re.search(patterns[name], message), (name, message)
    assert not marker.exists()


def test_non_tensor_leaf_is_named(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(2), "note": [1, 2]}, path)
    with pytest.raises(ValueError, match=r"entry 'note' is a list, not a tensor"):
        torch_pickle.load_state_dict(str(path))
