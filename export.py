"""`maskrcnn-export` (the console script); the program is maskrcnn_tf/programs/export.py."""
from maskrcnn_tf.programs.export import main

if __name__ == "__main__":
    main()
