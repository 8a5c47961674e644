"""benchmarks/cases/ours_gpu_train.py (compare.py --cases=gpu_train) on a machine without a GPU: one
line on stderr and exit status 1, never a CPU run passed off as a GPU figure."""
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "cases" / "ours_gpu_train.py"


def test_gpu_training_case_refuses_without_a_gpu():
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU: the case would run")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--case=gpu_train"], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 1 and proc.stdout == ""  # no JSON record
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no GPU: TensorFlow sees no GPU")
    bad = subprocess.run([sys.executable, str(SCRIPT), "--case=gpu_train", "--precisions=float64"],
                         capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert bad.returncode == 2 and "--precisions" in bad.stderr  # argparse refuses before TF starts
