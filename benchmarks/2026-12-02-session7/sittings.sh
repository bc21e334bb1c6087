#!/usr/bin/env bash
# Sittings of issue 16's row after the int8-lean merge (c8b23c0): Adam with bfloat16 and
# int8 state at 1e8 on 2 threads against torch fused, a minute apart; then the
# per-step cost with native and low-precision state. Run from the project root:
#   bash benchmarks/2026-12-02-session7/sittings.sh [sittings]
set -u
OUT=benchmarks/2026-12-02-session7
P=${PYTHON:-.venv/bin/python}
for s in $(seq 1 "${1:-5}"); do
    [ "$s" -gt 1 ] && sleep 45
    echo "== after-$s: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
    $P -m fastdescent bench --cases sizes --rules adam --state-dtypes bfloat16 int8 --sizes 1e8 --dtypes float32 \
        --threads 2 --methods kernel torch-fused --repeats 3 --rounds 5 --json "$OUT/after-$s.json" \
        > "$OUT/after-$s.txt" 2> "$OUT/after-$s.log"
done
echo "== steps: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
$P -m fastdescent bench --cases steps --state-dtypes native bfloat16 int8 --json "$OUT/steps.json" \
    > "$OUT/steps.txt" 2> "$OUT/steps.log"
echo "== done: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
