"""`maskrcnn-make-shapes` (the console script); the program is maskrcnn_tf/programs/make_shapes_dataset.py."""
from maskrcnn_tf.programs.make_shapes_dataset import main

if __name__ == "__main__":
    main()
