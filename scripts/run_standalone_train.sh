#!/bin/bash
# Trains Mask R-CNN (ResNet-50-FPN, 1x schedule) on one GPU with train.py --strategy=one_device.
# The console output is also written to MODEL_DIR/train.log (to ./train.log when MODEL_DIR is a URL
# such as gs://bucket/run, which train.py writes through tf.io.gfile). Re-running the same command
# resumes from the latest checkpoint of MODEL_DIR.
set -euo pipefail

usage() {
  cat >&2 <<USAGE
Usage: bash scripts/run_standalone_train.sh RECORDS_DIR MODEL_DIR [PRETRAINED] [TRAIN_FLAGS...]
  RECORDS_DIR  output of run_download_process_data.sh (train-*.tfrecord, train_label_map.json)
  MODEL_DIR    run directory: config, checkpoints, TensorBoard logs, loss.log
  PRETRAINED   backbone weights: imagenet (default), none, or a weights file
  TRAIN_FLAGS  more train.py flags, e.g. --batch_size=4 --learning_rate=0.005 --precision=mixed_float16
Environment: DEVICE_ID (GPU index, default 0), CONFIG (preset, default coco_r50_fpn_1x),
             PYTHON (default python).
Run in the background: nohup bash scripts/run_standalone_train.sh ... > /dev/null 2>&1 &
USAGE
  exit 2
}
[[ $# -ge 2 ]] || usage
[[ $1 == -* || $2 == -* ]] && usage

RECORDS_DIR=$1
MODEL_DIR=$2
PRETRAINED=${3:-imagenet}
shift $(( $# < 3 ? $# : 3 ))
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

if [[ $RECORDS_DIR != *://* && ! -d $RECORDS_DIR ]]; then
  echo "error: records directory $RECORDS_DIR not found" >&2; exit 1
fi
LOG_FILE=train.log
if [[ $MODEL_DIR != *://* ]]; then  # a URL (gs://...) is created by train.py; the log stays local
  mkdir -p "$MODEL_DIR"
  LOG_FILE=$MODEL_DIR/train.log
fi
export CUDA_VISIBLE_DEVICES=${DEVICE_ID:-0}
"$PYTHON" "$REPO_DIR/train.py" \
  --config="${CONFIG:-coco_r50_fpn_1x}" \
  --train_file_pattern="$RECORDS_DIR/train-*" \
  --model_dir="$MODEL_DIR" \
  --strategy=one_device \
  --pretrained="$PRETRAINED" \
  "$@" 2>&1 | tee -a "$LOG_FILE"
