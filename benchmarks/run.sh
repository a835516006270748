#!/usr/bin/env bash
# One command for a benchmark machine: the test suite on its device, then every benchmark, then the
# report. Results go to benchmarks/results/ (commit them) and, when $OUT is set, to $OUT as well.
#   bash benchmarks/run.sh            # GPU machine: GPU suite; CPU machine: CPU suite
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python
tmp=$(mktemp -d)
"$py" -m pytest -q -x tests 2>&1 | tail -15 | tee "$tmp/tests.txt"
"$py" -m pytest -q benchmarks/bench_loss.py benchmarks/bench_e2e.py --benchmark-json="$tmp/bench.json" \
  --benchmark-columns=median,iqr,rounds --benchmark-sort=name "$@" | tail -5
"$py" benchmarks/report.py "$tmp/bench.json"
if [ -n "${OUT:-}" ]; then
  cp "$tmp/tests.txt" "$tmp/bench.json" "$OUT"/
  cp benchmarks/results/*.md benchmarks/results/*.png "$OUT"/ 2>/dev/null || true
fi
