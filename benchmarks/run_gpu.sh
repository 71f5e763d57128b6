#!/usr/bin/env bash
# The one prepared GPU check (issues 7 and 8), for a lent H100 via the device tool:
#   run: bash benchmarks/run_gpu.sh        (timeout_s ~540; results under $OUT)
# Builds the CUDA extension, runs every `cuda` test, then the op and engine benchmarks. Prints a
# short table; full JSON/CSV/logs go to $OUT. Copy the tables into benchmarks/RESULTS.md with the
# card and date.
set -uo pipefail
OUT="${OUT:-/tmp/fastem-gpu}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTEM_FORCE_CUDA=1 PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 -m pytest -q -m cuda tests/ 2>&1 | tee "$OUT/tests.log" | tail -5
python3 benchmarks/bench_ops.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_ops.log" | tail -25
python3 benchmarks/bench_engine.py --device cuda --model ffhq --reference-steps 10 \
    --out "$OUT/bench_engine.json" 2>&1 | tee "$OUT/bench_engine.log"
