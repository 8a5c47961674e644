"""`maskrcnn-txt-to-tfrecord` (the console script); the program is maskrcnn_tf/programs/txt_to_tfrecord.py."""
from maskrcnn_tf.programs.txt_to_tfrecord import main

if __name__ == "__main__":
    main()
