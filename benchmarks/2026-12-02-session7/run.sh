#!/usr/bin/env bash
# The quiet-window run of session 7 (2026-12-02): issue 16's figures (Adam with
# bfloat16 and int8 state at 1e8 on 2 threads, against torch fused) in several
# sittings a few minutes apart, since torch fused alone moved 1,022-1,343 Melem/s
# between session 6's sittings; bitsandbytes' 8-bit Adam and the state memory once;
# the per-step cost. Run from the project root:
#   bash benchmarks/2026-12-02-session7/run.sh [sittings]
set -u
OUT=benchmarks/2026-12-02-session7
P=${PYTHON:-.venv/bin/python}
SITTINGS=${1:-5}
run() {  # name, command...: tables to $OUT/name.txt, progress to $OUT/name.log
    local name=$1; shift
    echo "== $name: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
    "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
run lowprec $P -m fastdescent bench --cases sizes memory --rules adam --state-dtypes float32 bfloat16 int8 \
    --sizes 1e6 1e8 --dtypes float32 --threads 2 --methods kernel torch-fused bnb-8bit --repeats 3 --rounds 3 \
    --json $OUT/lowprec.json
for s in $(seq 2 "$SITTINGS"); do
    sleep 60
    run lowprec-$s $P -m fastdescent bench --cases sizes --rules adam --state-dtypes bfloat16 int8 --sizes 1e8 \
        --dtypes float32 --threads 2 --methods kernel torch-fused --repeats 3 --rounds 5 --json $OUT/lowprec-$s.json
done
run steps $P -m fastdescent bench --cases steps --json $OUT/steps.json   # rerun with the state axis: sittings.sh
echo "== done: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
