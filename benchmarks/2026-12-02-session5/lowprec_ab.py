"""A/B of the stored pass: another tree's avx512 kernels (OTHER_SO, default main's)
and this tree's, side by side in one process, with the in-run ceiling; with one
thread the time is the thread's CPU time (other processes on the cores do not count).
usage: PYTHONPATH=src python lowprec_ab.py N THREADS ROUNDS STATE_DTYPE...
e.g.   PYTHONPATH=src python lowprec_ab.py 1e8 1 7 bfloat16 int8"""
import importlib.util, os, sys, time, statistics
import numpy as np
from fastdescent import catalog, _dispatch
from fastdescent.bench import cases

def load(path):
    spec = importlib.util.spec_from_file_location("fastdescent._kernels_avx512", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

mine = _dispatch.load_variant("avx512")
main = load(os.environ.get("OTHER_SO", "/work/main/src/fastdescent/_kernels_avx512.cpython-311-x86_64-linux-gnu.so"))
assert main is not mine and main.__file__ != mine.__file__
n = int(float(sys.argv[1])); nt = int(sys.argv[2]); rounds = int(sys.argv[3]); dtypes = sys.argv[4:]
rule = catalog.RULES["adam"]
steps = {}
for sd in dtypes:
    problem = cases.make_problem(rule, n, np.float32, state_dtype=sd)
    steps[f"{sd} main"] = cases.stored_call(rule, problem, main, nt)
    steps[f"{sd} mine"] = cases.stored_call(rule, problem, mine, nt)
    (roles, writes), = cases.ceiling_passes(rule, problem)
    steps[f"{sd} ceil"] = (lambda roles=roles, writes=writes: mine.stream_mixed(roles, writes, nt))
inner = max(1, int(3e8 // n) // 10)
times = {k: [] for k in steps}
for r in range(rounds + 1):
    for k, f in steps.items():
        clock = time.thread_time if nt == 1 else time.perf_counter
        t0 = clock()
        for _ in range(inner):
            f()
        dt = (clock() - t0) / inner
        if r:
            times[k].append(dt)
for k, ts in times.items():
    med = statistics.median(ts)
    print(f"{k:18s} med {n / med / 1e6:7.0f} Melem/s  min-time {n / min(ts) / 1e6:7.0f}  spread {n/max(ts)/1e6:6.0f}-{n/min(ts)/1e6:6.0f}")
for sd in dtypes:
    a, b, c = (statistics.median(times[f"{sd} {w}"]) for w in ("main", "mine", "ceil"))
    pr = [x / y for x, y in zip(times[f"{sd} main"], times[f"{sd} mine"])]
    print(f"{sd}: mine/main speed {a / b:.3f} (per-round {min(pr):.2f}-{max(pr):.2f});  %ceil main {c / a:.0%} mine {c / b:.0%}")
