#!/usr/bin/env bash
# The prepared GPU job of the natural prior: one device run of at most 9 minutes wall, start-up
# included. It reads the compact data pack (`python python/pack_training_data.py`, carried as
# .pack) and writes the weights and the log under $OUT (the device tool's folder; else ./runs):
#
#   device run, carry [".pack"]:  bash python/train_prior_gpu.sh
#   back here:  cp <files>/natural_gpu/natural_s2c32.safetensors fastem_ext/weights/
#               python python/evaluate_prior.py --card
#
# Extra arguments go to train_prior.py (a CPU smoke test: ... --device cpu --batch 2 --crop 32
# --minutes 0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 FASTEM_DATA="${FASTEM_DATA:-.pack/data}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 python/train_prior.py --config gpu --device cuda --minutes 8.5 --out "$out/natural_gpu" \
    "$@" 2>&1 | tee "$out/train_gpu.log"
