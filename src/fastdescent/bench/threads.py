"""The threading sweep of ``python -m fastdescent bench --cases threads`` (issue 20).

Does the threading policy pay at every size, both in a tight loop and in a
training loop? float32 Adam on one array of 2**14 to 2**24 elements (the
functional face, ``fd.adam_step``), fastdescent on 1 and on 2 threads beside
``torch.optim.Adam(fused=True)`` on 2 threads, timed:

* back to back: the mean of many consecutive calls per sample;
* after idle gaps (``--sweep-gaps``, default 1, 5 and 20 ms): every sample is one
  call timed alone after the calling thread busy-waited that long, as a forward
  and backward pass would keep it busy, so idle workers have had time to park.

Each table prints the medians, "2/1 thr" (fastdescent's 1-thread time over its
2-thread time) and "vs fused" (torch fused's time over fastdescent's 2-thread
time), both above 1 when 2-thread fastdescent is faster, and whether issue 20's
goals hold at that size:

* back to back: >= 1.5x torch fused from 10**5 to about 10**6 elements
  (2**17 to 2**20), >= 1.1x at about 4 x 10**6 (2**22);
* after a gap: >= 1.0x torch fused at every size, and 2 threads never more than
  5 % slower than 1 (2/1 thr >= 0.95);
* at 10**8 (in the default sizes: the memory-bound end), 2 threads not slower
  than 1 in either setting.
"""

import os
import sys
import time

from ..catalog import RULES
from .cases import Unavailable, make_problem, stepper, time_step
from .report import _num, _table

DEFAULT_SIZES = (*(2**k for k in range(14, 25)), 10**8)
DEFAULT_GAPS = (0.001, 0.005, 0.02)
CONTENDERS = (("kernel", 1), ("kernel", 2), ("torch-fused", 2))
RULE, DTYPE = "adam", "float32"


def add_arguments(parser, size_type=int):
    """The sweep's options (the sweep runs with ``--cases threads``); ``size_type``
    parses an element count."""
    parser.add_argument("--sweep-sizes", nargs="+", type=size_type, metavar="N", default=list(DEFAULT_SIZES),
                        help="array sizes of the threads case (default: 2**14 ... 2**24 and 1e8)")
    parser.add_argument("--sweep-gaps", nargs="+", type=float, metavar="SECONDS", default=list(DEFAULT_GAPS),
                        help="idle gaps of the threads case, besides back to back (default: 0.001 0.005 0.02)")
    parser.add_argument("--sweep-idle-repeats", type=int, default=25, metavar="N",
                        help="calls timed alone per idle gap in the threads case (default: 25)")


def measure(args):
    """Run the sweep for parsed bench ``args``; returns a JSON-ready dict."""
    gaps = [0.0] + [g for g in args.sweep_gaps if g > 0]
    if any(n < 1 for n in args.sweep_sizes) or args.sweep_idle_repeats < 1:
        raise SystemExit("--sweep-sizes and --sweep-idle-repeats must be positive")
    rule = RULES[RULE]
    records = []
    started = time.perf_counter()
    load_start = _load()
    for n in args.sweep_sizes:
        problem = make_problem(rule, n, DTYPE)
        for method, n_threads in CONTENDERS:
            try:
                with stepper(method, rule, problem, n_threads) as step:
                    for gap in gaps:
                        repeats = args.repeats if gap == 0 else args.sweep_idle_repeats
                        timing = time_step(step, repeats, args.min_time, idle=gap)
                        records.append({"size": n, "method": method, "threads": n_threads, "gap": gap,
                                        "seconds": vars(timing)})
                        if not args.quiet:
                            print(f"[{time.perf_counter() - started:5.0f}s] threads sweep {n:,} {method} "
                                  f"{n_threads}thr gap {gap * 1e3:g} ms: {timing.median * 1e6:,.1f} us",
                                  file=sys.stderr, flush=True)
            except Unavailable as why:
                records.append({"size": n, "method": method, "threads": n_threads, "unavailable": str(why)})
        del problem
    return {"rule": RULE, "dtype": DTYPE, "gaps": gaps, "records": records,
            "load_average": {"start": load_start, "end": _load()}}


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


def render(sweep):
    """The sweep's tables as text: one per gap."""
    timed = {(r["size"], r["method"], r["threads"], r["gap"]): r["seconds"]["median"]
             for r in sweep["records"] if "seconds" in r}
    sizes = list(dict.fromkeys(r["size"] for r in sweep["records"]))
    load = sweep.get("load_average") or {}
    parts = [f"threading sweep: {sweep['rule']} {sweep['dtype']}, one array, fd.adam_step vs "
             "torch.optim.Adam(fused=True); microseconds per step (median)"
             + "".join(f"; load average at {when} {values[0]:.2f}" for when, values in load.items() if values)]
    for gap in sweep["gaps"]:
        body = []
        for n in sizes:
            one, two, fused = (timed.get((n, m, t, gap)) for m, t in CONTENDERS)
            vs_one = None if one is None or two is None else one / two
            vs_fused = None if fused is None or two is None else fused / two
            body.append((f"{n:,}", *(_num(None if x is None else x * 1e6) for x in (one, two, fused)),
                         "-" if vs_one is None else f"{vs_one:.2f}x",
                         "-" if vs_fused is None else f"{vs_fused:.2f}x", goal(n, gap, vs_one, vs_fused)))
        title = "back to back" if gap == 0 else f"each call after {gap * 1e3:g} ms of busy waiting"
        header = ("size", "fd 1thr", "fd 2thr", "fused 2thr", "2/1 thr", "vs fused", "goal")
        parts.append(title + "\n" + _table(header, body, "<>>>>><"))
    missing = sorted({f"{r['method']} {r['threads']}thr: {r['unavailable']}"
                      for r in sweep["records"] if "unavailable" in r})
    if missing:
        parts.append("not run: " + "; ".join(missing))
    return "\n\n".join(parts) + "\n"
