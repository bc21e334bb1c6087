"""Step time of a 100-array model: per-array face calls, one multi-tensor optimizer step, flat arena."""
import time, numpy as np, fastdescent as fd

def median_time(fn, repeats=15, min_time=0.05):
    fn()
    samples = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn(); n += 1
            el = time.perf_counter() - start
            if el >= min_time: break
        samples.append(el / n)
    s = np.array(samples) * 1e6
    return np.median(s), s.min(), s.max()

rng = np.random.default_rng(0)
for total in (10**5, 10**7):
    sizes = rng.integers(1, 3, 100).astype(float); sizes = np.maximum(1, (sizes / sizes.sum() * total)).astype(int)
    for rule in ("sgd_momentum", "adam"):
        for threads in (1, 2):
            params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
            grads = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in sizes]
            if rule == "adam":
                m = [np.zeros_like(p) for p in params]; v = [np.zeros_like(p) + 0.01 for p in params]
                t = [1]
                def per_array():
                    t[0] += 1
                    for p, g, a, b in zip(params, grads, m, v):
                        fd.adam_step(p, g, a, b, step=t[0], lr=1e-3, n_threads=threads)
                make = lambda ps, **kw: fd.Adam(ps, lr=1e-3, n_threads=threads, **kw)
            else:
                bufs = [np.zeros_like(p) for p in params]
                def per_array():
                    for p, g, b in zip(params, grads, bufs):
                        fd.sgd_step(p, g, b, lr=1e-3, momentum=0.9, n_threads=threads)
                make = lambda ps, **kw: fd.SGD(ps, lr=1e-3, momentum=0.9, n_threads=threads, **kw)
            multi = make(params)
            flat = make([p.copy() for p in params], flat=True)
            for fg, g in zip(flat.grads, grads): fg[...] = g
            r1 = median_time(per_array); r2 = median_time(lambda: multi.step(grads)); r3 = median_time(lambda: flat.step())
            print(f"{total:>9,} {rule:<13} {threads}thr  per-array {r1[0]:9.1f} ({r1[1]:.0f}-{r1[2]:.0f})  multi {r2[0]:9.1f} ({r2[1]:.0f}-{r2[2]:.0f})  flat {r3[0]:9.1f} ({r3[1]:.0f}-{r3[2]:.0f}) us")
