"""The per-step cost of ``python -m fastdescent bench --cases steps`` (issue 13).

What does one step cost on a small model, where Python around the kernel is
most of it, and does the same code keep its speed on large ones? A rule of the
catalog (default float32 Adam) stepped through

* ``face``: the functional face (``fd.adam_step``), one call on the arrays (a
  list of them for a multi-tensor case);
* ``optimizer``: ``fd.Adam(...).step(grads)``;
* ``optimizer-flat``: ``fd.Adam(..., flat=True).step()``;
* ``torch-fused`` and, where it exists, ``torch-adapter``: ``torch.optim.Adam
  (fused=True)`` and ``fastdescent.torch.Adam`` on tensors sharing memory with
  the same arrays;

on ``--steps-shapes`` (default 1 and 100 arrays of 1,000 elements, and one array
of 10**6 and of 10**7: the sizes where the memory wall, not Python, sets the
time), on ``--steps-threads`` (default 1), and for each of bench's
``--state-dtypes`` (default native: the parameters' dtype): with bfloat16 or int8
state the optimizers and the adapter keep theirs in it (the face, and a flat
arena of int8 blocks, do not exist then), torch fused its float32 state. Each
table gives the median microseconds per step with the spread of the samples
(fastest-slowest) and "x fused": torch fused's median over the method's (above
1: faster than torch). The load average before and after the run is printed
with it.
"""

import functools
import itertools
import os
import sys
import time
from contextlib import contextmanager

import numpy as np

from ..catalog import RULES
from .cases import Unavailable, time_step, torch_or_none, torch_threads

METHODS = ("face", "optimizer", "optimizer-flat", "torch-fused", "torch-adapter")
DEFAULT_SHAPES = ((1, 1000), (100, 1000), (1, 10**6), (1, 10**7))
STEADY_STEP = 10


def add_arguments(parser, shape_type):
    """The options of the steps case; ``shape_type`` parses COUNTxSIZE."""
    parser.add_argument("--steps-shapes", nargs="+", type=shape_type, metavar="COUNTxSIZE",
                        default=list(DEFAULT_SHAPES),
                        help="arrays of the steps case (default: 1x1e3 100x1e3 1x1e6 1x1e7)")
    parser.add_argument("--steps-rules", nargs="+", choices=list(RULES), default=["adam"],
                        help="catalog rules of the steps case (default: adam)")
    parser.add_argument("--steps-threads", nargs="+", type=int, default=[1],
                        help="thread counts of the steps case (default: 1)")


def measure(args):
    """Run the steps case for parsed bench ``args``; returns a JSON-ready dict."""
    torch = torch_or_none()
    records, started, load_start = [], time.perf_counter(), _load()
    # (float32 parameters: "native" and "float32" state are the same)
    state_dtypes = list(dict.fromkeys(None if s in ("native", "float32") else s
                                      for s in getattr(args, "state_dtypes", None) or ["native"]))
    total = (len(args.steps_rules) * len(state_dtypes) * len(args.steps_shapes) * len(args.steps_threads)
             * len(METHODS))
    for name in args.steps_rules:
        for state_dtype in state_dtypes:
            for count, size in args.steps_shapes:
                for n_threads in args.steps_threads:
                    for method in METHODS:
                        record = {"rule": name, "dtype": "float32", "state_dtype": state_dtype, "tensors": count,
                                  "size": size, "method": method, "threads": n_threads}
                        try:
                            with stepper(method, RULES[name], count, size, n_threads, torch, state_dtype) as step:
                                timing = time_step(step, args.repeats, args.min_time)
                            record["seconds"] = {"median": timing.median, "min": timing.min, "max": timing.max,
                                                 "calls": timing.calls, "samples": timing.samples}
                        except Unavailable as why:
                            record["unavailable"] = str(why)
                        records.append(record)
                        if not args.quiet:
                            _progress(len(records), total, started, record)
    return {"records": records, "load_average": {"start": load_start, "end": _load()}}


@contextmanager
def stepper(method, rule, count, size, n_threads, torch, state_dtype=None):
    """Yield a zero-argument callable taking one step of ``method``: ``count``
    float32 arrays of ``size`` elements, fresh random data, warm (one step taken);
    ``state_dtype``: the optimizers' and the adapter's (None: the parameters')."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(size, dtype=np.float32) for _ in range(count)]
    grads = [0.1 * rng.standard_normal(size, dtype=np.float32) for _ in range(count)]
    spec = rule.spec
    storage = {} if state_dtype is None else {"state_dtype": state_dtype}
    if method == "face" and state_dtype is not None:
        raise Unavailable("the face takes state in the parameters' dtype")
    if method == "face":
        from ..rules import FACES

        face = FACES[spec.face_name]
        state = [rule.make_state(rng, size, np.float32) for _ in range(count)]
        buffers = dict(zip(rule.state, zip(*state))) if state else {}
        args = [params, grads] + [None if buffers.get(b.name) is None else list(buffers[b.name])
                                  for b in spec.buffers]
        if count == 1:
            args = [a[0] if isinstance(a, list) else a for a in args]
        kwargs = {k: v for k, v in rule.options.items() if next(h for h in spec.hyper if h.name == k).face}
        kwargs["n_threads"] = n_threads
        step = _face_call(face, args, kwargs, itertools.count(STEADY_STEP) if spec.uses_step else None)
    elif method.startswith("optimizer"):
        from ..optim import CLASSES

        flat = method == "optimizer-flat"
        try:
            opt = CLASSES[spec.title](params, **rule.options, lr=rule.hyper["lr"], flat=flat, n_threads=n_threads,
                                      **storage)
        except ValueError as error:  # (int8 state in a flat arena, a rule that keeps no such state)
            raise Unavailable(f"{method} refused: {error}") from None
        if flat:
            for view, g in zip(opt.grads, grads):
                view[...] = g
            step = opt.step
        else:
            step = functools.partial(opt.step, grads)  # (a closure would add a Python call per step)
    else:
        with _torch_stepper(method, rule, params, grads, n_threads, torch, storage) as step:
            yield step
        return
    step()
    yield step


def _face_call(face, args, kwargs, steps):
    """``face(*args, **kwargs, step=next(steps))`` (without ``step`` if ``steps`` is
    None) as a training loop writes it: the arguments by name in the call, not
    unpacked from a list and a dict at every step (which costs the call a quarter
    of a microsecond). ``steps`` gives a new step number at every call."""
    names = [f"a{k}" for k in range(len(args))]
    keywords = [f"{key}={key}" for key in kwargs] + (["step=next(steps)"] if steps is not None else [])
    source = f"def step():\n    face({', '.join(names + keywords)})\n"
    namespace = {"face": face, "steps": steps, "next": next, **dict(zip(names, args)), **kwargs}
    exec(source, namespace)  # noqa: S102 - a call spelled out from the case's own arguments
    return namespace["step"]


@contextmanager
def _torch_stepper(method, rule, params, grads, n_threads, torch, storage):
    if torch is None:
        raise Unavailable("torch is not installed")
    if rule.torch_peer is None:
        raise Unavailable(f"torch has no peer for {rule.name}")
    name, hyper = rule.torch_peer
    if method == "torch-adapter":
        try:
            import fastdescent.torch as library
        except ImportError as error:
            raise Unavailable(f"no torch adapter: {error}") from None
        options = storage
    else:
        library, options = torch.optim, {"fused": True}
    tensors = [torch.from_numpy(p) for p in params]
    for tensor, grad in zip(tensors, grads):
        tensor.grad = torch.from_numpy(grad)
    with torch_threads(torch, n_threads):
        try:
            optimizer = getattr(library, name)(tensors, **hyper, **options)
            optimizer.step()
        except (RuntimeError, ValueError, TypeError) as error:
            raise Unavailable(f"{method} refused: {error}") from None
        yield optimizer.step


def _load():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _loads(values):
    return "?" if values is None else "/".join(f"{v:.2f}" for v in values)


def _progress(done, total, started, record):
    r = record
    state = f" {r['state_dtype']} state" if r.get("state_dtype") else ""
    what = f"{r['rule']}{state} {r['tensors']}x{r['size']:,} {r['method']} {r['threads']}thr"
    outcome = (f"{r['seconds']['median'] * 1e6:,.2f} us/step" if "seconds" in r
               else f"skipped ({r['unavailable']})")
    print(f"[{done}/{total}] {time.perf_counter() - started:6.0f}s  {what}: {outcome}", file=sys.stderr, flush=True)


def render(result):
    """The steps case's tables as text."""
    from .report import _num, _table

    lines = []
    load = result.get("load_average") or {}
    keys = list(dict.fromkeys((r["rule"], r.get("state_dtype"), r["threads"])
                              for r in sorted(result["records"], key=lambda r: (r["rule"], r["threads"]))))
    for name, state_dtype, n_threads in keys:
        rows = [r for r in result["records"]
                if r["rule"] == name and r.get("state_dtype") == state_dtype and r["threads"] == n_threads]
        shapes = list(dict.fromkeys((r["tensors"], r["size"]) for r in rows))
        methods = [m for m in METHODS if any(r["method"] == m and "seconds" in r for r in rows)]
        found = {(r["tensors"], r["size"], r["method"]): r["seconds"] for r in rows if "seconds" in r}
        body = []
        for count, size in shapes:
            fused = found.get((count, size, "torch-fused"))
            cells = [f"{count}x{size:,}"]
            for m in methods:
                s = found.get((count, size, m))
                cells.append("-" if s is None else
                             f"{_num(s['median'] * 1e6)} ({_num(s['min'] * 1e6)}-{_num(s['max'] * 1e6)})")
                if m != "torch-fused":
                    cells.append("-" if s is None or fused is None else f"{fused['median'] / s['median']:.1f}")
            body.append(cells)
        header = ["arrays"]
        for m in methods:
            header += [f"{m} us (min-max)"] + ([] if m == "torch-fused" else ["x fused"])
        state = "" if state_dtype is None else f" with {state_dtype} state (torch fused: float32)"
        lines.append(f"per-step cost, {name} float32{state}, {n_threads} thread(s): microseconds per step, median "
                     f"(fastest-slowest sample); x fused = torch fused / method. Load average (1, 5, 15 min) "
                     f"{_loads(load.get('start'))} at the start, {_loads(load.get('end'))} at the end\n"
                     + _table(header, body, "<" + ">" * (len(header) - 1)))
    return "\n\n".join(lines)
