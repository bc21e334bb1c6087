"""One registry of update-rule configurations, shared by the CLI, the benchmarks
and the tests: how to set up state for a rule and take a step with it.

Each entry knows the buffers its rule reads and writes per element, which is
what its speed limit is made of: a step moves ``bytes_per_element`` bytes per
parameter element, and no kernel can beat memory bandwidth divided by that.
"""

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .rules import sgd_step


@dataclass(frozen=True)
class Rule:
    name: str
    #: State buffers, in the order the face takes them after (params, grads).
    state: tuple
    #: ``step(params, grads, *state, t=..., backend=..., n_threads=...)``; t counts from 1.
    step: Callable
    #: Arrays read and written per element (param and grad included).
    reads: int
    writes: int
    description: str = ""
    #: State buffers that must start positive (second-moment accumulators).
    positive_state: tuple = field(default=())

    def bytes_per_element(self, dtype):
        return (self.reads + self.writes) * np.dtype(dtype).itemsize

    def make_state(self, rng, n, dtype):
        """Fresh random state buffers for ``n`` elements (positive where required)."""
        out = []
        for name in self.state:
            a = rng.standard_normal(n) * 0.1
            if name in self.positive_state:
                a = np.abs(a) + 0.01
            out.append(a.astype(dtype))
        return out


def _sgd(**hyper):
    def step(params, grads, *state, t, backend=None, n_threads=None):
        extra = {"first_step": t == 1} if state and hyper.get("convention", "pytorch") == "pytorch" else {}
        sgd_step(params, grads, *state, **hyper, **extra, backend=backend, n_threads=n_threads)
    return step


RULES = {
    r.name: r
    for r in [
        Rule("sgd", (), _sgd(lr=0.01), reads=2, writes=1, description="plain SGD"),
        Rule("sgd_momentum", ("momentum_buffer",), _sgd(lr=0.01, momentum=0.9), reads=3, writes=2,
             description="SGD, momentum 0.9 (PyTorch form)"),
        Rule("nesterov", ("momentum_buffer",), _sgd(lr=0.01, momentum=0.9, nesterov=True), reads=3, writes=2,
             description="SGD, Nesterov momentum 0.9"),
    ]
}
