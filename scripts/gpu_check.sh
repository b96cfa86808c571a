#!/usr/bin/env bash
# The whole GPU check in one call: build, gpu tests, compute-sanitizer, Nsight Compute counters
# beside the emulator's, benchmarks, and a short summary printed last. Run from the repository
# root on the lent machine; everything worth keeping goes to $OUT (default ./gpu_out).
#   bash scripts/gpu_check.sh            # everything
#   QUICK=1 bash scripts/gpu_check.sh    # build + tests + sanitizers only
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
log() { echo "== $* ($(date +%T))"; }
status=0

log "environment"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -2; python -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
  git rev-parse HEAD; git status --porcelain | head -20; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log "build (sm_90, failures fatal)"
if ! FLASHCONV_REQUIRE_CUDA=1 FLASHCONV_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=16 \
     pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python -m flashconv | tee -a "$OUT/env.txt"
python -c "import flashconv._C as C; print('selftest', C.selftest(0))" 2>&1 | tee -a "$OUT/env.txt"

log "gpu tests"
python -m pytest -m gpu -q -rfE --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -5 "$OUT/gpu_tests.log"

log "compute-sanitizer (small shapes)"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python scripts/sanitize_case.py \
    > "$OUT/sanitizer_$tool.log" 2>&1 && echo "$tool: clean" || { echo "$tool: ERRORS"; status=1; }
  tail -3 "$OUT/sanitizer_$tool.log"
done

log "Nsight Compute counters beside the emulator's (bench/ncu_compare.py)"
if command -v ncu >/dev/null 2>&1; then
  METRICS=$(python -c "from bench.ncu_compare import METRICS; print(','.join(METRICS.values()))")
  timeout 240 ncu --clock-control none --csv --page raw --metrics "$METRICS" \
    -k regex:"fftconv_(fwd|bwd)_kernel" python scripts/ncu_case.py > "$OUT/ncu.csv" 2> "$OUT/ncu.log" \
    || { echo "ncu: FAILED"; tail -5 "$OUT/ncu.log"; status=1; }
  python bench/ncu_compare.py "$OUT/ncu.csv" --json "$OUT/ncu_compare.json" > "$OUT/ncu_compare.log" 2>&1 \
    || { echo "ncu_compare: FAILED"; tail -5 "$OUT/ncu_compare.log"; status=1; }
  head -40 "$OUT/ncu_compare.log"
else
  echo "ncu not found: no hardware counters"
fi

if [ -z "${QUICK:-}" ]; then
  log "benchmark sweep"
  python bench/sweep.py --no-cpu --out "$OUT" > "$OUT/sweep.log" 2>&1 || status=1
  for b in bench/lra.py bench/long.py; do
    [ -f "$b" ] || continue
    log "$b"
    python "$b" --out "$OUT" > "$OUT/$(basename "$b" .py).log" 2>&1 || status=1
  done
fi

log "summary"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
[ -f "$OUT/sweep.log" ] && sed -n '/GPU forward/,$p' "$OUT/sweep.log" | head -60
exit $status
