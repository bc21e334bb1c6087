"""``python -m fastdescent bench --cases accumulate``: the last micro-step of gradient
accumulation (issue 17), fused against accumulate-then-step.

With ``accumulate_steps=k``, the k-th call adds the last gradient to the
accumulator and steps on the sum. Two ways to do that, float32 Adam on one
array of each ``--accumulate-sizes`` (default 10**6 and 10**8) with each of
``--accumulate-threads`` (default 2):

* ``fused``: the kernel ``step_accumulated`` (what an optimizer runs): one pass
  that reads acc, g, p, m, v and writes acc (zero), p, m, v: 9 accesses, 36
  bytes per element;
* ``unfused``: accumulate-then-step, the optimizer's path with clipping: an add
  pass (reads acc, g, writes acc: 3), Adam's step on acc (reads p, acc, m, v,
  writes p, m, v: 7), then ``acc.fill(0)`` (writes acc: 1): 11 accesses, 44 bytes
  per element; its three passes are also timed alone (``add``, ``step``,
  ``zero``);
* ``ceiling``: the bandwidth kernel (``stream``) with the fused pass's access
  pattern (4 buffers read and written, 1 read only), in the same run.

Each row gives the median time per call with the spread of the samples, the
bytes per element of the pattern, the GB/s achieved (bytes moved / median time)
and, for ``unfused``, its time over ``fused``'s. The byte ratio of the two is
44 / 36 = 1.22: the speed-up a memory-bound machine should show.
"""

import os
import sys
import time

import numpy as np

from .. import _dispatch
from ..catalog import RULES
from .cases import time_step

#: method -> (arrays read, arrays written) per element.
ACCESSES = {"fused": (5, 4), "unfused": (7, 4), "add": (2, 1), "step": (4, 3), "zero": (0, 1),
            "ceiling": (5, 4)}
METHODS = ("ceiling", "fused", "unfused", "add", "step", "zero")
GRAD_SCALE = 0.5


def add_arguments(parser, size_type):
    """The options of the accumulate case; ``size_type`` parses an element count."""
    parser.add_argument("--accumulate-sizes", nargs="+", type=size_type, default=[10**6, 10**8],
                        help="elements of the accumulate case's array (default: 1e6 1e8)")
    parser.add_argument("--accumulate-threads", nargs="+", type=int, default=[2],
                        help="thread counts of the accumulate case (default: 2)")


def measure(args):
    """Run the accumulate case for parsed bench ``args``; returns a JSON-ready dict."""
    records, started, load_start = [], time.perf_counter(), _load()
    for size in args.accumulate_sizes:
        arrays = _arrays(size)
        for n_threads in args.accumulate_threads:
            for method in METHODS:
                step = _stepper(method, arrays, n_threads)
                timing = time_step(step, args.repeats, args.min_time)
                reads, writes = ACCESSES[method]
                records.append({"size": size, "threads": n_threads, "method": method,
                                "bytes_per_element": (reads + writes) * 4,
                                "seconds": {"median": timing.median, "min": timing.min, "max": timing.max,
                                            "calls": timing.calls, "samples": timing.samples}})
                if not args.quiet:
                    print(f"[{len(records)}/{len(args.accumulate_sizes) * len(args.accumulate_threads) * len(METHODS)}]"
                          f" {time.perf_counter() - started:6.0f}s  accumulate {size:,} {method} {n_threads}thr: "
                          f"{timing.median * 1e6:,.1f} us", file=sys.stderr, flush=True)
        del arrays
    return {"records": records, "load_average": {"start": load_start, "end": _load()},
            "variant": _dispatch.variant}


def _arrays(size):
    """p, g, m, v and the accumulator: float32, fresh random data (v positive)."""
    rng = np.random.default_rng(0)
    p, g, m, acc = (rng.standard_normal(size, dtype=np.float32) for _ in range(4))
    v = np.abs(rng.standard_normal(size, dtype=np.float32))
    return {"p": p, "g": g, "m": m, "v": v, "acc": acc}


def _stepper(method, a, n_threads):
    """A zero-argument callable running ``method`` once on the arrays ``a``."""
    kernels = _dispatch.kernels
    rule = RULES["adam"]
    spec = rule.spec
    h = spec.validate(rule.hyper)
    # Adam at step 10 on the mean of 2 micro-steps: grad_scale 1/2, bias corrections of step 10.
    scalars = spec.kernel_arguments(h, step=10, grad_scale=0.5)
    buffers = {"exp_avg": [a["m"]], "exp_avg_sq": [a["v"]]}
    params, grads, acc = [a["p"]], [a["g"]], [a["acc"]]

    def adam(ps, gs):
        spec.call(kernels, ps, gs, buffers, scalars, n_threads)

    def add():
        kernels.accumulate(acc, grads, grad_scale=GRAD_SCALE, first=False, n_threads=n_threads)

    def zero():
        a["acc"].fill(0)

    if method == "ceiling":
        return lambda: kernels.stream([a["acc"], a["p"], a["m"], a["v"], a["g"]], 4, n_threads)
    if method == "fused":
        return lambda: kernels.step_accumulated(adam, params, grads, acc, grad_scale=GRAD_SCALE,
                                                n_threads=n_threads)
    if method == "unfused":
        def unfused():
            add()
            adam(params, acc)
            zero()
        return unfused
    if method == "step":
        return lambda: adam(params, acc)
    return {"add": add, "zero": zero}[method]


def _load():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def render(result):
    """The accumulate case's table as text."""
    from .report import _num, _table

    found = {(r["size"], r["threads"], r["method"]): r for r in result["records"]}
    body = []
    for r in result["records"]:
        s, n_bytes = r["seconds"], r["bytes_per_element"]
        fused = found.get((r["size"], r["threads"], "fused"))
        ratio = f"{s['median'] / fused['seconds']['median']:.2f}" if r["method"] == "unfused" and fused else ""
        body.append([f"{r['size']:,}", str(r["threads"]), r["method"], str(n_bytes),
                     f"{_num(s['median'] * 1e6)} ({_num(s['min'] * 1e6)}-{_num(s['max'] * 1e6)})",
                     f"{r['size'] * n_bytes / s['median'] / 1e9:.1f}", ratio])
    load = result.get("load_average") or {}
    loads = ["?" if v is None else "/".join(f"{x:.2f}" for x in v) for v in (load.get("start"), load.get("end"))]
    header = ["elements", "threads", "method", "B/elem", "us per call (min-max)", "GB/s", "x fused"]
    return (f"gradient accumulation, Adam float32 ({result.get('variant')}): the last micro-step fused with the "
            f"step against accumulate-then-step (add, step, zero); bytes ratio 44/36 = 1.22. Load average "
            f"{loads[0]} at the start, {loads[1]} at the end\n"
            + _table(header, body, ">><>>>>"))
