"""Importing torch (test-only oracle) into a process that already runs TensorFlow.

torch.optim and torchvision import triton lazily, and loading triton's native library after
TensorFlow's segfaults this process (torch 2.14 / triton with TF 2.21 on CPU: a segmentation fault in
`import triton` from torch.optim.SGD's first call). No GPU here, so triton is never needed: it is hidden
from the import system and torch falls back to its eager kernels, as on a machine without triton.
"""
import sys

import pytest


def import_torch():
    """torch, or skip the test when it is not installed."""
    sys.modules.setdefault("triton", None)  # a None entry makes `import triton` raise ImportError
    return pytest.importorskip("torch")
