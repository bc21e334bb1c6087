"""The threading sweep of ``python -m fastdescent bench --cases threads`` (issue 20).

Does the threading policy pay at every size, both in a tight loop and in a
training loop? float32 Adam on one array of 2**14 to 2**24 elements (the
functional face, ``fd.adam_step``), fastdescent on 1 and on 2 threads beside
``torch.optim.Adam(fused=True)`` on 2 threads, timed:

* back to back: the mean of many consecutive calls per sample;
* after idle gaps (``--sweep-gaps``, default 1, 5 and 20 ms): every sample is one
  call timed alone after that long of other work, so idle workers have had time
  to park. The other work (``--sweep-gap-work``) is by default what a training
  loop does between two steps, a forward and backward pass: NumPy float32 matrix
  products over 8 MB of weights (more than a core's L2 cache: the caller's
  arrays are evicted as they would be), on one BLAS thread
  (``--sweep-gap-threads``, through threadpoolctl when installed). One thread
  keeps the gap's length and the other cores free of another library's
  threads: OpenBLAS's workers spin up to ~0.1 s after a product, and on a busy
  machine a 2-thread product waits for a time slice (1 ms gaps lasted 17 ms at
  load 6). It also leaves a worker's part in its own core's cache, which
  favours 2 threads a little; ``--sweep-gap-threads 0`` uses all of NumPy's.
  ``spin`` busy-waits instead. Only the step is timed, never the gap's work.

With ``--sweep-fixed-order`` a fourth contender, fastdescent on 2 threads with
the alternating order switched off (every call runs each thread's part front to
back, as before it existed), shows in the same run what that order gains
("fixed 2thr" and "alt gain", its time over the alternating one's).

The contenders take turns in blocks: every round runs each of them (in an order
that rotates from round to round) for one untimed call, then a few timed samples.
Each timed call thus follows the same contender's previous call (whose pool is the
one that went idle), and all three are measured over the same minutes, so that
the load other processes put on the machine spreads evenly over the columns.

Each table prints the medians, "2/1 thr" (fastdescent's 1-thread time over its
2-thread time) and "vs fused" (torch fused's time over fastdescent's 2-thread
time), both above 1 when 2-thread fastdescent is faster, after a gap "woke"
(of fastdescent's 2-thread calls that ran on the pool, untimed ones included,
how many had to wake parked workers: the others found them spinning), and
whether issue 20's goals hold at that size:

* back to back: >= 1.5x torch fused from 10**5 to about 10**6 elements
  (2**17 to 2**20), >= 1.1x at about 4 x 10**6 (2**22);
* after a gap: >= 1.0x torch fused at every size, and 2 threads never more than
  5 % slower than 1 (2/1 thr >= 0.95);
* at 10**8 (in the default sizes: the memory-bound end), 2 threads not slower
  than 1 in either setting.
"""

import os
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from functools import partial

import numpy as np

from .. import _dispatch
from ..catalog import RULES
from .cases import Unavailable, make_problem, stepper, time_step
from .report import _num, _table

DEFAULT_SIZES = (*(2**k for k in range(14, 25)), 10**8)
DEFAULT_GAPS = (0.001, 0.005, 0.02)
CONTENDERS = (("kernel", 1), ("kernel", 2), ("torch-fused", 2))
FIXED_ORDER = ("kernel-fixed-order", 2)  # --sweep-fixed-order
RULE, DTYPE = "adam", "float32"
GAP_WORKS = ("matmul", "spin")
BLOCK = 5  # timed samples per contender per round


def add_arguments(parser, size_type=int):
    """The sweep's options (the sweep runs with ``--cases threads``); ``size_type``
    parses an element count."""
    parser.add_argument("--sweep-sizes", nargs="+", type=size_type, metavar="N", default=list(DEFAULT_SIZES),
                        help="array sizes of the threads case (default: 2**14 ... 2**24 and 1e8)")
    parser.add_argument("--sweep-gaps", nargs="+", type=float, metavar="SECONDS", default=list(DEFAULT_GAPS),
                        help="idle gaps of the threads case, besides back to back (default: 0.001 0.005 0.02)")
    parser.add_argument("--sweep-idle-repeats", type=int, default=30, metavar="N",
                        help="calls timed alone per idle gap and contender in the threads case (default: 30)")
    parser.add_argument("--sweep-gap-work", choices=GAP_WORKS, default="matmul",
                        help="what the threads case does in a gap: NumPy matrix products over 8 MB, as a "
                             "forward/backward pass (default), or a busy wait")
    parser.add_argument("--sweep-gap-threads", type=int, default=1, metavar="N",
                        help="BLAS threads of the gap's matrix products (default: 1; 0: NumPy's default)")
    parser.add_argument("--sweep-fixed-order", action="store_true",
                        help="also time fastdescent on 2 threads with the alternating order of back-to-back "
                             "calls switched off, beside the others (what that order gains)")


class GapWork:
    """A training loop's work between two steps, for ``seconds`` at a time:
    ``matmul``, float32 products of a 16 x 1024 activation with four 1024 x 512
    weight matrices in turn (2 MB each, about 17 MFLOP a product: short against
    a millisecond gap), or ``spin``, a busy wait. ``__call__`` returns the
    seconds it took (it ends at the first product past the deadline)."""

    def __init__(self, kind):
        if kind not in GAP_WORKS:
            raise ValueError(f"gap work must be one of {GAP_WORKS}, got {kind!r}")
        self.kind = kind
        rng = np.random.default_rng(1)
        self.weights = [rng.standard_normal((1024, 512), dtype=np.float32) for _ in range(4)]
        self.activation = rng.standard_normal((16, 1024), dtype=np.float32)
        self.out = np.empty((16, 512), dtype=np.float32)

    def __call__(self, seconds):
        start = now = time.perf_counter()
        end = start + seconds
        k = 0
        if self.kind == "spin":
            while now < end:
                now = time.perf_counter()
        else:
            while now < end:
                np.matmul(self.activation, self.weights[k & 3], out=self.out)
                k += 1
                now = time.perf_counter()
        return now - start


def _take_turns(steps, repeats, sample):
    """``repeats`` samples of every step in ``steps`` (a dict), in rounds of BLOCK
    per step, the order rotating each round; ``sample(key)`` takes one (seconds)
    of ``steps[key]``, after an untimed call that starts each block. Returns the
    lists of samples by key."""
    keys = list(steps)
    samples = {key: [] for key in keys}
    for r in range(-(-repeats // BLOCK)):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            steps[key]()
            for _ in range(min(BLOCK, repeats - len(samples[key]))):
                samples[key].append(sample(key))
    return samples


def _summary(seconds, calls):
    quartiles = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
            "q1": quartiles[0], "q3": quartiles[2], "calls": calls, "samples": len(seconds)}


@contextmanager
def _blas_threads(n):
    """Limit NumPy's BLAS to ``n`` threads (0: leave it); yields the limit in
    force, None when threadpoolctl is not installed."""
    if n == 0:
        yield 0
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield None
        return
    with threadpool_limits(n, user_api="blas"):
        yield n


def measure(args):
    """Run the sweep for parsed bench ``args``; returns a JSON-ready dict."""
    if any(n < 1 for n in args.sweep_sizes) or args.sweep_idle_repeats < 1 or args.sweep_gap_threads < 0:
        raise SystemExit("--sweep-sizes and --sweep-idle-repeats must be positive, --sweep-gap-threads >= 0")
    with _blas_threads(args.sweep_gap_threads) as blas_threads:
        sweep = _measure(args)
    sweep["gap_blas_threads"] = blas_threads
    return sweep


def _measure(args):
    gaps = [0.0] + [g for g in args.sweep_gaps if g > 0]
    rule = RULES[RULE]
    work = GapWork(args.sweep_gap_work)
    records = []
    started = time.perf_counter()
    load_start = _load()
    for n in args.sweep_sizes:
        problem = make_problem(rule, n, DTYPE)
        with ExitStack() as stack:
            steps = {}
            for method, n_threads in CONTENDERS + ((FIXED_ORDER,) if args.sweep_fixed_order else ()):
                try:
                    step = stack.enter_context(stepper(method.removesuffix("-fixed-order"), rule, problem,
                                                       n_threads))
                except Unavailable as why:
                    records.append({"size": n, "method": method, "threads": n_threads, "unavailable": str(why)})
                    continue
                steps[method, n_threads] = _in_fixed_order(step) if method == FIXED_ORDER[0] else step
            for gap in gaps:
                gap_seconds = []
                if gap == 0:
                    calls = {key: time_step(step, 1, args.min_time).calls for key, step in steps.items()}

                    def sample(key):
                        step, count = steps[key], calls[key]
                        start = time.perf_counter()
                        for _ in range(count):
                            step()
                        return (time.perf_counter() - start) / count
                    samples = _take_turns(steps, args.repeats, sample)
                else:
                    calls = dict.fromkeys(steps, 1)
                    pool = {key: dict.fromkeys(_pool_counts(), 0) for key in steps}

                    def sample(key):
                        step = steps[key]
                        gap_seconds.append(work(gap))
                        before = _pool_counts()
                        start = time.perf_counter()
                        step()
                        seconds = time.perf_counter() - start
                        _count(pool[key], before)
                        return seconds

                    def untimed(key):
                        before = _pool_counts()
                        steps[key]()
                        _count(pool[key], before)
                    samples = _take_turns({key: partial(untimed, key) for key in steps}, args.sweep_idle_repeats,
                                          sample)
                for (method, n_threads), seconds in samples.items():
                    record = {"size": n, "method": method, "threads": n_threads, "gap": gap,
                              "seconds": _summary(seconds, calls[method, n_threads])}
                    if gap_seconds:
                        record["gap_mean"] = statistics.fmean(gap_seconds)
                        if method.startswith("kernel") and n_threads > 1:
                            record["pool"] = pool[method, n_threads]
                    records.append(record)
                if not args.quiet:
                    print(f"[{time.perf_counter() - started:5.0f}s] threads sweep {n:,} gap {gap * 1e3:g} ms: "
                          + ", ".join(f"{m} {t}thr {statistics.median(s) * 1e6:,.1f} us"
                                      for (m, t), s in samples.items()), file=sys.stderr, flush=True)
        del problem
    return {"rule": RULE, "dtype": DTYPE, "gaps": gaps, "gap_work": work.kind, "records": records,
            "load_average": {"start": load_start, "end": _load()}}


def _in_fixed_order(step):
    """``step`` with the kernels' alternating order off while it runs."""
    kernels = _dispatch.kernels
    restore = kernels.pool_state()["alternating_order"]

    def run():
        kernels.set_alternating_order(False)
        try:
            step()
        finally:
            kernels.set_alternating_order(restore)
    return run


def _count(totals, before):
    """Add the pool's counters since ``before`` (``_pool_counts()``) to ``totals``."""
    for key, count in _pool_counts().items():
        totals[key] += count - before[key]


def _pool_counts():
    """The kernel pool's counters (only fastdescent's multi-thread contender uses
    the pool): parallel jobs, jobs that had to wake parked workers, jobs after
    which the workers spun longer, back-offs to serial."""
    state = _dispatch.kernels.pool_state()
    return {key: state.get(key, 0) for key in ("jobs", "wakeups", "long_spins", "backoffs")}


def _load():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def goal(n, gap, vs_1_thread, vs_fused):
    """Issue 20's goal at this size and gap: "ok", "MISSED" or "" (none set)."""
    if vs_1_thread is None or vs_fused is None:
        return ""
    if n >= 10**8:
        return "ok" if vs_1_thread >= 0.95 else "MISSED"
    if gap > 0:
        return "ok" if vs_fused >= 1.0 and vs_1_thread >= 0.95 else "MISSED"
    if 10**5 <= n <= 1.1 * 10**6:
        return "ok" if vs_fused >= 1.5 else "MISSED"
    if 3.5 * 10**6 <= n <= 4.5 * 10**6:
        return "ok" if vs_fused >= 1.1 else "MISSED"
    return ""


def _gap_work_title(sweep):
    if sweep.get("gap_work", "spin") == "spin":  # runs saved before gap_work existed spun
        return "of busy waiting"
    blas = sweep.get("gap_blas_threads")
    threads = {0: "NumPy's BLAS threads", None: "BLAS threads not limited: no threadpoolctl"}.get(
        blas, f"{blas} BLAS thread{'' if blas == 1 else 's'}")
    return f"of NumPy matrix products (8 MB, {threads})"


def render(sweep):
    """The sweep's tables as text: one per gap."""
    timed = {(r["size"], r["method"], r["threads"], r["gap"]): r["seconds"]["median"]
             for r in sweep["records"] if "seconds" in r}
    pools = {(r["size"], r["gap"]): r["pool"] for r in sweep["records"]
             if "pool" in r and r["method"] == "kernel"}
    fixed = any(r["method"] == FIXED_ORDER[0] for r in sweep["records"])
    sizes = list(dict.fromkeys(r["size"] for r in sweep["records"]))
    load = sweep.get("load_average") or {}
    gap_work = _gap_work_title(sweep)
    parts = [f"threading sweep: {sweep['rule']} {sweep['dtype']}, one array, fd.adam_step vs "
             "torch.optim.Adam(fused=True); microseconds per step (median)"
             + "".join(f"; load average at {when} {values[0]:.2f}" for when, values in load.items() if values)]
    for gap in sweep["gaps"]:
        body = []
        for n in sizes:
            one, two, fused = (timed.get((n, m, t, gap)) for m, t in CONTENDERS)
            vs_one = None if one is None or two is None else one / two
            vs_fused = None if fused is None or two is None else fused / two
            pool = pools.get((n, gap))
            woke = () if gap == 0 else ("-" if pool is None else f"{pool['wakeups']}/{pool['jobs']}",)
            extra = ()
            if fixed:
                alone = timed.get((n, *FIXED_ORDER, gap))
                extra = (_num(None if alone is None else alone * 1e6),
                         "-" if alone is None or two is None else f"{alone / two:.2f}x")
            body.append((f"{n:,}", *(_num(None if x is None else x * 1e6) for x in (one, two, fused)),
                         "-" if vs_one is None else f"{vs_one:.2f}x",
                         "-" if vs_fused is None else f"{vs_fused:.2f}x", *woke, goal(n, gap, vs_one, vs_fused),
                         *extra))
        title = "back to back" if gap == 0 else f"each call after {gap * 1e3:g} ms {gap_work}"
        header = ("size", "fd 1thr", "fd 2thr", "fused 2thr", "2/1 thr", "vs fused", "goal")
        if gap > 0:
            header = header[:-1] + ("woke", "goal")
        if fixed:
            header += ("fixed 2thr", "alt gain")
        parts.append(title + "\n" + _table(header, body, "<>>>>>" + ("><" if gap > 0 else "<") + ">>" * fixed))
    missing = sorted({f"{r['method']} {r['threads']}thr: {r['unavailable']}"
                      for r in sweep["records"] if "unavailable" in r})
    if missing:
        parts.append("not run: " + "; ".join(missing))
    return "\n\n".join(parts) + "\n"
