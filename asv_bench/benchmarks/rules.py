"""Update rules from the catalog: one in-place step on one array, per size, dtype,
thread count and backend; its memory, its GB/s and its fraction of the in-run
bandwidth ceiling; and the kernel built for each instruction set."""

from .common import BACKENDS, PROFILE, THREADS, CaseBenchmark, rule_case, rule_names, with_bandwidth_tracks

RULES = rule_names()
GRID = [RULES, PROFILE["sizes"], PROFILE["dtypes"], THREADS, BACKENDS]
GRID_NAMES = ["rule", "size", "dtype", "threads", "backend"]


class UpdateRule(CaseBenchmark):
    params = GRID
    param_names = GRID_NAMES

    def time_step(self, *params):
        self.case.step()


class UpdateRuleMemory(CaseBenchmark):
    """Peak resident memory of a process holding a case's buffers and stepping it:
    the kernel adds nothing to the buffers, the reference allocates temporaries,
    torch its own state."""

    params = [RULES, PROFILE["memory_sizes"], PROFILE["dtypes"], [1], BACKENDS]
    param_names = GRID_NAMES

    def peakmem_step(self, *params):
        self.case.step()


@with_bandwidth_tracks
class Bandwidth(CaseBenchmark):
    params = GRID
    param_names = GRID_NAMES


class Ceiling(CaseBenchmark):
    """The in-run ceiling itself: GB/s of the bandwidth kernel with each rule's pattern."""

    params = [RULES, PROFILE["sizes"], PROFILE["dtypes"], THREADS]
    param_names = ["rule", "size", "dtype", "threads"]

    def prepare(self, rule, size, dtype, threads):
        return rule_case(rule, size, dtype, threads, "ceiling")

    def track_gb_per_s(self, *params):
        return self.case.gb_per_s()

    track_gb_per_s.unit = "GB/s"


class KernelVariant(CaseBenchmark):
    """The same kernel compiled for each instruction set (one thread); variants
    this CPU cannot run, or that were not built, are skipped."""

    params = [RULES, PROFILE["sizes"], PROFILE["dtypes"], ["baseline", "avx2", "avx512"]]
    param_names = ["rule", "size", "dtype", "variant"]

    def prepare(self, rule, size, dtype, variant):
        return rule_case(rule, size, dtype, 1, "kernel", variant=variant)

    def time_step(self, *params):
        self.case.step()
