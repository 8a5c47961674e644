"""train.py --seed: two runs of the same command give the same losses step by step (sampling, data order
and initialisation all follow the seed); another seed gives other losses."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

TRAIN_PY = str(REPO_ROOT / "train.py")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_the_same_seed_repeats_a_run_exactly(coco_sample, tmp_path):
    sample = coco_sample("coco_2img/train")  # a real COCO image, or the generated stand-in (tests/conftest.py)
    _run(str(REPO_ROOT / "data_prep" / "coco_to_tfrecord.py"), f"--image_dir={sample.image_dir}",
         f"--annotation_file={sample.annotation_file}", f"--output_prefix={tmp_path / 'train'}", "--num_shards=1")
    logs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        stdout = _run(TRAIN_PY, "--config=tiny", f"--train_file_pattern={tmp_path / 'train'}-*",
                      f"--model_dir={tmp_path / name}", "--train_steps=3", "--batch_size=1", f"--seed={seed}",
                      "--image_size=128x128", "--params_override=train.log_every_steps=1")
        # The run says where it leaves its preset, the seed included.
        assert f"train.seed: None -> {seed}" in stdout and "model.image_size: (256, 256) -> (128, 128)" in stdout
        logs[name] = (tmp_path / name / "loss.log").read_text().splitlines()
    assert len(logs["a"]) == 3
    assert logs["a"] == logs["b"]  # every loss component, every step, to the printed digit
    assert logs["a"][0] != logs["c"][0]
