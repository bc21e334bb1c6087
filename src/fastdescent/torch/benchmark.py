"""Step time of ``fastdescent.torch.Adam`` against ``torch.optim.Adam``'s three
implementations (for-loop, foreach, fused) on one model-like set of tensors."""

import statistics
import time
import weakref
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


def benchmark_step_overhead(n_tensors=(1, 100), size=1000, rounds=2000, dtype=torch.float32, seed=0):
    """Per-step cost on small tensors: ``fastdescent.torch.Adam`` against
    ``torch.optim.Adam(fused=True)``, 1 thread each, interleaved in blocks of
    steps (about 0.2 ms each).

    For each count in ``n_tensors`` (tensors of ``size`` elements, fixed
    gradients) returns ``{"n_tensors", "fastdescent", "torch fused", "ratio"}``
    with (median, q1, q3) seconds per step; the fastest block of each and their
    ratio (``"fastdescent best"``, ``"torch fused best"``, ``"best ratio"``: on
    a loaded machine, the nearest to an idle one); and ``{"reach", "reach_new"}``: the
    cost per tensor of reaching the gradients' memory (``BucketViews.collect``)
    when the gradient objects are those of the previous step, and when every
    gradient is a new tensor (as after ``zero_grad()``).
    """
    from .._tensorviews import BucketViews  # noqa: F401 (what is measured)

    generator = torch.Generator().manual_seed(seed)
    rows = []
    with _threads(1):
        for n in n_tensors:
            initial = [torch.randn(size, generator=generator, dtype=dtype) for _ in range(n)]
            grads = [torch.randn(size, generator=generator, dtype=dtype) for _ in range(n)]
            optimizers = {}
            for name, make in (("torch fused", CONTENDERS["torch fused"]), ("fastdescent", CONTENDERS["fastdescent"])):
                params = [torch.nn.Parameter(t.clone()) for t in initial]
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                optimizers[name] = make(params)
            samples = _interleaved(optimizers, max(20, rounds // n), max(1, 10 // n))
            row = {"n_tensors": n, "size": size}
            for name, times in samples.items():
                q1, median, q3 = statistics.quantiles(times, n=4)
                row[name] = (median, q1, q3)
                row[f"{name} best"] = min(times)
            row["ratio"] = row["torch fused"][0] / row["fastdescent"][0]
            row["best ratio"] = row["torch fused best"] / row["fastdescent best"]
            row["reach"], row["reach_new"] = _reach_cost(optimizers["fastdescent"], max(20, rounds // n))
            rows.append(row)
    return rows


def _interleaved(optimizers, rounds, block, warmup=20):
    """Seconds per ``step()`` of each optimizer: each round times ``block`` steps
    of each in turn."""
    for _ in range(warmup):
        for optimizer in optimizers.values():
            optimizer.step()
    samples = {name: [] for name in optimizers}
    clock = time.perf_counter
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            step = optimizer.step
            start = clock()
            for _ in range(block):
                step()
            samples[name].append((clock() - start) / block)
    return samples


def _reach_cost(optimizer, rounds):
    """Median seconds per tensor of ``collect()`` on the first bucket: with the
    same gradient objects, and with new ones (the assignment timed apart)."""
    bucket = optimizer._fd_plans[0].buckets[0]
    views, params, written = bucket.views, bucket.params, optimizer._written().table
    clock = time.perf_counter
    same, fresh, assign = [], [], []
    spare = [[p.grad.clone() for p in params] for _ in range(2)]
    for r in range(rounds):
        start = clock()
        views.collect(written)
        same.append(clock() - start)
        new = spare[r % 2]
        start = clock()
        for p, g in zip(params, new):
            p.grad = g
        assign.append(clock() - start)
        start = clock()
        for p, g in zip(params, new):
            p.grad = g
        views.collect(written)
        fresh.append(clock() - start)
    views.release()
    n = len(params)
    return statistics.median(same) / n, max(0.0, statistics.median(fresh) - statistics.median(assign)) / n


def format_overhead_rows(rows):
    """The rows of :func:`benchmark_step_overhead` as a text table."""
    lines = [f"{'tensors':>7} {'fastdescent us (q1-q3)':>24} {'torch fused us (q1-q3)':>24} {'ratio':>6} "
             f"{'best: fd / fused':>17} {'ratio':>6} {'reach us/tensor':>15} {'new grads':>9}"]
    for r in rows:
        cells = [f"{m * 1e6:.1f} ({a * 1e6:.1f}-{b * 1e6:.1f})" for m, a, b in (r["fastdescent"], r["torch fused"])]
        best = f"{r['fastdescent best'] * 1e6:.1f} / {r['torch fused best'] * 1e6:.1f}"
        lines.append(f"{r['n_tensors']:>7} {cells[0]:>24} {cells[1]:>24} {r['ratio']:>5.2f}x "
                     f"{best:>17} {r['best ratio']:>5.2f}x {r['reach'] * 1e6:>15.3f} {r['reach_new'] * 1e6:>9.3f}")
    return "\n".join(lines)


class GradientMeter:
    """Peak bytes of gradient tensors alive at once, over the backward passes of
    ``params`` (a hook sees each gradient as it completes; a finalizer sees it
    freed). Create it before :func:`step_in_backward`, so that its hooks run first."""

    def __init__(self, params):
        self.alive = self.peak = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._seen) for p in params]

    def _seen(self, param):
        size = param.grad.nbytes
        self.alive += size
        self.peak = max(self.peak, self.alive)
        weakref.finalize(param.grad, self._freed, size)

    def _freed(self, size):
        self.alive -= size

    def remove(self):
        for handle in self._handles:
            handle.remove()


def mlp_stack(width=912, layers=12, seed=0):
    """``layers`` square linear layers with tanh between them: ``2 * layers``
    tensors, about ``layers * width**2`` parameters (10**7 by default)."""
    torch.manual_seed(seed)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*blocks)


#: The last runs the worker's kernels on one thread, leaving the other core to autograd.
BACKWARD_MODES = ("backward + step", "step in backward", "step in backward, overlapped",
                  "overlapped, 1 kernel thread")


def benchmark_step_in_backward(width=912, layers=12, batch=32, rounds=15, n_threads=2, lr=1e-4, seed=0):
    """Wall time of one backward pass plus the Adam step, and the peak bytes of
    gradients alive, for :data:`BACKWARD_MODES` on the same model (one copy each),
    torch and the kernels on ``n_threads`` threads (but the last mode's kernels).

    Each round runs every mode once (forward untimed, then the timed part), so a
    noisy neighbour slows them alike. Returns rows ``{"mode", "median", "q1",
    "q3", "peak_gradient_bytes", "parameters", "tensors", "n_threads"}`` (seconds).
    """
    from ._backward import step_in_backward

    generator = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(batch, width, generator=generator), torch.randn(batch, width, generator=generator))
            for _ in range(4)]
    runs = {}
    with _threads(n_threads):
        for mode in BACKWARD_MODES:
            model = mlp_stack(width, layers, seed)
            opt = Adam(model.parameters(), lr=lr)
            meter = GradientMeter(model.parameters())
            handle = None if mode == BACKWARD_MODES[0] else step_in_backward(opt, overlap="overlapped" in mode)
            kernel_threads = 1 if mode == BACKWARD_MODES[3] else n_threads
            runs[mode] = (model, opt, meter, handle, kernel_threads, [])
        for r in range(rounds + 2):  # two warm-up rounds: state allocation, first-touch page faults
            x, y = data[r % len(data)]
            for mode, (model, opt, meter, handle, kernel_threads, times) in runs.items():
                loss = torch.nn.functional.mse_loss(model(x), y)
                with num_threads(kernel_threads):
                    start = time.perf_counter()
                    loss.backward()
                    if handle is None:
                        opt.step()
                    elapsed = time.perf_counter() - start
                opt.zero_grad()
                if r >= 2:
                    times.append(elapsed)
    rows = []
    n_params = sum(p.numel() for p in runs[BACKWARD_MODES[0]][0].parameters())
    for mode, (model, opt, meter, handle, _, times) in runs.items():
        if handle is not None:
            handle.remove()
        meter.remove()
        q1, median, q3 = statistics.quantiles(times, n=4)
        rows.append({"mode": mode, "median": statistics.median(times), "q1": q1, "q3": q3,
                     "peak_gradient_bytes": meter.peak, "parameters": n_params,
                     "tensors": len(list(model.parameters())), "n_threads": n_threads})
    return rows


def format_backward_rows(rows):
    """The rows of :func:`benchmark_step_in_backward` as a text table."""
    lines = [f"{'mode':<30} {'ms (median)':>11} {'q1-q3':>15} {'peak gradients MB':>18}"]
    for r in rows:
        lines.append(f"{r['mode']:<30} {r['median'] * 1e3:>11.1f} "
                     f"{r['q1'] * 1e3:>7.1f}-{r['q3'] * 1e3:<7.1f} {r['peak_gradient_bytes'] / 1e6:>18.1f}")
    return "\n".join(lines)


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
    parser.add_argument("--in-backward", action="store_true",
                        help="instead: backward + step against step_in_backward on a 10**7-parameter MLP")
    parser.add_argument("--overhead", action="store_true",
                        help="instead: the per-step cost at 1 and 100 tensors of 1,000 against torch fused")
    args = parser.parse_args(argv)
    if args.overhead:
        print(format_overhead_rows(benchmark_step_overhead()))
        print("(1 thread; median and quartiles per step, in blocks of up to 10 steps; "
              "reach: per tensor, gradients viewed by collect())")
        return 0
    if args.in_backward:
        rows = benchmark_step_in_backward(n_threads=args.threads or 2, rounds=args.steps or 15)
        print(f"{rows[0]['parameters']:,} parameters in {rows[0]['tensors']} tensors, Adam, "
              f"{rows[0]['n_threads']} threads")
        print(format_backward_rows(rows))
        return 0
    rows = benchmark_against_torch(tuple(args.totals), args.tensors, getattr(torch, args.dtype),
                                   steps=args.steps, n_threads=args.threads)
    print(format_rows(rows))
    print("(median wall time per step; on a shared machine compare the ratios of one run only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
