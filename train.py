"""`maskrcnn-train` (the console script); the program is maskrcnn_tf/programs/train.py."""
from maskrcnn_tf.programs.train import main

if __name__ == "__main__":
    main()
