"""host_allocator: the malloc settings and TensorFlow's tensor pool really apply (freed memory is reused
instead of faulted in again), the switch (auto/on/off, accelerator hosts), a C library without glibc's
mallopt leaves everything alone quietly, and every program configures it."""
import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest

from maskrcnn_tf import host_allocator



class Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (glibc >= 2.33): ten size_t counters."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


GLIBC = host_allocator._glibc_function(host_allocator._LIBC, "mallinfo2", Mallinfo2, []) is not None

# A fresh interpreter: configures (or not) as a program's first line would, then mallocs a 16 MiB block,
# touches it and frees it, then counts the page faults of 20 more such rounds. With glibc's defaults the
# first block is above the 128 KiB mmap threshold, so it is mmapped (mallinfo2 hblks counts it) and its
# pages go back to the kernel on free; with the settings it comes from the heap and its pages stay.
_PROBE = textwrap.dedent("""
    import ctypes, json, resource, sys
    from maskrcnn_tf import host_allocator
    status = host_allocator.configure()
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = host_allocator._LIBC
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    mallinfo2 = host_allocator._glibc_function(libc, "mallinfo2", Mallinfo2, [])
    size = 16 << 20
    mapped_before = mallinfo2().hblks  # blocks mapped by the interpreter's start-up
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    mapped_blocks = mallinfo2().hblks - mapped_before
    libc.free(pointer)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        pointer = libc.malloc(size)
        ctypes.memset(pointer, 1, size)
        libc.free(pointer)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    print(json.dumps({"status": status, "active": host_allocator.active(), "mapped_blocks": mapped_blocks,
                      "faults": faults}))
""")


def _probe(switch=None):
    env = dict(os.environ)
    env.pop(host_allocator.ENV_SWITCH, None)
    if switch is not None:
        env[host_allocator.ENV_SWITCH] = switch
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt/mallinfo2 settings are glibc (>= 2.33) only")
def test_settings_keep_large_blocks_on_the_heap_and_reuse_their_pages():
    tuned, default = _probe(switch="on"), _probe(switch="off")
    assert (tuned["status"], tuned["active"]) == ("applied", True)
    assert (default["status"], default["active"]) == ("off", False)
    # 16 MiB is below the 32 MiB threshold set: from the heap, not mmap; glibc's default maps it.
    assert tuned["mapped_blocks"] == 0
    assert default["mapped_blocks"] == 1
    # Pages of the freed block stay: the 20 rounds fault in a small part of one block's 4096 pages. With
    # glibc's default the first round faults in a whole fresh block (its dynamic threshold, raised by
    # the munmap, keeps the later ones).
    pages = (16 << 20) // 4096
    assert tuned["faults"] < pages // 4, tuned
    assert default["faults"] > pages * 3 // 4, default


@pytest.mark.parametrize("value", ["off", "0", "False", " no "])
def test_off_switch_values(value):
    assert host_allocator.disabled_by_env({host_allocator.ENV_SWITCH: value})
    assert host_allocator.configure(environ={host_allocator.ENV_SWITCH: value}) == "off"


def test_unset_or_other_switch_values_are_not_off():
    assert not host_allocator.disabled_by_env({})
    assert not host_allocator.disabled_by_env({host_allocator.ENV_SWITCH: "on"})
    assert not host_allocator.disabled_by_env({host_allocator.ENV_SWITCH: "auto"})


class _LibcWithout:
    """A C library without glibc's symbols (macOS, musl): attribute lookups of them fail."""

    def __init__(self, *present):
        self.calls = []
        for name in present:
            setattr(self, name, self._record(name))

    def _record(self, name):
        def function(*args):
            self.calls.append((name, args))
            return 1
        return function


def test_without_glibc_nothing_happens_quietly(capfd, tmp_path):
    musl_like = _LibcWithout("malloc", "free", "mallopt")  # musl-like: no gnu_get_libc_version
    macos_like = _LibcWithout("malloc", "free")  # no mallopt at all
    for libc in (musl_like, macos_like):
        environ = {}
        assert host_allocator.configure(environ=environ, libc=libc, dev_dir=str(tmp_path)) == "unavailable"
        assert environ == {}  # no tensor pool either
    assert musl_like.calls == []  # never called a mallopt whose parameter numbers may mean something else
    assert capfd.readouterr() == ("", "")


def test_glibc_refusing_a_value_reports_unavailable(tmp_path):
    class Refusing(_LibcWithout):
        def __init__(self):
            super().__init__("gnu_get_libc_version")
            self.mallopt = lambda param, value: 0  # glibc returns 0 for a value it rejects

    environ = {}
    assert host_allocator.configure(environ=environ, libc=Refusing(), dev_dir=str(tmp_path)) == "unavailable"
    assert environ == {}


def _fake_dev(tmp_path, *nodes):
    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    for node in nodes:
        (dev / node).touch()
    return str(dev)


@pytest.mark.parametrize("node", ["nvidia0", "kfd", "accel0", "vfio/0"])
def test_auto_leaves_accelerator_hosts_alone_and_on_forces(tmp_path, node, monkeypatch):
    monkeypatch.setattr(host_allocator, "_active", False)  # the fake "applied" below must not stick
    dev = _fake_dev(tmp_path, "nvidiactl", "null", node)
    assert host_allocator.accelerator_device_nodes(dev) == [os.path.join(dev, node)]
    for switch in ({}, {host_allocator.ENV_SWITCH: "auto"}):
        libc = _LibcWithout("gnu_get_libc_version", "mallopt")
        environ = dict(switch)
        assert host_allocator.configure(environ=environ, libc=libc, dev_dir=dev) == "accelerator host"
        assert libc.calls == [] and host_allocator.TENSOR_POOL_ENV not in environ
    libc = _LibcWithout("gnu_get_libc_version", "mallopt")
    environ = {host_allocator.ENV_SWITCH: "on"}
    assert host_allocator.configure(environ=environ, libc=libc, dev_dir=dev) == "applied"
    assert [args for _, args in libc.calls] == list(host_allocator.SETTINGS)
    assert environ[host_allocator.TENSOR_POOL_ENV] == "1"


def test_cpu_only_host_gets_both_settings_and_an_explicit_pool_choice_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(host_allocator, "_active", False)
    dev = _fake_dev(tmp_path, "null", "nvidiactl")  # nvidiactl alone (driver, no GPU) is not a device
    assert host_allocator.accelerator_device_nodes(dev) == []
    environ = {}
    libc = _LibcWithout("gnu_get_libc_version", "mallopt")
    assert host_allocator.configure(environ=environ, libc=libc, dev_dir=dev) == "applied"
    assert environ == {host_allocator.TENSOR_POOL_ENV: "1"}
    environ = {host_allocator.TENSOR_POOL_ENV: "false"}
    assert host_allocator.configure(environ=environ, libc=libc, dev_dir=dev) == "applied"
    assert environ == {host_allocator.TENSOR_POOL_ENV: "false"}


# TensorFlow without oneDNN (as on CPUs without AVX-512 VNNI/BF16 or AMX) takes every tensor from malloc.
# 20 eager adds each allocate a fresh 64 MiB tensor, above glibc's largest mmap threshold: without the
# pool each one is mmapped and its 16384 pages faulted in, with the pool the same region is reused.
_TF_PROBE = textwrap.dedent("""
    import json, resource
    from maskrcnn_tf import host_allocator
    status = host_allocator.configure()
    import tensorflow as tf
    x = tf.zeros([16 << 20])  # 64 MiB of float32
    y = x + 1.0
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        y = x + 1.0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    print(json.dumps({"status": status, "faults": faults, "sum": float(tf.reduce_sum(y))}))
""")


@pytest.mark.skipif(not GLIBC, reason="the settings apply on glibc only")
def test_tensor_pool_reuses_tensors_above_the_mmap_threshold():
    results = {}
    for switch in ("on", "off"):
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
        env[host_allocator.ENV_SWITCH] = switch
        env.pop(host_allocator.TENSOR_POOL_ENV, None)
        out = subprocess.run([sys.executable, "-c", _TF_PROBE], env=env, capture_output=True, text=True,
                             timeout=300, check=True).stdout
        results[switch] = json.loads(out.strip().splitlines()[-1])
    pages = (64 << 20) // 4096
    assert results["on"]["status"] == "applied" and results["off"]["status"] == "off"
    assert results["on"]["sum"] == results["off"]["sum"] == float(16 << 20)
    # With the pool: first touches of the pool's regions only (measured ~2.1 x pages); without: all 20 tensors.
    assert results["on"]["faults"] < 4 * pages, results
    assert results["off"]["faults"] > 10 * pages, results


def test_settings_are_the_documented_values():
    settings = dict(host_allocator.SETTINGS)
    # glibc rejects an mmap threshold above HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit.
    assert settings[host_allocator.M_MMAP_THRESHOLD] == 32 * 1024 * 1024
    assert settings[host_allocator.M_TRIM_THRESHOLD] == host_allocator.KEEP_FREE_BYTES
    assert all(0 < value < 2**31 for value in settings.values())  # mallopt takes a C int


_RUN_PROGRAM = textwrap.dedent("""
    import runpy, sys
    from maskrcnn_tf import host_allocator
    calls = []
    host_allocator.configure = lambda *args, **kwargs: calls.append(sys.argv[0])
    sys.argv = [sys.argv[1], "--helpshort"]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit:
        pass
    print("CONFIGURED", len(calls))
""")


@pytest.mark.parametrize("program", ["train.py", "eval.py", "predict.py", "export.py"])
def test_every_program_configures_the_allocator_first(program):
    # --helpshort makes absl exit inside app.run: configure() must have been called before that.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _RUN_PROGRAM, os.path.join(root, program)], cwd=root,
                         capture_output=True, text=True, timeout=300).stdout
    assert out.strip().splitlines()[-1] == "CONFIGURED 1", out[-2000:]
