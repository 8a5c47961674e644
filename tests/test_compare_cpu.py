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


def test_v2_cases_run_their_scripts_with_per_case_shared_weights(tmp_path):
    args = compare.parse_args(["--cases=infer_800,infer_800_v2,train,train_v2", "--peers=torchvision",
                               "--image_size=256", "--repeats=1", f"--log_dir={tmp_path}",
                               "--torch_python=/tv/python", "--ours_python=/ours/python"])
    cases_dir = REPO_ROOT / "benchmarks" / "cases"
    weights = {}
    for case in ("infer_800", "infer_800_v2"):
        weights[case] = str(tmp_path / f"{case}_torchvision_weights.pth")
        assert compare.shared_weights(case, args) == weights[case]
        for side, python in (("ours", "/ours/python"), ("torchvision", "/tv/python")):
            # The same script as infer_800, the case's own weights file, no --image_size (800 x 1333 fixed).
            assert compare.command(case, side, args) == (
                python, str(cases_dir / f"{side}_infer_800.py"),
                [f"--case={case}", f"--weights={weights[case]}", "--repeats=1"])
    assert weights["infer_800"].endswith("/infer_800_torchvision_weights.pth")  # the name infer_800 always had
    for case in ("train", "train_v2"):
        for side in ("ours", "torchvision"):
            python, script, flags = compare.command(case, side, args)
            assert script == str(cases_dir / f"{side}_model.py")
            assert flags[:3] == [f"--case={case}", "--image_size=256", "--repeats=1"]
    # Only torchvision has the v2 cases; 'all' runs them; the goals.
    assert compare.CASE_PEERS["infer_800_v2"] == compare.CASE_PEERS["train_v2"] == ("torchvision",)
    assert {"infer_800", "infer_800_v2", "train_v2"} <= set(compare.parse_args(["--cases=all"]).case_list)
    assert compare.GOALS[("torchvision", "infer_800")] == compare.GOALS[("torchvision", "infer_800_v2")] == ("<=", 0.75)
    assert compare.GOALS[("torchvision", "train_v2")] == ("<=", 0.8)


def test_prepare_shared_weights_writes_the_case_file(tmp_path, monkeypatch):
    # A stand-in torchvision script: writes the file its --weights flag names when given --write_weights.
    script = tmp_path / "fake_write.py"
    script.write_text("import sys\nflags = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
                      "assert '--write_weights' in sys.argv\nopen(flags['--weights'], 'w').write('x')\n")
    original = compare.command
    monkeypatch.setattr(compare, "command", lambda case, side, args: (
        compare.sys.executable, str(script), original(case, side, args)[2]))
    args = compare.parse_args(["--cases=infer_800_v2", "--peers=torchvision", f"--log_dir={tmp_path}"])
    assert compare.prepare_shared_weights("infer_800_v2", args, str(tmp_path)) is None
    assert (tmp_path / "infer_800_v2_torchvision_weights.pth").exists()
    assert not (tmp_path / "infer_800_torchvision_weights.pth").exists()
    assert (tmp_path / "infer_800_v2_write_weights.stderr").exists()
    args = compare.parse_args(["--cases=infer_800_v2", "--peers=", f"--log_dir={tmp_path}"])
    skipped = compare.prepare_shared_weights("infer_800_v2", args, str(tmp_path))["skipped"]
    assert "needs the torchvision peer" in skipped
