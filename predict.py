"""`maskrcnn-predict` (the console script); the program is maskrcnn_tf/programs/predict.py."""
from maskrcnn_tf.programs.predict import main

if __name__ == "__main__":
    main()
