"""``python -m fastdescent bench``: every update rule's speed against the machine's
memory bandwidth, the NumPy reference and PyTorch.

An optimizer step is memory-bound: it must read and write ``bytes_per_element``
bytes per parameter, so its speed limit is the bandwidth of this machine for that
access pattern. The command measures that limit in the same run, with a kernel that
has the rule's access pattern and no arithmetic to speak of (``ceiling`` rows), and
reports each method against it.

Three cases:

* ``sizes``: one table per rule and dtype; for each size, the ceiling and the
  kernel at each thread count, the reference, and torch's for-loop, foreach and
  fused paths at each thread count;
* ``many``: many small arrays in one multi-tensor call (200 x 1,000 by default)
  against one array of the same total size;
* ``overhead``: microseconds per step from Python on one small array;
* ``threads`` (only when asked): the threading sweep of ``bench.threads``, float32
  Adam from 2**14 to 2**24 elements, 1 and 2 threads beside torch fused, back to
  back and after idle gaps;
* ``steps`` (only when asked): the per-step cost of ``bench.steps``: a rule's
  face, optimizer and flat optimizer on 1 and 100 arrays of 1,000 elements and on
  10**6 and 10**7, beside torch fused;
* ``accumulate`` (only when asked): gradient accumulation's last micro-step
  (``bench.accumulate``), fused with the step against accumulate-then-step,
  float32 Adam at 10**6 and 10**8 on 2 threads;
* ``memory``: the peak bytes per parameter an optimizer's first step allocates
  (its state), for every rule and state dtype.

``--state-dtypes`` adds the state-dtype axis (:mod:`fastdescent.precision`): each
rule runs with its state in float32, bfloat16 or int8 (the parameters stay in
``--dtypes``), against the ceiling of its own byte count; ``torch-adapter``
(``fastdescent.torch``) keeps the same state dtype, torch.optim's methods their
float32 state, ``bnb-8bit`` (bitsandbytes, when installed) its 8-bit one.

Timing: data prepared and touched first, one warm-up call, then ``--repeats``
samples each averaging enough back-to-back calls to last ``--min-time`` seconds;
medians with the range over samples. Progress goes to stderr, tables to stdout,
everything to ``--json`` if asked; ``--from-json`` prints the tables of a saved run.
"""

import argparse
import datetime
import gc
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np

from .. import _config, _dispatch, precision
from ..catalog import RULES
from .cases import (
    METHODS,
    Timing,
    Unavailable,
    make_problem,
    state_memory,
    stepper,
    time_samples,
    timing_of,
    torch_or_none,
)
from . import accumulate as accumulate_case
from . import threads as threads_sweep
from . import steps as steps_case
from .report import derive, render

__all__ = ["add_arguments", "run", "main"]

CASES = ("sizes", "many", "overhead", "threads", "steps", "accumulate", "memory")
#: --state-dtypes: "native" keeps the state in the parameters' dtype ("float32": the
#: same, for float32 parameters only).
STATE_DTYPES = ("native", "float32", "bfloat16", "int8")
DEFAULT_CASES = ("sizes", "many", "overhead")
DEFAULT_SIZES = tuple(10**k for k in range(3, 9))
JSON_FORMAT = 1


def size_arg(text):
    """An element count written as 100000, 1e5 or 10**5."""
    text = text.strip().replace("_", "")
    try:
        if "**" in text:
            base, exponent = text.split("**")
            value = int(base) ** int(exponent)
        else:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            value = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an element count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, got {text!r}")
    return value


def shape_arg(text):
    """``200x1000``: 200 arrays of 1,000 elements."""
    try:
        count, size = (size_arg(part) for part in text.lower().split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected COUNTxSIZE such as 200x1000, got {text!r}") from None
    return count, size


def add_arguments(parser):
    """Add the bench command's options to ``parser``."""
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES),
                        help="what to measure (default: all but threads, steps and accumulate)")
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES),
                        help="rules from fastdescent.catalog (default: all)")
    parser.add_argument("--sizes", nargs="+", type=size_arg, default=list(DEFAULT_SIZES),
                        help="elements per array for the sizes case, e.g. 1e5 10**6 (default: 1e3 ... 1e8)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32"])
    parser.add_argument("--state-dtypes", nargs="+", choices=STATE_DTYPES, default=["native"],
                        help="state dtypes of the kernel and reference (default: native, the parameters' dtype); "
                             "bfloat16 and int8 need float32 parameters")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="thread counts for the kernel, the ceiling and torch (default: 1 2)")
    parser.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "ceiling"],
                        default=[m for m in METHODS if m not in ("ceiling", "bnb-8bit")],
                        help="methods to compare (default: all that are installed but bnb-8bit: the torch ones "
                             "need torch, torch-adapter needs fastdescent.torch, bnb-8bit bitsandbytes)")
    parser.add_argument("--variants", nargs="+", metavar="VARIANT",
                        help="kernel builds to run: names from show_config() or 'all' "
                             "(default: the one chosen at import)")
    parser.add_argument("--many", type=shape_arg, default=(200, 1000), metavar="COUNTxSIZE",
                        help="the many-small-arrays case (default: 200x1000)")
    parser.add_argument("--overhead-size", type=size_arg, default=1000,
                        help="array size of the overhead case (default: 1000)")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per measurement (default: 7)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="take each measurement's samples in this many turns, the methods of a size taking "
                             "turns (default: 1; more makes ratios robust to a machine whose load changes)")
    parser.add_argument("--min-time", type=float, default=0.05,
                        help="seconds each sample lasts at least (default: 0.05)")
    parser.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                        help="busy-wait this long before every timed call, which is then timed alone "
                             "(a training loop's forward/backward: the thread team has gone to sleep)")
    parser.add_argument("--min-elements-per-thread", type=int, metavar="N",
                        help="set the kernels' serial threshold for this run (every variant)")
    threads_sweep.add_arguments(parser, size_arg)
    steps_case.add_arguments(parser, shape_arg)
    accumulate_case.add_arguments(parser, size_arg)
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to PATH")
    parser.add_argument("--from-json", metavar="PATH", help="print the tables of a saved run; measure nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args):
    """Run the bench command for parsed ``args``; returns the exit status."""
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(render(saved))
        if "threads" in saved:
            print(threads_sweep.render(saved["threads"]))
        if "steps" in saved:
            print(steps_case.render(saved["steps"]))
        if "accumulate" in saved:
            print(accumulate_case.render(saved["accumulate"]))
        return 0
    variants = _variants(args.variants)
    threads = _thread_counts(args.threads, args.quiet)
    if (args.repeats < 1 or args.rounds < 1 or args.min_time < 0 or args.idle < 0
            or (args.min_elements_per_thread or 1) < 1):
        raise SystemExit("--repeats, --rounds and --min-elements-per-thread must be >= 1, --min-time and --idle >= 0")
    torch = torch_or_none()
    methods = [m for m in args.methods if _installed(m, torch)]
    with _serial_threshold(args.min_elements_per_thread):
        meta = _metadata(args, torch, variants, threads, methods)
        groups = _plan(args, variants, threads, methods)
        records = _measure(groups, args)
        if "memory" in args.cases:
            records += _memory(args)
    result = {**meta, "records": records, "finished": _now()}
    derive(result)
    print(render(result))
    if "threads" in args.cases:
        result["threads"] = threads_sweep.measure(args)
        print(threads_sweep.render(result["threads"]))
    if "steps" in args.cases:
        result["steps"] = steps_case.measure(args)
        print(steps_case.render(result["steps"]))
    if "accumulate" in args.cases:
        result["accumulate"] = accumulate_case.measure(args)
        print(accumulate_case.render(result["accumulate"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdescent bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _installed(method, torch):
    """False for the torch methods without torch, the adapter without
    fastdescent.torch, bnb-8bit without bitsandbytes."""
    if method == "bnb-8bit":
        return torch is not None and importlib.util.find_spec("bitsandbytes") is not None
    if not method.startswith("torch"):
        return True
    if method == "torch-adapter":
        return torch is not None and importlib.util.find_spec("fastdescent.torch") is not None
    return torch is not None


def _variants(requested):
    supported = _dispatch.supported_variants()
    if not requested:
        return [_dispatch.variant]
    if requested == ["all"]:
        return supported
    unknown = [v for v in requested if v not in supported]
    if unknown:
        raise SystemExit(f"--variants {' '.join(unknown)}: not available here (available: {', '.join(supported)})")
    return requested


def _thread_counts(requested, quiet):
    limit = _config.max_threads()
    if any(t < 1 for t in requested):
        raise SystemExit("--threads must be positive")
    kept = sorted({t for t in requested if t <= limit})
    if len(kept) < len(set(requested)) and not quiet:
        print(f"bench: only {limit} thread(s) available here; running {kept}", file=sys.stderr)
    return kept or [1]


@contextmanager
def _serial_threshold(n):
    """Set the serial threshold of every kernel variant to ``n`` (None: leave it) for a run."""
    modules = [_dispatch.load_variant(v) for v in _dispatch.supported_variants()]
    previous = [(m.get_min_elements_per_thread(), m.get_min_elements_per_thread(cold=True)) for m in modules]
    if n is not None:
        for m in modules:
            m.set_min_elements_per_thread(n)
    try:
        yield
    finally:
        for m, p in zip(modules, previous):
            m.set_min_elements_per_thread(*p)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _metadata(args, torch, variants, threads, methods):
    from .._info import config

    options = {k: v for k, v in vars(args).items() if k not in ("json", "from_json", "quiet")}
    return {
        "format": JSON_FORMAT,
        "started": _now(),
        "options": {**options, "variants": variants, "threads": threads, "methods": methods},
        "config": config(),
        "torch": None if torch is None else torch.__version__,
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith(("OMP_", "GOMP_", "KMP_", "FASTDESCENT_"))},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _plan(args, variants, threads, methods):
    """Measurement groups: one set of buffers each, with the jobs run on them."""

    def jobs(with_ceiling):
        out = [("ceiling", None, t) for t in threads] if with_ceiling else []
        for method in methods:
            if method == "kernel":
                out += [("kernel", v, t) for v in variants for t in threads]
            elif method == "reference":
                out.append(("reference", None, 1))
            else:
                out += [(method, None, t) for t in threads]
        return out

    groups = []
    for dtype in args.dtypes:
        for name in args.rules:
            for state_dtype in _state_dtypes(args, RULES[name], dtype):
                if "sizes" in args.cases:
                    groups += [("sizes", name, dtype, n, 1, state_dtype, jobs(True)) for n in args.sizes]
                if "many" in args.cases:
                    count, size = args.many
                    groups.append(("many", name, dtype, size, count, state_dtype, jobs(False)))
                    groups.append(("many", name, dtype, count * size, 1, state_dtype, jobs(False)))
                if "overhead" in args.cases:
                    groups.append(("overhead", name, dtype, args.overhead_size, 1, state_dtype, jobs(False)))
    return groups


def _state_dtypes(args, rule, dtype):
    """The state dtypes ``rule`` runs in on ``dtype`` parameters (None: native),
    those it cannot keep left out."""
    out = []
    for name in args.state_dtypes:
        if name in ("native", "float32"):
            if (name == "native" or dtype == "float32") and None not in out:
                out.append(None)
            continue
        try:
            precision.Storage.of(name).check(rule.spec, rule.hyper, dtype)
        except ValueError:
            continue
        if rule.state:
            out.append(name)
    return out


def _bytes_per_element(rule, dtype, state_dtype, method):
    """What ``method`` moves per element: torch.optim keeps float32 state (the
    adapter the problem's), bitsandbytes 8-bit state."""
    if method.startswith("torch") and method != "torch-adapter":
        state_dtype = None
    elif method == "bnb-8bit":
        state_dtype = "int8"
    return rule.bytes_per_element(dtype, state_dtype)


def _memory(args):
    """The memory case: state bytes per parameter, every rule and state dtype."""
    records = []
    for dtype in args.dtypes:
        for name in args.rules:
            rule = RULES[name]
            for state_dtype in _state_dtypes(args, rule, dtype):
                per_param = state_memory(rule, 1 << 20, dtype, state_dtype)
                records.append({"case": "memory", "rule": name, "dtype": dtype, "state_dtype": state_dtype,
                                "bytes_per_param": per_param})
                if not args.quiet:
                    print(f"bench: memory {name} {dtype} state {state_dtype or 'native'}: {per_param:.3f} B/param",
                          file=sys.stderr)
    return records


def _measure(groups, args):
    total = sum(len(g[-1]) for g in groups)
    done, started, records = 0, time.perf_counter(), []
    if not args.quiet and groups:
        largest = max(groups, key=lambda g: g[3] * g[4] * RULES[g[1]].bytes_per_element(g[2]))
        case, name, dtype, n, count, _, _ = largest
        rule = RULES[name]
        gb = n * count * (2 + len(rule.state)) * np.dtype(dtype).itemsize / 1e9
        print(f"bench: {total} measurements; largest buffers {gb:.2f} GB ({name} {dtype} {n * count:,} "
              f"elements), plus up to as much again for torch's state or the reference's temporaries",
              file=sys.stderr)
    for case, name, dtype, n, count, state_dtype, jobs in groups:
        rule = RULES[name]
        problem = make_problem(rule, n, dtype, n_tensors=count, state_dtype=state_dtype)
        # With --rounds R every job takes its samples in R turns, the jobs taking turns
        # in one order: a ceiling and its kernel then share the machine's moods. The
        # first turn finds how many calls a sample averages; the others take as many.
        samples = {job: [] for job in jobs}
        calls, unavailable = {}, {}
        for _ in range(args.rounds):
            for job in jobs:
                if job in unavailable:
                    continue
                method, variant, n_threads = job
                try:
                    with stepper(method, rule, problem, n_threads, variant) as step:
                        job_calls, job_samples = time_samples(step, args.repeats, args.min_time, idle=args.idle,
                                                              calls=calls.get(job))
                except Unavailable as why:
                    unavailable[job] = str(why)
                    continue
                calls.setdefault(job, job_calls)
                samples[job] += job_samples
        for job in jobs:
            method, variant, n_threads = job
            record = {"case": case, "rule": name, "dtype": dtype, "size": n, "tensors": count,
                      "method": method, "variant": variant, "threads": n_threads, "state_dtype": state_dtype,
                      "bytes_per_element": _bytes_per_element(rule, dtype, state_dtype, method)}
            if job in unavailable:
                record["unavailable"] = unavailable[job]
            else:
                record["seconds"] = asdict(timing_of(samples[job], calls[job]))
            records.append(record)
            done += 1
            if not args.quiet:
                _progress(done, total, started, record)
        del problem
        gc.collect()
    return records


def _progress(done, total, started, record):
    r = record
    label = r["method"] + (f"/{r['variant']}" if r["variant"] else "")
    what = f"{r['rule']} {r['dtype']} {r['tensors']}x{r['size']:,} {label} {r['threads']}thr"
    if "seconds" in r:
        per = Timing(**r["seconds"]).median
        outcome = f"{r['size'] * r['tensors'] / per / 1e6:,.1f} Melem/s, {per * 1e6:,.1f} us/step"
    else:
        outcome = f"skipped ({r['unavailable']})"
    elapsed = time.perf_counter() - started
    print(f"[{done:>{len(str(total))}}/{total}] {elapsed:6.0f}s  {what}: {outcome}", file=sys.stderr, flush=True)
