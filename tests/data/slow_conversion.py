"""Runs data_prep/coco_to_tfrecord.py with every image read slowed down, so a test can kill a conversion
while it writes: `python tests/data/slow_conversion.py SECONDS_PER_IMAGE [converter flags ...]`.

The slowdown is patched in here (workers are forked and inherit it), not hooked in production code.
"""
import os
import runpy
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from maskrcnn_tf.data import image_files

    seconds = float(sys.argv.pop(1))
    read = image_files.read_image_file

    def slow_read_image_file(path):
        time.sleep(seconds)
        return read(path)

    image_files.read_image_file = slow_read_image_file
    sys.argv[0] = os.path.join(REPO_ROOT, "data_prep", "coco_to_tfrecord.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
