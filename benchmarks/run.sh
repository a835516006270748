#!/usr/bin/env bash
# One command for a benchmark machine; outputs go to $OUT as well when it is set.
#   GPU machine: benchmarks/gpu_check.py (environment, the core tests on the GPU, sanitizers, timings,
#                the fused linear losses; < 8 minutes)
#   CPU machine: the test suite, every benchmark, then the report (benchmarks/results/<device>.*)
#   bash benchmarks/run.sh [arguments for gpu_check.py, or for the benchmarks' pytest run on a CPU]
# No step stops the script: every output is written and copied out, then the exit status says
# whether anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
tmp=$(mktemp -d)
status=0
if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$py" benchmarks/gpu_check.py --out "$tmp/gpu_check" "$@" || status=$?
  outputs=("$tmp/gpu_check")
else
  "$py" -m pytest -q tests >"$tmp/tests.txt" 2>&1 || status=$?
  tail -15 "$tmp/tests.txt"
  "$py" -m pytest -q benchmarks/bench_loss.py benchmarks/bench_e2e.py --benchmark-json="$tmp/bench.json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name "$@" | tail -5 || status=$?
  [ -s "$tmp/bench.json" ] && { "$py" benchmarks/report.py "$tmp/bench.json" || status=$?; }
  outputs=("$tmp/tests.txt" "$tmp/bench.json" benchmarks/results/*.md benchmarks/results/*.png)
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp -r "${outputs[@]}" "$OUT"/ 2>/dev/null || true
fi
echo "run.sh: outputs in $tmp${OUT:+ and $OUT}; exit status $status"
exit "$status"
