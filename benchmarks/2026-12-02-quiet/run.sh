#!/usr/bin/env bash
# The quiet-window run of session 5 (2026-12-02) (no other work on the machine): every figure
# the open issues ask for, in one sitting. Run from the project root:
#   bash benchmarks/2026-12-02-quiet/run.sh
set -u
OUT=benchmarks/2026-12-02-quiet
P=${PYTHON:-.venv/bin/python}
run() {  # name, command...: tables to $OUT/name.txt, progress to $OUT/name.log
    local name=$1; shift
    echo "== $name: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
    "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
}
# issue 12 and 17: each new rule (and Lion) at 1e8 float32 on 2 threads against its ceiling and torch
run rules $P -m fastdescent bench --cases sizes --rules adadelta adamax nadam radam rprop asgd adafactor muon lion adam \
    --sizes 1e6 1e8 --dtypes float32 --threads 2 --methods kernel torch-foreach torch-fused --repeats 3 --rounds 3 \
    --json $OUT/rules.json
# issue 16: low-precision state at 1e8 (and bitsandbytes' 8-bit Adam), state memory
run lowprec $P -m fastdescent bench --cases sizes memory --rules adam --state-dtypes float32 bfloat16 int8 \
    --sizes 1e6 1e8 --dtypes float32 --threads 2 --methods kernel torch-fused bnb-8bit --repeats 3 --rounds 3 \
    --json $OUT/lowprec.json
# issue 17 part 3: fused accumulate-and-step against accumulate-then-step
run accumulate $P -m fastdescent bench --cases accumulate --json $OUT/accumulate.json
# issue 13: per-step overhead (fd faces and optimizers, the torch adapter) beside torch fused
run steps $P -m fastdescent bench --cases steps --json $OUT/steps.json
run torch-overhead $P -m fastdescent.torch.benchmark --overhead
# issue 20: the threading sweep, back to back and after idle gaps
run threads $P -m fastdescent bench --cases threads --json $OUT/threads.json
echo "== done: $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
