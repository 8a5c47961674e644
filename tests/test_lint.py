"""ruff (configured in ruff.toml: pyflakes, pycodestyle, 120 columns) passes on the whole repository."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_ruff_passes():
    beside_python = os.path.join(os.path.dirname(sys.executable), "ruff")
    ruff = beside_python if os.path.exists(beside_python) else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([ruff, "check", "--output-format", "concise", str(REPO_ROOT)], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
