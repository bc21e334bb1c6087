"""A/B of Adam's int8 stored pass: another build's avx512 kernels (OTHER_SO) and
this tree's, interleaved in one process, per-thread rate from the thread's CPU
time (1 thread) or wall time (more), medians of ROUNDS rounds.
INNER: calls per round (default 3e8 / N / 10); the fastest decile of the rounds
estimates the rate when the other vCPU was idle.
usage: PYTHONPATH=src python int8_ab.py N THREADS ROUNDS [nearest|stochastic]...
e.g.   OTHER_SO=/tmp/before.so PYTHONPATH=src python int8_ab.py 65536 1 15 nearest stochastic"""
import importlib.util, os, sys, time, statistics
import numpy as np
from fastdescent import catalog, _dispatch, precision
from fastdescent.bench import cases


def load(path):
    spec = importlib.util.spec_from_file_location("fastdescent._kernels_avx512", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stored_call(rule, problem, backend, n_threads, rounding):
    spec = rule.spec
    storage = precision.Storage.of(problem.state_dtype, rounding=rounding, seed=1 if rounding == "stochastic" else None)
    params, grads = cases.as_list(problem.params), cases.as_list(problem.grads)
    buffers = {b.name: None for b in spec.buffers}
    buffers.update((name, cases.as_list(a)) for name, a in zip(rule.state, problem.state))
    scales = {name: cases.as_list(s) for name, s in problem.scales.items()}
    params, grads, formats = precision.kernel_call(storage, spec, cases.STEADY_STEP, params, grads, buffers, None, scales)
    kwargs = spec.kernel_arguments(rule.hyper, step=cases.STEADY_STEP, grad_scale=1.0,
                                   scalar_state=rule.scalar_state_at(cases.STEADY_STEP))
    return lambda: spec.call(backend, params, grads, buffers, kwargs, n_threads, formats, [0])


mine = _dispatch.load_variant("avx512")
other = load(os.environ["OTHER_SO"])
assert other is not mine
n = int(float(sys.argv[1])); nt = int(sys.argv[2]); rounds = int(sys.argv[3]); roundings = sys.argv[4:] or ["nearest"]
rule = catalog.RULES["adam"]
steps = {}
for rounding in roundings:
    problem = cases.make_problem(rule, n, np.float32, state_dtype="int8")
    steps[f"{rounding} before"] = stored_call(rule, problem, other, nt, rounding)
    steps[f"{rounding} after"] = stored_call(rule, problem, mine, nt, rounding)
inner = int(os.environ.get("INNER", max(1, int(3e8 // n) // 10)))
clock = time.thread_time if nt == 1 else time.perf_counter
times = {k: [] for k in steps}
for r in range(rounds + 1):
    for k, f in steps.items():
        t0 = clock()
        for _ in range(inner):
            f()
        if r:
            times[k].append((clock() - t0) / inner)
for k, ts in times.items():
    rate = lambda t: n / t / nt / 1e6
    print(f"{k:20s} median {rate(statistics.median(ts)):6.0f} Melem/s per thread  (rounds {rate(max(ts)):.0f}-{rate(min(ts)):.0f}, "
          f"fastest decile {rate(sorted(ts)[len(ts) // 10]):.0f})")
for rounding in roundings:
    a, b = times[f"{rounding} before"], times[f"{rounding} after"]
    pr = [x / y for x, y in zip(a, b)]
    print(f"{rounding}: after/before {statistics.median(a) / statistics.median(b):.2f}x (per round {min(pr):.2f}-{max(pr):.2f}, "
          f"fastest deciles {sorted(a)[len(a) // 10] / sorted(b)[len(b) // 10]:.2f}x)")
