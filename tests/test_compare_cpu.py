"""benchmarks/compare.py reports each case process's own user/system CPU seconds and minor page faults."""
import importlib.util
import textwrap

from tests.conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("compare", REPO_ROOT / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

# A stand-in case script: ~0.3 s of Python arithmetic (user time) and 64 MiB touched page by page
# (16384 minor faults at 4 KiB pages), then the one JSON line; its harness record carries its own counts.
_CASE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {cases!r})
    import time, _harness
    _harness.claim_stdout()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    buffer = bytearray(64 << 20)
    for i in range(0, len(buffer), 4096):
        buffer[i] = 1
    _harness.emit(_harness.record("fake", "ours", "seconds", [1.0], None, {{}}))
""")


def test_run_case_adds_the_child_process_cpu_and_faults(tmp_path, monkeypatch):
    script = tmp_path / "fake_case.py"
    script.write_text(_CASE.format(cases=str(REPO_ROOT / "benchmarks" / "cases")))
    monkeypatch.setattr(compare, "command", lambda case, side, args: (compare.sys.executable, str(script), []))
    args = compare.parse_args(["--cases=infer", "--peers="])
    record = compare.run_case("infer", "ours", args, str(tmp_path))
    cpu = record["process_cpu"]
    assert set(cpu) == {"user_s", "system_s", "minor_faults"}
    assert cpu["user_s"] + cpu["system_s"] >= 0.3 - 0.05  # the busy loop (process_time = user + system)
    assert cpu["minor_faults"] >= 16384  # every page of the 64 MiB buffer
    own = record["cpu"]  # the script's own getrusage at record time, inside the same process
    assert own["minor_faults"] >= 16384 and own["minor_faults"] <= cpu["minor_faults"]
    assert own["user_s"] <= cpu["user_s"] + 0.02
    # The summary line repeats both sides' counts next to time and RSS.
    line = compare.summarize("infer", "torchvision", record, dict(record, process_cpu={"user_s": 1.0}))
    assert line["process_cpu_ours"] == cpu and line["process_cpu_theirs"] == {"user_s": 1.0}
