"""host_allocator: the malloc settings really apply (and keep freed blocks for reuse), the off switch and a
C library without glibc's mallopt leave everything alone quietly, and every program configures it."""
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
    tuned, default = _probe(), _probe(switch="off")
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


def test_unset_or_other_switch_values_mean_on():
    assert not host_allocator.disabled_by_env({})
    assert not host_allocator.disabled_by_env({host_allocator.ENV_SWITCH: "on"})


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


def test_without_glibc_nothing_happens_quietly(capfd):
    musl_like = _LibcWithout("malloc", "free", "mallopt")  # musl-like: no gnu_get_libc_version
    macos_like = _LibcWithout("malloc", "free")  # no mallopt at all
    for libc in (musl_like, macos_like):
        assert host_allocator.configure(environ={}, libc=libc) == "unavailable"
    assert musl_like.calls == []  # never called a mallopt whose parameter numbers may mean something else
    assert capfd.readouterr() == ("", "")


def test_glibc_refusing_a_value_reports_unavailable():
    class Refusing(_LibcWithout):
        def __init__(self):
            super().__init__("gnu_get_libc_version")
            self.mallopt = lambda param, value: 0  # glibc returns 0 for a value it rejects

    assert host_allocator.configure(environ={}, libc=Refusing()) == "unavailable"


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
