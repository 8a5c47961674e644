"""torch / torchvision as test oracles in a process that already runs TensorFlow.

Importing torchvision.ops pulls in torch._dynamo, which imports triton when it is installed; triton's C
extension crashes (segmentation fault) when TensorFlow is already loaded, as it always is under pytest
(conftest.py configures TensorFlow's devices). The oracles run on the CPU, where torch never needs
triton, so the import is blocked and torch sees triton as not installed.
"""
import sys

import pytest


def import_torchvision():
    """(torch, torchvision), or skips the test when they are not installed."""
    sys.modules.setdefault("triton", None)  # None in sys.modules: `import triton` raises ImportError
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    return torch, torchvision


def import_torch():
    """torch alone (torch.optim imports triton too), or skips the test when it is not installed."""
    sys.modules.setdefault("triton", None)
    return pytest.importorskip("torch")


def resnet_features(resnet, images):
    """C2..C5 (NHWC numpy) of a torchvision ResNet's body for NHWC float32 numpy images."""
    torch = import_torch()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = {}
    with torch.no_grad():
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        for level, layer in zip((2, 3, 4, 5), (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)):
            x = layer(x)
            out[f"C{level}"] = x.permute(0, 2, 3, 1).numpy()
    return out
