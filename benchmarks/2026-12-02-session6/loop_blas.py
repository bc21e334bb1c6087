"""A training loop whose forward/backward uses every core: does our workers' spin
after a step slow the user's own multi-threaded work?

Each iteration: NumPy float32 matrix products over ~8 MB of weights on NumPy's
default BLAS threads (the "model"), then one float32 Adam step of N elements.
Timed: the whole iteration (what a user waits for), median over rounds. Every
contender runs in its own process (the wait policy is read once), and the
contenders take turns round by round.

    python benchmarks/2026-12-02-session6/loop_blas.py [--sizes ...] [--rounds R]
"""
import argparse
import json
import subprocess
import sys

CONTENDERS = {  # name: (environment, step)
    "fd 2 thr": ({}, "fd2"),
    "fd 2 thr passive": ({"OMP_WAIT_POLICY": "passive"}, "fd2"),
    "fd 1 thr": ({}, "fd1"),
    "torch fused": ({}, "torch"),
}

CHILD = r"""
import json, sys, time
import numpy as np
n, how, iters = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
w = rng.standard_normal((1024, 1024)).astype(np.float32)   # 4 MB
x = rng.standard_normal((256, 1024)).astype(np.float32)
def model():
    h = x @ w          # forward
    return h @ w.T     # backward-like
if how == "torch":
    import torch
    p = torch.randn(n); p.grad = torch.randn(n)
    opt = torch.optim.Adam([p], lr=1e-3, fused=True)
    step = opt.step
else:
    import fastdescent as fd
    p, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal(n).astype(np.float32))
    threads = 2 if how == "fd2" else 1
    count = [0]
    def step():
        count[0] += 1
        fd.adam_step(p, g, m, v, step=count[0], lr=1e-3, n_threads=threads)
for _ in range(5):
    model(); step()
times = []
for _ in range(iters):
    t = time.perf_counter(); model(); step(); times.append(time.perf_counter() - t)
print(json.dumps(float(np.median(times))))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[2**16, 2**18, 2**20, 2**22])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    import os
    import statistics
    print(f"{'n':>9} " + " ".join(f"{c:>17}" for c in CONTENDERS) + "   (median iteration, us; [min-max over rounds])")
    for size in args.sizes:
        n = int(size)
        samples = {c: [] for c in CONTENDERS}
        for r in range(args.rounds):
            names = list(CONTENDERS)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                env, how = CONTENDERS[name]
                out = subprocess.run([sys.executable, "-c", CHILD, str(n), how, str(args.iters)],
                                     env={**os.environ, **env}, capture_output=True, text=True, check=True)
                samples[name].append(json.loads(out.stdout) * 1e6)
        cells = [f"{statistics.median(s):7.0f} [{min(s):.0f}-{max(s):.0f}]" for s in samples.values()]
        print(f"{n:>9} " + " ".join(f"{c:>17}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
