#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU (a lease), in one go: build ddps._C with its
# CUDA kernels, run the whole test suite with the GPU (Triton and CUDA natively; tests pick the
# device from availability), compute-sanitizer memcheck and racecheck over the sampling and
# denoiser kernel tests, and `ddps bench --device cuda --full` into benchmarks/RESULTS-cuda.md;
# then record the run (device, date, results) in ddps/gpu_checks.json, which ddps.backends()
# reports. Uses the machine's own python3 with torch and triton (no network needed: nothing is
# installed but ddps itself). The build (1-2 minutes) is skipped when ddps._C already has its CUDA
# kernels, and the other steps' time limits add up to 580 s: on a lease, one call for
# `make gpu-check` (it builds), and if that call ran out of time, a second one finds the build.
# Logs go to build/gpu-check/ and, under the device tool, to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
LOGS=build/gpu-check
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) || { echo "gpu-check: no NVIDIA GPU (nvidia-smi failed)"; exit 2; }
echo "gpu-check on $device"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember the outcome
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s ($(tail -1 "$LOGS/$name.log"))" | tee -a "$LOGS/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}
: > "$LOGS/summary.txt"
built='import ddps, torch; assert torch._C._dispatch_has_kernel_for_dispatch_key("ddps::q_sample", "CUDA")'
$PY -c "$built" 2>/dev/null && echo "build: ddps._C has its CUDA kernels already" | tee -a "$LOGS/summary.txt" \
  || step build 300 env DDPS_BUILD_CUDA=1 MAX_JOBS=$(nproc) $PY -m pip install --no-build-isolation --no-deps -e . \
  || exit 1
step backends 30 $PY -c "import ddps, json; s = ddps.backends(); print(json.dumps(s, indent=1)); assert s['cuda']['available'] and s['triton']['available']"
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
step tests 180 $PY -m pytest tests -q -p no:cacheprovider $xdist
# The caching allocator hides out-of-bounds accesses inside its pools: memcheck runs without it.
SANITIZED="tests/kernels"
step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
  $PY -m pytest $SANITIZED -q -p no:cacheprovider -k "not opcheck"
step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
  $PY -m pytest $SANITIZED -q -p no:cacheprovider -k "not opcheck"
step bench 270 $PY -m ddps bench --device cuda --full --markdown benchmarks/RESULTS-cuda.md
if [ $status -eq 0 ]; then
  $PY - "$device" "$LOGS/summary.txt" <<'PY'
import datetime, json, sys, torch, triton
from pathlib import Path
path = Path("ddps/gpu_checks.json")
record = json.loads(path.read_text())
summary = ", ".join(line.split(" (")[0] for line in Path(sys.argv[2]).read_text().splitlines())
record["executed"].append({"device": sys.argv[1], "date": datetime.date.today().isoformat(),
                           "summary": f"torch {torch.__version__}, triton {triton.__version__}: {summary}"})
path.write_text(json.dumps(record, indent=2) + "\n")
PY
fi
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-check-logs.tgz" "$LOGS" 2>/dev/null
  cp benchmarks/RESULTS-cuda.md ddps/gpu_checks.json "$OUT/" 2>/dev/null
fi
cat "$LOGS/summary.txt"
echo "gpu-check: $([ $status -eq 0 ] && echo passed || echo FAILED) on $device"
exit $status
