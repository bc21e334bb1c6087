"""
Kernel against reference
========================

Every rule exists twice: a fused Cython kernel and a NumPy reference written from
its equations. They round identically, so after any number of steps the
parameters are equal bit for bit; the kernel is faster because it makes one pass
over memory where NumPy makes one per operation. This script times one Adam step
with each backend over a range of sizes (median of a few repeats: expect noise on
a busy machine) and checks the results after ten steps.
"""

import time

import matplotlib.pyplot as plt
import numpy as np

import fastdescent as fd


def adam_run(n, backend, steps=10):
    rng = np.random.default_rng(0)
    param = rng.standard_normal(n).astype(np.float32)
    grads = rng.standard_normal((steps, n)).astype(np.float32)
    m, v = np.zeros_like(param), np.zeros_like(param)
    seconds = []
    for t in range(1, steps + 1):
        start = time.perf_counter()
        fd.adam_step(param, grads[t - 1], m, v, step=t, lr=1e-3, backend=backend)
        seconds.append(time.perf_counter() - start)
    return param, float(np.median(seconds[1:]))


sizes = [10**3, 10**4, 10**5, 10**6]
rates = {"kernel": [], "reference": []}
for n in sizes:
    results = {backend: adam_run(n, backend) for backend in rates}
    assert np.array_equal(results["kernel"][0], results["reference"][0])  # bit for bit
    for backend in rates:
        rates[backend].append(n / results[backend][1] / 1e6)

fig, ax = plt.subplots(figsize=(7, 4.2))
for backend, rate in rates.items():
    ax.plot(sizes, rate, "-o", label=backend)
ax.set(xscale="log", yscale="log", xlabel="parameters (float32)", ylabel="million parameters per second",
       title=f"one Adam step, {fd.get_num_threads()} thread(s); parameters equal after 10 steps")
ax.grid(alpha=0.3, which="both")
ax.legend()
fig.tight_layout()

for n, k, r in zip(sizes, rates["kernel"], rates["reference"]):
    print(f"{n:>9,} elements: kernel {k:8.1f} Melem/s, reference {r:8.1f} Melem/s, {k / r:5.1f}x")
