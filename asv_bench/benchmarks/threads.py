"""The threading policy (issue 20): float32 Adam on one array, fastdescent on 1 and
2 threads and torch fused on 2, back to back and after an idle gap of busy waiting
(a training loop's forward and backward pass), timed as ``python -m fastdescent
bench --cases threads`` times them. Reported as microseconds per step (``track_``),
since a gap must sit between timed calls and outside the timer."""

from .common import PROFILE, PROFILE_NAME, CaseBenchmark, bench_cases, rule_case

SIZES = {"smoke": [2**16], "quick": [2**16, 2**20], "full": [2**k for k in range(14, 25, 2)]}[PROFILE_NAME]
GAPS = [0.0, 0.005]
CONTENDERS = ["kernel-1thr", "kernel-2thr", "torch-fused-2thr"]
IDLE_SAMPLES = 15


class ThreadingPolicy(CaseBenchmark):
    params = [SIZES, GAPS, CONTENDERS]
    param_names = ["size", "gap", "contender"]

    def prepare(self, size, gap, contender):
        method, threads = contender.removesuffix("thr").rsplit("-", 1)
        return rule_case("adam", size, "float32", int(threads), method)

    def track_us_per_step(self, size, gap, contender):
        repeats = IDLE_SAMPLES if gap else PROFILE["repeats"]
        return bench_cases().time_step(self.case.step, repeats, PROFILE["min_time"], idle=gap).median * 1e6

    track_us_per_step.unit = "us"
