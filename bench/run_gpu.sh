#!/usr/bin/env bash
# The GPU checks, on a machine with CUDA, CuPy and torch installed (no network needed): build the C++ extension in
# place (no build isolation, no dependency resolution: the machine's own torch and CuPy stay as they are), run the
# GPU tests, then the GPU-versus-CPU comparison and the robust rules on a device slab (k = 10 with the host slab
# beside it; k = 50 on the device alone; the Gram kernel at JK_GRAM_COLUMNS 1 and 2). Results go to $OUT (default
# gpu-results/): run.log (build, device, tests, every benchmark's output) and each benchmark's tables, 7 files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
# OpenMP pools (torch's, numba's, ours) spin after each parallel region by default: passive, as the other benchmarks
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
PY="${PYTHON:-python3}"
echo "== build" | tee "$LOG"
"$PY" setup.py -q build_ext --inplace >> "$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" -c "import cupy, torch, jitkernels as jk; print('cupy', cupy.__version__, 'torch', torch.__version__,
jk.available_backends())" 2>&1 | tee -a "$LOG"
echo "== tests" | tee -a "$LOG"
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest tests/test_gpu.py tests/test_secagg.py tests/test_robust_coord.py \
  tests/test_noise.py tests/test_gpu_shim.py tests/test_cuda_source.py -k "gpu or cupy or device or shim or cuda" \
  -q -p no:cacheprovider -ra 2>&1 | tee -a "$LOG" | tail -40
echo "== comparison" | tee -a "$LOG"
timeout "${BENCH_TIMEOUT:-600}" "$PY" -m jitkernels.gpu_benchmark ${BENCH_ARGS:-} --json "$OUT/gpu_bench.json" \
  --markdown "$OUT/gpu_bench.md" --plot "$OUT/gpu_bench.png" 2>&1 | tee -a "$LOG"
echo "== robust rules on a device slab" | tee -a "$LOG"
timeout "${BENCH_TIMEOUT:-600}" "$PY" -m jitkernels.gpu_benchmark --robust --sizes 25000000 --reps 3 \
  --gram-columns 1,2 --json "$OUT/gpu_robust.json" --markdown "$OUT/gpu_robust.md" 2>&1 | tee -a "$LOG"
timeout "${BENCH_TIMEOUT:-600}" "$PY" -m jitkernels.gpu_benchmark --robust --placements device -k 50 \
  --sizes 5000000 --reps 3 --gram-columns 1,2 --markdown "$OUT/gpu_robust_k50.md" 2>&1 | tee -a "$LOG"
