#!/usr/bin/env bash
# Everything this project still has to check on a GPU, in one run (issues 3 and 8):
#   1. the CUDA tests (tests marked `cuda`: the core against the CPU, the benchmark smoke run);
#   2. the built-in benchmark pipeline on CUDA, end to end (bf16 + channels_last as the real
#      configurations use them), its summary kept beside the results;
#   3. the GPU benchmark table (python -m cag.bench), written as JSON for benchmarks/results/.
# Usage: bash benchmarks/gpu_session.sh [OUT_DIR]   (PYTHON=... to pick the interpreter,
# BENCH_BUDGET=seconds for step 3; default 400). Commit what lands in OUT_DIR (default
# benchmarks/results) with the date, card and versions it records.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')"
out=${1:-benchmarks/results}
mkdir -p "$out"
card=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
stem="$out/$(date -u +%F)-$card"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "== 1. CUDA tests" | tee "$stem-tests.txt"
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rs tests/ 2>&1 | tee -a "$stem-tests.txt"

echo "== 2. the benchmark pipeline on CUDA"
"$PYTHON" -m cag run configs/synthetic.yaml device=cuda train.precision=fast \
    out_dir=runs/gpu quiet=true
cp runs/gpu/synthetic/summary.json "$stem-pipeline-summary.json"

echo "== 3. the GPU benchmark table"
"$PYTHON" -m cag.bench --device cuda --budget-s "${BENCH_BUDGET:-400}" --out "$stem.json"
echo "results in $stem*"
