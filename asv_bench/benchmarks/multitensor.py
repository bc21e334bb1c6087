"""Many small arrays in one multi-tensor call against one array of the same total
size (the goal: 200 x 1,000 float32 within 1.5x of 1 x 200,000)."""

from .common import BACKENDS, MANY_SMALL, THREADS, CaseBenchmark, rule_case, rule_names

COUNT, SIZE = MANY_SMALL


class ManySmallArrays(CaseBenchmark):
    params = [rule_names(), [f"{COUNT}x{SIZE}", f"1x{COUNT * SIZE}"], THREADS, BACKENDS]
    param_names = ["rule", "layout", "threads", "backend"]

    def prepare(self, rule, layout, threads, backend):
        count, size = (int(part) for part in layout.split("x"))
        return rule_case(rule, size, "float32", threads, backend, n_tensors=count)

    def time_step(self, *params):
        self.case.step()
