#!/bin/bash
# COCO evaluation of a training run with eval.py: prints the bbox and segm tables, writes
# MODEL_DIR/eval/detections.json and metrics.json, and the console output to MODEL_DIR/eval/eval.log
# (to ./eval.log when MODEL_DIR is a URL such as gs://bucket/run; eval.py writes there through gfile).
set -euo pipefail

usage() {
  cat >&2 <<USAGE
Usage: bash scripts/run_eval.sh MODEL_DIR RECORDS_DIR VAL_JSON [CHECKPOINT]
  MODEL_DIR    run directory written by train.py (config.json, checkpoints/)
  RECORDS_DIR  output of run_download_process_data.sh (val-*.tfrecord)
  VAL_JSON     COCO annotations of those images, e.g. COCO_DIR/annotations/instances_val2017.json
  CHECKPOINT   checkpoint prefix, e.g. MODEL_DIR/checkpoints/ckpt-90000 (default: the latest)
Environment: DEVICE_ID (GPU index, default 0), PYTHON (default python).
USAGE
  exit 2
}
[[ $# -eq 3 || $# -eq 4 ]] || usage

MODEL_DIR=$1
RECORDS_DIR=$2
VAL_JSON=$3
CHECKPOINT=${4:-}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

if [[ $MODEL_DIR != *://* && ! -d $MODEL_DIR ]]; then
  echo "error: model directory $MODEL_DIR not found" >&2; exit 1
fi
[[ -f $VAL_JSON ]] || { echo "error: val json $VAL_JSON not found" >&2; exit 1; }
CHECKPOINT_FLAG=()
[[ -n $CHECKPOINT ]] && CHECKPOINT_FLAG=(--checkpoint="$CHECKPOINT")
LOG_FILE=eval.log
if [[ $MODEL_DIR != *://* ]]; then  # a URL (gs://...): eval.py writes eval/ itself, the log stays local
  mkdir -p "$MODEL_DIR/eval"
  LOG_FILE=$MODEL_DIR/eval/eval.log
fi
export CUDA_VISIBLE_DEVICES=${DEVICE_ID:-0}
"$PYTHON" "$REPO_DIR/eval.py" \
  --model_dir="$MODEL_DIR" \
  --eval_file_pattern="$RECORDS_DIR/val-*" \
  --val_json="$VAL_JSON" \
  "${CHECKPOINT_FLAG[@]}" 2>&1 | tee "$LOG_FILE"
