#!/bin/bash
# Downloads COCO 2017 (train/val images + instance annotations), verifies the archives, unpacks them and
# converts them into sharded TFRecords with data_prep/coco_to_tfrecord.py.
#
# Checksums: the md5 sums of the official archives on images.cocodataset.org, as published by many
# independent projects (NVIDIA's DeepLearningExamples, PaddleDetection, torchvision-based loaders). Each
# archive's byte size is checked too, so a truncated download fails before the (slow) md5.
# Re-running is safe: verified archives are not downloaded again, unzip keeps existing files, and the
# converter writes each shard atomically.
set -euo pipefail

usage() {
  cat >&2 <<USAGE
Usage: bash scripts/run_download_process_data.sh COCO_DIR RECORDS_DIR
  COCO_DIR     where the zips are downloaded and unpacked (needs ~45 GB: 19 GB zips + 19 GB images)
  RECORDS_DIR  where the TFRecords go: train-*-of-00256.tfrecord, val-*-of-00032.tfrecord,
               label maps and summaries (~20 GB)
Environment: COCO_BASE_URL (default http://images.cocodataset.org, e.g. a local mirror),
             PYTHON (default python), NUM_WORKERS (default \$(nproc)).
USAGE
  exit 2
}
[[ $# -eq 2 ]] || usage

COCO_DIR=$1
RECORDS_DIR=$2
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
NUM_WORKERS=${NUM_WORKERS:-$(nproc)}
BASE_URL=${COCO_BASE_URL:-http://images.cocodataset.org}
TRAIN_SHARDS=256
VAL_SHARDS=32

# archive (path under BASE_URL)  md5  size in bytes
ARCHIVES=(
  "zips/train2017.zip cced6f7f71b7629ddf16f17bbcfab6b2 19336861798"
  "zips/val2017.zip 442b8da7639aecaf257c1dceb8ba8c80 815585330"
  "annotations/annotations_trainval2017.zip f4bbac642086de4f52a3fdda2de5fa2c 252907541"
)

for tool in unzip md5sum "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is not installed" >&2; exit 1; }
done
if command -v wget >/dev/null; then
  fetch() { wget --continue --tries=5 --output-document="$2" "$1"; }
elif command -v curl >/dev/null; then
  fetch() { curl --fail --location --retry 5 --continue-at - --output "$2" "$1"; }
else
  echo "error: neither wget nor curl is installed" >&2
  exit 1
fi

file_size() { stat --format=%s "$1"; }

verify() {  # verify FILE MD5 SIZE: exit status 0 when the file is complete and intact
  [[ -f $1 ]] && [[ $(file_size "$1") == "$3" ]] && echo "$2  $1" | md5sum --check --status
}

mkdir -p "$COCO_DIR" "$RECORDS_DIR"
for entry in "${ARCHIVES[@]}"; do
  read -r remote md5 size <<<"$entry"
  zip_path="$COCO_DIR/$(basename "$remote")"
  if verify "$zip_path" "$md5" "$size"; then
    echo "$zip_path: already downloaded and verified"
  else
    echo "downloading $BASE_URL/$remote ($size bytes) -> $zip_path"
    fetch "$BASE_URL/$remote" "$zip_path"
    if ! verify "$zip_path" "$md5" "$size"; then
      echo "error: $zip_path: size $(file_size "$zip_path") (expected $size) or md5 differs from $md5;" \
           "delete it and run again" >&2
      exit 1
    fi
    echo "$zip_path: md5 and size verified"
  fi
  unzip -q -n "$zip_path" -d "$COCO_DIR"
done

for split in train val; do
  shards=$TRAIN_SHARDS
  [[ $split == val ]] && shards=$VAL_SHARDS
  echo "converting ${split}2017 into $shards shards with $NUM_WORKERS workers"
  "$PYTHON" "$REPO_DIR/data_prep/coco_to_tfrecord.py" \
    --image_dir="$COCO_DIR/${split}2017" \
    --annotation_file="$COCO_DIR/annotations/instances_${split}2017.json" \
    --output_prefix="$RECORDS_DIR/$split" \
    --num_shards="$shards" \
    --num_workers="$NUM_WORKERS"
done
echo "done: train records $RECORDS_DIR/train-*, val records $RECORDS_DIR/val-*," \
     "val json $COCO_DIR/annotations/instances_val2017.json"
