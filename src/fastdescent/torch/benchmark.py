"""Step time of ``fastdescent.torch.Adam`` against ``torch.optim.Adam``'s three
implementations (for-loop, foreach, fused) on one model-like set of tensors."""

import statistics
import time

import numpy as np
import torch

from .optimizers import Adam

#: The contenders: a label and how to build the optimizer.
CONTENDERS = {
    "torch for-loop": lambda params: torch.optim.Adam(params, foreach=False),
    "torch foreach": lambda params: torch.optim.Adam(params, foreach=True),
    "torch fused": lambda params: torch.optim.Adam(params, fused=True),
    "fastdescent": lambda params: Adam(params),
}


def model_sizes(total, n_tensors, seed=0):
    """``n_tensors`` sizes summing to ``total``, spread like a network's (a few
    large weight matrices, many small biases and norms): log-uniform over three
    decades."""
    rng = np.random.default_rng(seed)
    weights = np.exp(rng.uniform(0.0, np.log(1000.0), n_tensors))
    sizes = np.maximum(1, np.floor(weights / weights.sum() * total)).astype(np.int64)
    sizes[np.argmax(sizes)] += total - sizes.sum()
    return [int(n) for n in sizes]


def time_steps(optimizer, steps, warmup=2):
    """Median wall time of ``optimizer.step()`` over ``steps`` calls, in seconds."""
    for _ in range(warmup):
        optimizer.step()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def benchmark_against_torch(totals=(10**5, 10**7), n_tensors=100, dtype=torch.float32,
                            steps=None, contenders=None, seed=0):
    """Time one Adam step of each contender on ``n_tensors`` tensors per total size.

    Every contender gets its own copy of the same parameters and gradients
    (gradients stay fixed; only ``step()`` is timed). ``steps`` defaults to
    enough samples for a median (fewer for large totals). Returns a list of
    dicts ``{"total", "n_tensors", "dtype", "contender", "seconds", "speedup"}``,
    where ``speedup`` is the contender's time over fastdescent's (above 1: that
    contender is slower). Timings on a shared machine are noisy: compare
    ratios from one run, never absolute times across machines.
    """
    contenders = list(CONTENDERS) if contenders is None else list(contenders)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for total in totals:
        sizes = model_sizes(total, n_tensors, seed)
        initial = [torch.randn(n, generator=generator, dtype=dtype) for n in sizes]
        grads = [torch.randn(n, generator=generator, dtype=dtype) for n in sizes]
        n_steps = steps or max(5, min(200, 2 * 10**7 // total))
        times = {}
        for name in contenders:
            params = [torch.nn.Parameter(t.clone()) for t in initial]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            times[name] = time_steps(CONTENDERS[name](params), n_steps)
        reference = times.get("fastdescent")
        for name in contenders:
            rows.append({
                "total": total, "n_tensors": n_tensors, "dtype": str(dtype).replace("torch.", ""),
                "contender": name, "seconds": times[name],
                "speedup": None if reference is None else times[name] / reference,
            })
    return rows


def format_rows(rows):
    """The rows of :func:`benchmark_against_torch` as a text table."""
    lines = [f"{'elements':>10} {'tensors':>7} {'contender':<16} {'ms/step':>9} {'vs fastdescent':>15}"]
    for r in rows:
        ratio = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"{r['total']:>10,} {r['n_tensors']:>7} {r['contender']:<16} "
                     f"{r['seconds'] * 1e3:>9.3f} {ratio:>15}")
    return "\n".join(lines)
