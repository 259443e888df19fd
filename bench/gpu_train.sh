#!/usr/bin/env bash
# Xception training throughput on an NVIDIA GPU: 299x299, the paper's full model (width 1.0, 8 middle
# blocks), bfloat16 mixed precision and XLA, a per-GPU batch-size sweep. Prints images/s and GPU memory
# for each batch size and writes bench/results/gpu_train.json. Finishes in under 5 minutes (each batch
# size compiles once with XLA, ~30-60 s, then 30 measured steps). Goal on one H200: >= 2,000 images/s.
#
#   bash bench/gpu_train.sh                    # uses .venv/bin/python
#   BATCHES=128,256 PY=python bash bench/gpu_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BATCHES=${BATCHES:-128,256,512}
OUT=${OUT:-bench/results/gpu_train.json}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
if ! "$PY" -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null; then
  echo "error: TensorFlow sees no GPU; install the CUDA wheels: $PY -m pip install -e '.[gpu]'" >&2
  exit 2
fi
mkdir -p "$(dirname "$OUT")"
# One line per batch size on stderr (images/s, peak GPU memory); the full JSON report goes to $OUT.
timeout 290 "$PY" -m bench.train_throughput --input-size 299 --width 1.0 --middle-blocks 8 --classes 1000 \
  --batch-sizes "$BATCHES" --warmup 5 --steps 30 --mixed-precision on --xla on --optimizer sgd --out "$OUT" >/dev/null
"$PY" -c "import json; r = json.load(open('$OUT')); print('best:', r['best_images_per_s'], 'images/s on', r['devices']['names'])"
