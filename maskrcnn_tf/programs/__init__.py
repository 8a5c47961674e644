"""The command-line programs. Each module holds one program and its absl flags, and has a `main()` that
setup.py installs as a console script (maskrcnn-train, maskrcnn-eval, maskrcnn-export, maskrcnn-predict,
maskrcnn-import, maskrcnn-coco-to-tfrecord, maskrcnn-txt-to-tfrecord, maskrcnn-make-shapes). The files at
the repository root (train.py, ..., data_prep/*.py) are two-line shims calling the same `main()`, so
`python train.py ...` keeps working. Import a program module only to run it: its flags join absl's
global FLAGS, and two programs define flags of the same name.
"""
