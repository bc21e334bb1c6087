"""The per-step cost (issue 13): float32 Adam through the functional face, the
optimizer and its flat arena, beside torch fused and the torch adapter, on 1 and
100 arrays of 1,000 elements (Python around the kernel is most of the time) and
on one array of 10**6 (the kernel's own time), one thread. The same steps as
``python -m fastdescent bench --cases steps``."""

from contextlib import ExitStack

from .common import CaseBenchmark, Case, bench_cases, rule

SHAPES = ["1x1000", "100x1000", "1x1000000"]


class StepCost(CaseBenchmark):
    params = [["face", "optimizer", "optimizer-flat", "torch-fused", "torch-adapter"], SHAPES]
    param_names = ["method", "arrays"]

    def prepare(self, method, arrays):
        try:
            from fastdescent.bench import steps
        except ImportError as error:
            raise NotImplementedError(f"this fastdescent has no steps case: {error}") from None
        count, size = (int(part) for part in arrays.split("x"))
        stack = ExitStack()
        try:
            step = stack.enter_context(steps.stepper(method, rule("adam"), count, size, 1,
                                                     bench_cases().torch_or_none()))
        except bench_cases().Unavailable as why:
            stack.close()
            raise NotImplementedError(str(why)) from None
        return Case(step, None, stack=stack)

    def time_step(self, method, arrays):
        self.case.step()
