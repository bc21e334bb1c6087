"""The optimizer objects on a model of many small arrays (200 x 1,000 float32):
a Python loop calling the functional face once per array, the optimizer's
multi-tensor step, and its flat arena; with and without gradient clipping."""

import numpy as np

from .common import MANY_SMALL, THREADS, Case, CaseBenchmark, fastdescent_attribute, rule

COUNT, SIZE = MANY_SMALL
#: optimizer class -> (its constructor arguments, the catalog rule with the same configuration)
OPTIMIZERS = {
    "SGD": ({"lr": 0.01, "momentum": 0.9}, "sgd_momentum"),
    "Adam": ({"lr": 1e-3}, "adam"),
}
CLIPPING = {"none": {}, "norm": {"clip_grad_norm": 1.0}, "value": {"clip_grad_value": 0.05}}


class OptimizerStep(CaseBenchmark):
    params = [list(OPTIMIZERS), ["loop", "multi-tensor", "flat"], list(CLIPPING), THREADS]
    param_names = ["optimizer", "layout", "clipping", "threads"]

    def prepare(self, name, layout, clipping, threads):
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(SIZE, dtype=np.float32) for _ in range(COUNT)]
        grads = [0.1 * rng.standard_normal(SIZE, dtype=np.float32) for _ in range(COUNT)]
        hyper, rule_name = OPTIMIZERS[name]
        if layout == "loop":
            if clipping != "none":
                raise NotImplementedError("the per-array loop has no clipping")
            step_rule = rule(rule_name)
            state = [step_rule.make_state(rng, SIZE, np.float32) for _ in range(COUNT)]

            def step():
                for p, g, s in zip(params, grads, state):
                    step_rule.step(p, g, *s, t=10, n_threads=threads)
        else:
            optimizer = fastdescent_attribute(name)(params, **hyper, **CLIPPING[clipping],
                                                    flat=layout == "flat", n_threads=threads)
            if layout == "flat":
                for view, g in zip(optimizer.grads, grads):
                    view[...] = g
                step = optimizer.step
            else:
                def step():
                    optimizer.step(grads)
        step()
        return Case(step, None)

    def time_step(self, *params):
        self.case.step()
