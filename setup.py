"""Installs maskrcnn_tf: `pip install -e .[test]`."""
from setuptools import find_packages, setup

setup(
    name="maskrcnn_tf",
    version="0.1.0",
    description="Mask R-CNN (ResNet-FPN) instance segmentation for TensorFlow 2 / Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["maskrcnn_tf", "maskrcnn_tf.*"]),
    python_requires=">=3.9",
    install_requires=[
        "tensorflow>=2.16",  # bundles Keras 3
        "numpy",
        "pycocotools",
        "opencv-python-headless",
        "absl-py",
    ],
    # Console scripts; the root files (train.py, eval.py, ..., data_prep/*.py) run the same main().
    entry_points={
        "console_scripts": [
            "maskrcnn-train=maskrcnn_tf.programs.train:main",
            "maskrcnn-eval=maskrcnn_tf.programs.eval:main",
            "maskrcnn-export=maskrcnn_tf.programs.export:main",
            "maskrcnn-predict=maskrcnn_tf.programs.predict:main",
            "maskrcnn-import=maskrcnn_tf.programs.import_weights:main",
            "maskrcnn-coco-to-tfrecord=maskrcnn_tf.programs.coco_to_tfrecord:main",
            "maskrcnn-txt-to-tfrecord=maskrcnn_tf.programs.txt_to_tfrecord:main",
            "maskrcnn-make-shapes=maskrcnn_tf.programs.make_shapes_dataset:main",
        ],
    },
    extras_require={
        # NVIDIA GPUs: TensorFlow's own CUDA and cuDNN wheels (Linux). A TPU VM brings tensorflow-tpu and
        # libtpu instead (README, "Install"): install this package there with --no-deps.
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        # torch/torchvision (and PIL, for JPEG pixels) are executable oracles for the tests, never runtime
        # dependencies; ruff runs in tests/test_lint.py.
        "test": ["pytest", "pytest-xdist", "ruff==0.17.6", "pillow", "torch==2.14.1", "torchvision==0.29.1"],
    },
)
