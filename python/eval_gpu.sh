#!/usr/bin/env bash
# The prepared GPU job of issue 12's evaluation: one device run of at most 9 minutes wall. On the
# 2-core CPU one blind run takes ~45 s, so the README's table (24 Kodak crops × σ 5, 10, 20/255,
# Fast EM (three restarts each since 2026-11-29) and the non-blind oracle: 288 runs) takes hours
# there; on an H200 the fast engine takes about a second a run. Stage 1 refreshes that table
# (eval split); stage 2, if variants or blind methods are given, runs them against the default on
# 24 tuning crops (tune split, the only one to choose settings on).
#
#   device run, carry [".pack"]:  bash python/eval_gpu.sh [VARIANT ...]
#       e.g.  bash python/eval_gpu.sh ridge=1 lam=0.5
#             FASTEM_ABLATION_METHODS="fastem-pigdm fastem2-pigdm" bash python/eval_gpu.sh
#   back here: <files>/eval-val-s{10,5,20} and <files>/ablation-tune, each results.csv and
#   summary.json (no images: they hold crops of the data). The ablation (blind methods
#   FASTEM_ABLATION_METHODS, default fastem-pigdm, × the variants and the default) gets the last
#   60 s per pair.
#
# FASTEM_EVAL_ARGS is appended to every evaluate.py call (a CPU smoke test:
# FASTEM_EVAL_ARGS="--device cpu --images 1 --steps 3" bash python/eval_gpu.sh gradient=0).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 FASTEM_DATA="${FASTEM_DATA:-.pack/data}"
extra=(${FASTEM_EVAL_ARGS:---device cuda})
start=$SECONDS
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTEM_FORCE_CUDA=1
    timeout 240 python3 setup.py build_ext --inplace >/dev/null 2>&1 \
        || echo "extension build failed: the ops run on Triton"
    echo "build: $((SECONDS - start)) s"
fi
# evaluate.py writes its tables at its end, so each σ is its own call (a run cut short by the
# budget loses only the σ in flight); only results.csv and summary.json come back (the device
# returns at most 8 files).
stage() {  # stage NAME LIMIT_S ARGS...: one evaluate.py call under $out/NAME within LIMIT_S
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 60 ]; then
        echo "$name: skipped, only $limit s left"
        return
    fi
    timeout "$limit" python3 python/evaluate.py "$@" --grids 0 --out "$out/$name" "${extra[@]}" \
        2>&1 | grep -v "evaluate:"
    rm -f "$out/$name/table.md" "$out/$name/runtime_psnr.png"
    echo "$name: $((SECONDS - start)) s"
}
# The ablation's share of the budget: 60 s per blind method and variant (default included).
read -r -a methods <<<"${FASTEM_ABLATION_METHODS:-}"
ablate=$(($# > 0 || ${#methods[@]} > 0))
[ ${#methods[@]} -gt 0 ] || methods=(fastem-pigdm)
reserve=$((ablate ? 60 * ($# + 1) * ${#methods[@]} : 0))
for sigma in 10 5 20; do
    stage "eval-val-s$sigma" $((${FASTEM_EVAL_BUDGET_S:-540} - (SECONDS - start) - reserve)) \
        --images 24 --sigmas "$sigma" --methods fastem-pigdm oracle
done
if [ "$ablate" -eq 1 ]; then
    stage ablation-tune $((${FASTEM_EVAL_BUDGET_S:-540} - (SECONDS - start))) --split tune \
        --images 24 --sigmas 10 --methods "${methods[@]}" --variants default "$@"
fi
