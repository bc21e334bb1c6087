"""Parameters shared by the suites, and the setup every benchmark goes through.

The profile comes from ``FASTDESCENT_ASV_PROFILE``: ``quick`` (the default: small
sizes, float32, a few minutes for the whole suite), ``smoke`` (CI's: one size, six
rules, every suite once) or ``full`` (1e3 to 1e8
elements, both dtypes). Buffers, steps and timing come from
``fastdescent.bench.cases``, the same code as ``python -m fastdescent bench``; a
case that cannot run here (no torch, no torch peer, a build without the feature)
raises NotImplementedError in ``setup``, which asv reports as skipped.
"""

import os
from contextlib import ExitStack

try:
    # Imported once here so that asv's forkserver (``--launch-method forkserver``)
    # preloads them: torch.optim imports torch._dynamo when an optimizer is built,
    # seconds that would otherwise be paid by every benchmark.
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
except ImportError:
    pass

PROFILES = {
    "quick": {
        "sizes": [10**3, 10**5],
        "dtypes": ["float32"],
        "memory_sizes": [10**6],
        "repeats": 3,
        "min_time": 0.01,
    },
    # CI's check that every suite runs: one size, one sample, a rule of each kind
    # (elementwise with momentum, Adam, scalar state, sign-based, tensorwise, matrices).
    "smoke": {
        "sizes": [10**3],
        "dtypes": ["float32"],
        "memory_sizes": [10**4],
        "repeats": 1,
        "min_time": 0.001,
        "rules": ["sgd_momentum", "adam", "asgd", "lion", "adafactor", "muon"],
    },
    "full": {
        "sizes": [10**k for k in range(3, 9)],
        "dtypes": ["float32", "float64"],
        "memory_sizes": [10**6, 10**8],
        "repeats": 7,
        "min_time": 0.05,
    },
}
PROFILE_NAME = os.environ.get("FASTDESCENT_ASV_PROFILE", "quick").strip() or "quick"
if PROFILE_NAME not in PROFILES:
    raise ValueError(f"FASTDESCENT_ASV_PROFILE must be one of {sorted(PROFILES)}, got {PROFILE_NAME!r}")
PROFILE = PROFILES[PROFILE_NAME]

THREADS = [1, 2]
BACKENDS = ["kernel", "reference", "torch-forloop", "torch-foreach", "torch-fused", "torch-adapter"]
#: The many-small-arrays case: (tensors, elements each) against one array of the same total.
MANY_SMALL = (200, 1000)

# Benchmarks at 1e8 elements take seconds per call for the slow backends.
TIMEOUT = 600


def rule_names():
    """The catalog's rules in the installed fastdescent (empty if it has none)."""
    try:
        from fastdescent.catalog import RULES
    except ImportError:
        return []
    wanted = PROFILE.get("rules")
    return [name for name in RULES if wanted is None or name in wanted]


def bench_cases():
    """``fastdescent.bench.cases``, or NotImplementedError for a build that predates it."""
    try:
        from fastdescent.bench import cases
    except ImportError as error:
        raise NotImplementedError(f"this fastdescent has no benchmark helpers: {error}") from None
    return cases


def fastdescent_attribute(name):
    """``fastdescent.<name>``, or NotImplementedError for a build without it."""
    import fastdescent

    if not hasattr(fastdescent, name):
        raise NotImplementedError(f"this fastdescent has no {name}")
    return getattr(fastdescent, name)


def rule(name):
    from fastdescent.catalog import RULES

    if name not in RULES:
        raise NotImplementedError(f"this fastdescent has no rule {name!r}")
    return RULES[name]


def torch_or_skip():
    torch = bench_cases().torch_or_none()
    if torch is None:
        raise NotImplementedError("torch is not installed")
    return torch


class Case:
    """A benchmark's prepared work on buffers made once: ``step()`` takes one
    step; ``ceiling()`` (optional) runs the bandwidth kernel with the same access
    pattern on the same buffers; ``bytes_per_step`` is what a step reads plus writes."""

    def __init__(self, step, bytes_per_step, ceiling=None, stack=None):
        self.step, self.bytes_per_step, self.ceiling = step, bytes_per_step, ceiling
        self._stack = stack or ExitStack()

    def enter(self, context):
        """Enter ``context`` until the case is closed."""
        return self._stack.enter_context(context)

    def seconds_per_step(self, step=None):
        """Median seconds per call of ``step`` (default: this case's), timed as the bench command does."""
        timing = bench_cases().time_step(step or self.step, PROFILE["repeats"], PROFILE["min_time"])
        return timing.median

    def gb_per_s(self):
        return self.bytes_per_step / self.seconds_per_step() / 1e9

    def ceiling_fraction(self):
        if self.ceiling is None:
            raise NotImplementedError("no bandwidth pattern for this case")
        return self.seconds_per_step(self.ceiling) / self.seconds_per_step()

    def close(self):
        self._stack.close()


def stream_ceiling(written, read_only, n_threads):
    """The bandwidth kernel (widest variant) over ``written`` (lists of arrays,
    read and written back) and ``read_only`` lists of arrays."""
    cases = bench_cases()
    from fastdescent import _dispatch

    stream = _dispatch.load_variant(cases.ceiling_variant()).stream
    roles = [*written, *read_only]
    return lambda: stream(roles, len(written), n_threads)


def rule_case(rule_name, size, dtype, threads, method, n_tensors=1, variant=None):
    """A catalog rule's step by ``method`` on fresh buffers, warm; its ceiling is
    the bandwidth kernel with the rule's pattern."""
    cases = bench_cases()
    rule_ = rule(rule_name)
    problem = cases.make_problem(rule_, size, dtype, n_tensors=n_tensors)
    stack = ExitStack()
    try:
        step = stack.enter_context(cases.stepper(method, rule_, problem, threads, variant))
        step()
    except BaseException:
        stack.close()
        raise
    try:
        ceiling = stack.enter_context(cases.stepper("ceiling", rule_, problem, threads))
    except cases.Unavailable:
        ceiling = None
    nbytes = problem.n_elements * rule_.bytes_per_element(dtype)
    return Case(step, nbytes, ceiling, stack)


class CaseBenchmark:
    """Base of the suites: ``setup`` builds ``self.case`` from the benchmark's
    parameters (``prepare``; by default ``rule_case(*params)``), ``teardown`` closes it."""

    timeout = TIMEOUT

    def prepare(self, *params):
        return rule_case(*params)

    def setup(self, *params):
        self.case = self.prepare(*params)

    def teardown(self, *params):
        # asv calls teardown even when setup raised NotImplementedError.
        case = getattr(self, "case", None)
        if case is not None:
            case.close()


def with_bandwidth_tracks(cls):
    """Class decorator: add ``track_gb_per_s`` (bytes read plus written over the
    median step time) and ``track_ceiling_fraction`` (of the ceiling measured in the
    same process on the same buffers and threads) to a ``CaseBenchmark``. (A mixin
    class would itself be collected by asv as a benchmark.)"""

    def track_gb_per_s(self, *params):
        return self.case.gb_per_s()

    def track_ceiling_fraction(self, *params):
        return self.case.ceiling_fraction()

    track_gb_per_s.unit = "GB/s"
    track_ceiling_fraction.unit = "fraction"
    cls.track_gb_per_s = track_gb_per_s
    cls.track_ceiling_fraction = track_ceiling_fraction
    return cls
