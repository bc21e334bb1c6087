"""Per-step cost of one tree (whatever fastdescent is on sys.path): JSON to stdout.
python compare.py LABEL -> {label, rows: {case: [median, min, max]}}"""
import itertools, json, os, statistics, sys, time
import numpy as np
import fastdescent as fd

def time_step(step, repeats=21, min_time=0.004):
    step()
    start = time.perf_counter(); step(); elapsed = time.perf_counter() - start
    calls = max(1, int(min_time / max(elapsed, 1e-9)))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            step()
        samples.append((time.perf_counter() - t) / calls)
    return [statistics.median(samples), min(samples), max(samples)]

def cases(count, size):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(size, dtype=np.float32) for _ in range(count)]
    grads = [0.1 * rng.standard_normal(size, dtype=np.float32) for _ in range(count)]
    m = [np.zeros(size, np.float32) for _ in range(count)]
    v = [np.zeros(size, np.float32) for _ in range(count)]
    steps = itertools.count(10)
    if count == 1:
        p, g, mm, vv = params[0], grads[0], m[0], v[0]
        face = lambda: fd.adam_step(p, g, mm, vv, step=next(steps), n_threads=1)
    else:
        face = lambda: fd.adam_step(params, grads, m, v, step=next(steps), n_threads=1)
    opt = fd.Adam([q.copy() for q in params], n_threads=1)
    optimizer = lambda: opt.step(grads)
    flat = fd.Adam([q.copy() for q in params], n_threads=1, flat=True)
    for view, gg in zip(flat.grads, grads):
        view[...] = gg
    return {"face": face, "optimizer": optimizer, "optimizer-flat": flat.step}

label = sys.argv[1]
shapes = [(1, 1000), (100, 1000), (1, 10**6), (1, 10**7)]
out = {"label": label, "load_start": os.getloadavg(), "rows": {}}
for count, size in shapes:
    for name, step in cases(count, size).items():
        out["rows"][f"{count}x{size} {name}"] = time_step(step, repeats=21 if size < 10**6 else 9,
                                                          min_time=0.004 if size < 10**6 else 0.05)
out["load_end"] = os.getloadavg()
print(json.dumps(out))
