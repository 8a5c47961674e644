"""The TPU path on the CPU: the whole train step (forward, backward, optimizer update) with static
shapes, the gather RoIAlign backend and bfloat16 compiles under jit_compile=True, XLA_CPU standing in
for a TPU. A fresh process, so its compile time and memory do not land on other tests.

tf.function(jit_compile=True) must compile every op of the function or fail ("No registered ... OpKernel
for XLA_CPU_JIT"), so a passing run shows that no op of the forward or backward pass lacks an XLA
kernel; the op list is checked as well for the ops the issue named (sparse matmul, DynamicPartition).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

# Ops without an XLA kernel that the CPU path uses (crop_and_resize backend, sparse RoIAlign gradient).
NO_XLA_KERNEL = ("CropAndResize", "CropAndResizeGradImage", "SparseTensorDenseMatMul", "DynamicPartition")

_STEP = r"""
import json, keras, numpy as np, tensorflow as tf
from maskrcnn_tf import config as config_lib
from maskrcnn_tf.model import build_model
from maskrcnn_tf.optimizer import build_optimizer
from tests.e2e.synthetic import TWO_IMAGES, make_batch, tiny_test_config

keras.utils.set_random_seed(0)
cfg = tiny_test_config(**{"model.roi.roi_align_backend": "gather", "train.precision": "mixed_bfloat16",
                          "train.jit_compile": True})
model = build_model(cfg)
optimizer = build_optimizer(cfg, model)
model.compile(optimizer=optimizer, jit_compile=True)
optimizer.build(model.trainable_variables)
assert not model._trims_padding()  # static shapes under XLA
data, _ = make_batch(cfg, TWO_IMAGES)
data = {k: tf.constant(v) for k, v in data.items()}
step = tf.function(model.train_step, jit_compile=True)
ops = set()
graph = step.get_concrete_function(data).graph
ops |= {op.type for op in graph.get_operations()}
for function in graph._functions.values():
    ops |= {node.op for node in function.definition.node_def}
before = [v.numpy().copy() for v in model.trainable_variables]
losses = {k: float(v) for k, v in step(data).items()}
changed = sum(int(not np.array_equal(b, v.numpy())) for b, v in zip(before, model.trainable_variables))
print(json.dumps({"losses": losses, "ops": sorted(ops), "changed": changed,
                  "variables": len(before), "iterations": int(optimizer.iterations.numpy()),
                  "feature_dtype": model.backbone.compute_dtype}))
"""


@pytest.mark.slow
def test_train_step_compiles_under_xla_with_gather_backend_and_bfloat16():
    proc = subprocess.run([sys.executable, "-c", _STEP], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2",
                                                CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["feature_dtype"] == "bfloat16"
    assert all(np.isfinite(v) for v in result["losses"].values()) and result["losses"]["total_loss"] > 0
    assert result["iterations"] == 1 and result["changed"] > result["variables"] // 2  # the update ran
    assert {"Conv2DBackpropFilter", "Conv2DBackpropInput"} <= set(result["ops"])  # the backward pass is in it
    assert not set(NO_XLA_KERNEL) & set(result["ops"]), set(NO_XLA_KERNEL) & set(result["ops"])
