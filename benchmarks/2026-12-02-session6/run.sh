#!/usr/bin/env bash
# The quiet-window run of session 6 (2026-12-02): the figures of the issues still open
# (16: low-precision state; 20: threads), the per-step cost (13's, re-checked after
# this session's changes to the step paths), and a training loop whose own work uses
# every core (loop_blas.py). Run from the project root:
#   bash benchmarks/2026-12-02-session6/run.sh
set -u
OUT=benchmarks/2026-12-02-session6
P=${PYTHON:-.venv/bin/python}
run() {  # name, command...: tables to $OUT/name.txt, progress to $OUT/name.log
    local name=$1; shift
    echo "== $name: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
    "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
# issue 16: low-precision state at 1e8 (and bitsandbytes' 8-bit Adam), state memory
run lowprec $P -m fastdescent bench --cases sizes memory --rules adam --state-dtypes float32 bfloat16 int8 \
    --sizes 1e6 1e8 --dtypes float32 --threads 2 --methods kernel torch-fused bnb-8bit --repeats 3 --rounds 3 \
    --json $OUT/lowprec.json
# issue 20: the threading sweep, back to back and after idle gaps
run threads $P -m fastdescent bench --cases threads --json $OUT/threads.json
# the user's side of the wake policy: a loop whose matrix products use every core
run loop-blas $P $OUT/loop_blas.py
# issue 13's figures after this session's step-path changes
run steps $P -m fastdescent bench --cases steps --json $OUT/steps.json
echo "== done: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
