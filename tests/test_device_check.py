"""benchmarks/device_check.py on CPU replicas, as CI and a user's laptop run it: mirrored + jit_compile
trains (XLA per replica), a float16 overflow on replica 1 only skips the step on both replicas, and the
GPU-only checks say why they skip."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "device_check.py"


@pytest.mark.slow
def test_device_check_on_cpu_replicas():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3"))
    lines = {r["check"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    assert list(lines) == ["devices", "mirrored_jit", "overflow", "nms_precision", "throughput"]
    assert lines["devices"]["status"] == "pass" and len(lines["devices"]["replicas"]) == 2
    jit = lines["mirrored_jit"]
    assert jit["status"] == "pass" and jit["steps"] == 3 and jit["xla_forward_and_backward"]
    assert jit["collectives_inside_xla"] == []  # the gradient sum stays outside XLA
    # Before: replica 0 applied the inf-holding sum (weights -inf) and the scale stayed at its start.
    overflow = lines["overflow"]
    assert overflow["status"] == "pass" and overflow["weights_moved"] == []
    assert overflow["loss_scale"] == 512.0 and overflow["skipped_steps"] == 1 and overflow["iterations"] == 1
    for name in ("nms_precision", "throughput"):
        assert lines[name]["status"] == "skip" and lines[name]["reason"].startswith("no GPU")


def test_unknown_check_is_refused_before_tensorflow_starts():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--checks=devices,warp_drive"], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "--checks" in proc.stderr and proc.stdout == ""
