"""`maskrcnn-eval` (the console script); the program is maskrcnn_tf/programs/eval.py."""
from maskrcnn_tf.programs.eval import main

if __name__ == "__main__":
    main()
