#!/usr/bin/env bash
# The one prepared GPU check (issues 7, 8, 14 and 17), for a lent H100/H200 via the device tool:
#   run: bash benchmarks/run_gpu.sh        (timeout_s 600; results under $OUT)
# Builds the CUDA extension, runs every `cuda` test, then the op and engine benchmarks. Each stage
# has its own time limit so one slow stage cannot take the others' results with it (the last
# one ends FASTEM_GPU_BUDGET_S, default 540, after the start). Prints a
# short table; full JSON/CSV/logs go to $OUT. Copy the tables into benchmarks/RESULTS.md with the
# card and date.
set -uo pipefail
OUT="${OUT:-/tmp/fastem-gpu}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTEM_FORCE_CUDA=1 PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
start=$SECONDS
timeout 270 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
rm -f "$OUT/build.log"  # the device tool returns at most 8 files
echo "build: $((SECONDS - start)) s"
# pytest-xdist (where installed) keeps going if a worker process crashes.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
timeout 150 python3 -m pytest -q -rfE --tb=short -m cuda -p no:cacheprovider $workers tests/ 2>&1 \
    | tee "$OUT/tests.log" | tail -25
echo "tests: $((SECONDS - start)) s"
timeout 60 python3 benchmarks/bench_ops.py --device cuda --out "$OUT" 2>&1 | tail -25
echo "ops: $((SECONDS - start)) s"
# The fused norm alone (FFHQ-size layers, bf16, n = 1 and 4): modules vs the op's backends.
timeout 90 python3 -m pytest -q -p no:xdist -p no:cacheprovider -m cuda \
    benchmarks/test_bench_group_norm.py --benchmark-max-time=0.2 \
    --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/bench_group_norm.json" 2>&1 \
    | tail -25
echo "group norm: $((SECONDS - start)) s"
# Issue 14: reference vs fast vs fused (the UNet's norms as ops.group_norm_silu) vs compiled
# (network Inductor-compiled inside the captured step),
# the bundled prior first (small, compiles fast), then the FFHQ-256 UNet with DPS. A new particle
# count recompiles once (torch then marks the batch dimension dynamic); at most 8 files in $OUT.
timeout 150 python3 benchmarks/bench_engine.py --device cuda --model natural --no-dps --particles 1 \
    --engines reference fast fused compiled --reference-steps 10 --out "$OUT/bench_natural.json" 2>&1
echo "natural: $((SECONDS - start)) s"
# Issues 12/17: one photo at a time vs its three restarts, four photos, or both in one network
# call (kernel groups): run(batch_restarts=True), run_together (fastem batch --batch-images).
timeout 150 python3 benchmarks/bench_batching.py --device cuda --out "$OUT/bench_batching.json" 2>&1
echo "batching: $((SECONDS - start)) s"
left=$((${FASTEM_GPU_BUDGET_S:-540} - (SECONDS - start)))
if [ "$left" -lt 30 ]; then
    echo "engine (FFHQ): skipped, only $left s of the budget left"
else
    timeout "$left" python3 benchmarks/bench_engine.py \
        --device cuda --model ffhq --engines reference fast fused compiled --reference-steps 10 \
        --out "$OUT/bench_engine.json" 2>&1
fi
echo "engine: $((SECONDS - start)) s"
