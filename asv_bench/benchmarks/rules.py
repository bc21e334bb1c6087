"""Update rules from the catalog: one in-place step on one array, per size, dtype,
thread count and backend; its memory, its GB/s and its fraction of the in-run
bandwidth ceiling; and the kernel built for each instruction set."""

from .common import BACKENDS, PROFILE, THREADS, CaseBenchmark, Prepared, rule_names

RULES = rule_names()


class UpdateRule(CaseBenchmark):
    params = [RULES, PROFILE["sizes"], PROFILE["dtypes"], THREADS, BACKENDS]
    param_names = ["rule", "size", "dtype", "threads", "backend"]

    def time_step(self, *params):
        self.case.step()


class UpdateRuleMemory(CaseBenchmark):
    """Peak resident memory of a process holding a case's buffers and stepping it:
    the kernel adds nothing to the buffers, the reference allocates temporaries,
    torch its own state."""

    params = [RULES, PROFILE["memory_sizes"], PROFILE["dtypes"], [1], BACKENDS]
    param_names = ["rule", "size", "dtype", "threads", "backend"]

    def peakmem_step(self, *params):
        self.case.step()


class Bandwidth(CaseBenchmark):
    """Achieved GB/s (bytes read plus written per element, over the median step
    time) and its fraction of the ceiling measured in the same process: the
    bandwidth kernel with the rule's access pattern on the same buffers and threads."""

    params = [RULES, PROFILE["sizes"], PROFILE["dtypes"], THREADS, BACKENDS]
    param_names = ["rule", "size", "dtype", "threads", "backend"]

    def track_gb_per_s(self, *params):
        return self.case.gb_per_s(self.case.seconds_per_step())

    track_gb_per_s.unit = "GB/s"

    def track_ceiling_fraction(self, *params):
        return self.case.ceiling_seconds() / self.case.seconds_per_step()

    track_ceiling_fraction.unit = "fraction"


class Ceiling(CaseBenchmark):
    """The in-run ceiling itself: GB/s of the bandwidth kernel with each rule's pattern."""

    params = [RULES, PROFILE["sizes"], PROFILE["dtypes"], THREADS]
    param_names = ["rule", "size", "dtype", "threads"]

    def prepare(self, rule, size, dtype, threads):
        return Prepared(rule, size, dtype, threads, "ceiling")

    def track_gb_per_s(self, *params):
        return self.case.gb_per_s(self.case.seconds_per_step())

    track_gb_per_s.unit = "GB/s"


class KernelVariant(CaseBenchmark):
    """The same kernel compiled for each instruction set (one thread); variants
    this CPU cannot run, or that were not built, are skipped."""

    params = [RULES, PROFILE["sizes"], PROFILE["dtypes"], ["baseline", "avx2", "avx512"]]
    param_names = ["rule", "size", "dtype", "variant"]

    def prepare(self, rule, size, dtype, variant):
        return Prepared(rule, size, dtype, 1, "kernel", variant=variant)

    def time_step(self, *params):
        self.case.step()
