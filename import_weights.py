"""`maskrcnn-import` (the console script); the program is maskrcnn_tf/programs/import_weights.py."""
from maskrcnn_tf.programs.import_weights import main

if __name__ == "__main__":
    main()
