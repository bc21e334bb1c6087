"""Parameters shared by the suites, and the setup every benchmark goes through.

The profile comes from ``FASTDESCENT_ASV_PROFILE``: ``quick`` (the default: small
sizes, float32, a few minutes for the whole suite) or ``full`` (1e3 to 1e8
elements, both dtypes). Buffers, steps and timing come from
``fastdescent.bench.cases``, the same code as ``python -m fastdescent bench``; a
case that cannot run here (no torch, no torch peer, a commit without the feature)
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
BACKENDS = ["kernel", "reference", "torch-forloop", "torch-foreach", "torch-fused"]
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
    return list(RULES)


def bench_cases():
    """``fastdescent.bench.cases``, or NotImplementedError for a build that predates it."""
    try:
        from fastdescent.bench import cases
    except ImportError as error:
        raise NotImplementedError(f"this fastdescent has no benchmark helpers: {error}") from None
    return cases


def rule(name):
    from fastdescent.catalog import RULES

    if name not in RULES:
        raise NotImplementedError(f"this fastdescent has no rule {name!r}")
    return RULES[name]


class Prepared:
    """A benchmark's case: random buffers and one step of ``method`` on them, warm."""

    def __init__(self, rule_name, size, dtype, threads, method, n_tensors=1, variant=None):
        cases = bench_cases()
        self.cases = cases
        self.rule = rule(rule_name)
        self.threads = threads
        self.problem = cases.make_problem(self.rule, size, dtype, n_tensors=n_tensors)
        self._stack = ExitStack()
        try:
            self.step = self._stack.enter_context(
                cases.stepper(method, self.rule, self.problem, threads, variant))
            self.step()
        except BaseException:
            self._stack.close()
            raise

    def seconds_per_step(self, step=None):
        """Median seconds per call of ``step`` (default: this case's), timed as the bench command does."""
        timing = self.cases.time_step(step or self.step, PROFILE["repeats"], PROFILE["min_time"])
        return timing.median

    def gb_per_s(self, seconds):
        return self.problem.n_elements * self.rule.bytes_per_element(self.problem.dtype) / seconds / 1e9

    def ceiling_seconds(self):
        """Median seconds per call of the bandwidth kernel with this rule's pattern, same buffers and threads."""
        with self.cases.stepper("ceiling", self.rule, self.problem, self.threads) as ceiling:
            return self.seconds_per_step(ceiling)

    def close(self):
        self._stack.close()


class CaseBenchmark:
    """Base of the suites: ``setup`` builds ``self.case`` from the benchmark's
    parameters (``prepare``; by default ``Prepared(*params)``), ``teardown`` closes it."""

    timeout = TIMEOUT

    def prepare(self, *params):
        return Prepared(*params)

    def setup(self, *params):
        self.case = self.prepare(*params)

    def teardown(self, *params):
        # asv calls teardown even when setup raised NotImplementedError.
        case = getattr(self, "case", None)
        if case is not None:
            case.close()
