"""`maskrcnn-coco-to-tfrecord` (the console script); the program is maskrcnn_tf/programs/coco_to_tfrecord.py."""
from maskrcnn_tf.programs.coco_to_tfrecord import main

if __name__ == "__main__":
    main()
