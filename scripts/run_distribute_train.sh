#!/bin/bash
# Distributed training with train.py.
#  - one machine: MirroredStrategy over all GPUs the machine has (global batch = --batch_size, 16 by
#    default, split evenly; 8 GPUs -> 2 images per GPU as in the 1x recipe);
#  - several machines (--multi_worker): MultiWorkerMirroredStrategy. Run the same command on every
#    machine, each with its own TF_CONFIG (cluster + this task's index), the standard way Kubernetes /
#    Kubeflow / Vertex AI launch TF jobs; MODEL_DIR must be shared storage that all workers can write
#    (the chief writes checkpoints and logs).
# The console output is also written to MODEL_DIR/train[-worker-I].log (to ./train[-worker-I].log when
# MODEL_DIR is a URL such as gs://bucket/run, which train.py writes through tf.io.gfile).
set -euo pipefail

usage() {
  cat >&2 <<USAGE
Usage: bash scripts/run_distribute_train.sh [--multi_worker] RECORDS_DIR MODEL_DIR [PRETRAINED] [TRAIN_FLAGS...]
  --multi_worker  MultiWorkerMirroredStrategy; TF_CONFIG must be set, e.g.
                  TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                              "task": {"type": "worker", "index": 0}}'
  RECORDS_DIR     output of run_download_process_data.sh (train-*.tfrecord, train_label_map.json)
  MODEL_DIR       run directory (shared storage with --multi_worker)
  PRETRAINED      backbone weights: imagenet (default), none, or a weights file
  TRAIN_FLAGS     more train.py flags, e.g. --batch_size=32 --precision=mixed_float16
Environment: CONFIG (preset, default coco_r50_fpn_1x), PYTHON (default python).
USAGE
  exit 2
}
STRATEGY=mirrored
if [[ ${1:-} == --multi_worker ]]; then
  STRATEGY=multi_worker_mirrored
  shift
fi
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
LOG_NAME=train.log
if [[ $STRATEGY == multi_worker_mirrored ]]; then
  if [[ -z ${TF_CONFIG:-} ]]; then
    echo "error: --multi_worker needs TF_CONFIG (cluster spec and this worker's task index)" >&2
    exit 1
  fi
  TASK_INDEX=$("$PYTHON" -c 'import json, os; print(json.loads(os.environ["TF_CONFIG"])["task"]["index"])')
  LOG_NAME=train-worker-$TASK_INDEX.log
else
  NUM_GPUS=$("$PYTHON" -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' \
             2>/dev/null) || NUM_GPUS=0
  if [[ $NUM_GPUS -lt 1 ]]; then
    echo "error: TensorFlow sees no GPU on this machine; use run_standalone_train.sh" >&2
    exit 1
  fi
  echo "training on $NUM_GPUS GPUs with MirroredStrategy"
fi

LOG_FILE=$LOG_NAME
if [[ $MODEL_DIR != *://* ]]; then  # a URL (gs://...) is created by train.py; the log stays local
  mkdir -p "$MODEL_DIR"
  LOG_FILE=$MODEL_DIR/$LOG_NAME
fi
"$PYTHON" "$REPO_DIR/train.py" \
  --config="${CONFIG:-coco_r50_fpn_1x}" \
  --train_file_pattern="$RECORDS_DIR/train-*" \
  --model_dir="$MODEL_DIR" \
  --strategy="$STRATEGY" \
  --pretrained="$PRETRAINED" \
  "$@" 2>&1 | tee -a "$LOG_FILE"
