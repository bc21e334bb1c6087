"""Step time of ``fastdescent.torch.Adam`` against ``torch.optim.Adam``'s three
implementations (for-loop, foreach, fused) on one model-like set of tensors."""

import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch

from .._config import num_threads
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


def time_steps(optimizers, steps, warmup=2):
    """Median wall time of ``step()`` per optimizer, in seconds, over ``steps``
    rounds; each round steps every optimizer once, so that a noisy neighbour
    slows all of them alike."""
    for _ in range(warmup):
        for optimizer in optimizers.values():
            optimizer.step()
    samples = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


@contextmanager
def _threads(n_threads):
    """Both libraries on ``n_threads`` threads (None: leave each its default)."""
    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        with num_threads(n_threads):
            yield
    finally:
        torch.set_num_threads(previous)


def benchmark_against_torch(totals=(10**5, 10**7), n_tensors=100, dtype=torch.float32,
                            steps=None, contenders=None, n_threads=None, seed=0):
    """Time one Adam step of each contender on ``n_tensors`` tensors per total size.

    Every contender gets its own copy of the same parameters and gradients
    (gradients stay fixed; only ``step()`` is timed). ``steps`` defaults to
    enough samples for a median (fewer for large totals). ``n_threads`` sets
    both torch's and fastdescent's thread count for the run (None: each its
    default). Returns a list of dicts ``{"total", "n_tensors", "dtype",
    "n_threads", "contender", "seconds", "speedup"}``, where ``speedup`` is the
    contender's time over fastdescent's (above 1: that contender is slower).
    Timings on a shared machine are noisy: compare ratios from one run, never
    absolute times across machines.
    """
    contenders = list(CONTENDERS) if contenders is None else list(contenders)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with _threads(n_threads):
        for total in totals:
            rows += _compare(total, n_tensors, dtype, steps, contenders, generator, seed)
    for row in rows:
        row["n_threads"] = n_threads
    return rows


def _compare(total, n_tensors, dtype, steps, contenders, generator, seed):
    sizes = model_sizes(total, n_tensors, seed)
    initial = [torch.randn(n, generator=generator, dtype=dtype) for n in sizes]
    grads = [torch.randn(n, generator=generator, dtype=dtype) for n in sizes]
    optimizers = {}
    for name in contenders:
        params = [torch.nn.Parameter(t.clone()) for t in initial]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizers[name] = CONTENDERS[name](params)
    times = time_steps(optimizers, steps or max(9, min(200, 2 * 10**7 // total)))
    reference = times.get("fastdescent")
    return [{"total": total, "n_tensors": n_tensors, "dtype": str(dtype).replace("torch.", ""),
             "contender": name, "seconds": seconds,
             "speedup": None if reference is None else seconds / reference}
            for name, seconds in times.items()]


def format_rows(rows):
    """The rows of :func:`benchmark_against_torch` as a text table."""
    lines = [f"{'elements':>10} {'tensors':>7} {'threads':>7} {'contender':<16} {'ms/step':>9} "
             f"{'time / fastdescent':>19}"]
    for r in rows:
        ratio = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        threads = "default" if r["n_threads"] is None else r["n_threads"]
        lines.append(f"{r['total']:>10,} {r['n_tensors']:>7} {threads:>7} {r['contender']:<16} "
                     f"{r['seconds'] * 1e3:>9.3f} {ratio:>19}")
    return "\n".join(lines)


def main(argv=None):
    """Command-line entry (for ``python -m fastdescent bench`` to call): print the table."""
    import argparse

    parser = argparse.ArgumentParser(prog="fastdescent torch benchmark", description=__doc__)
    parser.add_argument("--totals", type=int, nargs="+", default=[10**5, 10**7],
                        help="total elements of the model (default 10**5 10**7)")
    parser.add_argument("--tensors", type=int, default=100, help="parameter tensors (default 100)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both libraries (default: each its own default)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default: by size)")
    args = parser.parse_args(argv)
    rows = benchmark_against_torch(tuple(args.totals), args.tensors, getattr(torch, args.dtype),
                                   steps=args.steps, n_threads=args.threads)
    print(format_rows(rows))
    print("(median wall time per step; on a shared machine compare the ratios of one run only)")
    return 0
