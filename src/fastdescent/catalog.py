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
from .rules import adagrad_step, adam_step, adamw_step, rmsprop_step


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
    #: State buffers that start at zero, as PyTorch's do (where random values are
    #: invalid: a centered RMSprop needs grad_avg**2 <= square_avg).
    zero_state: tuple = field(default=())

    def bytes_per_element(self, dtype):
        return (self.reads + self.writes) * np.dtype(dtype).itemsize

    def make_state(self, rng, n, dtype):
        """Fresh random state buffers for ``n`` elements (positive where required)."""
        out = []
        for name in self.state:
            a = rng.standard_normal(n) * 0.1
            if name in self.positive_state:
                a = np.abs(a) + 0.01
            if name in self.zero_state:
                a = np.zeros(n)
            out.append(a.astype(dtype))
        return out


def _sgd(**hyper):
    def step(params, grads, *state, t, backend=None, n_threads=None):
        extra = {"first_step": t == 1} if state and hyper.get("convention", "pytorch") == "pytorch" else {}
        sgd_step(params, grads, *state, **hyper, **extra, backend=backend, n_threads=n_threads)
    return step


def _counted(face, **hyper):
    """A step for a face that takes the 1-based step index as ``step``."""
    def step(params, grads, *state, t, backend=None, n_threads=None):
        face(params, grads, *state, step=t, **hyper, backend=backend, n_threads=n_threads)
    return step


def _uncounted(face, **hyper):
    def step(params, grads, *state, t, backend=None, n_threads=None):
        face(params, grads, *state, **hyper, backend=backend, n_threads=n_threads)
    return step


RULES = {
    r.name: r
    for r in [
        Rule("sgd", (), _sgd(lr=0.01), reads=2, writes=1, description="plain SGD"),
        Rule("sgd_momentum", ("momentum_buffer",), _sgd(lr=0.01, momentum=0.9), reads=3, writes=2,
             description="SGD, momentum 0.9 (PyTorch form)"),
        Rule("nesterov", ("momentum_buffer",), _sgd(lr=0.01, momentum=0.9, nesterov=True), reads=3, writes=2,
             description="SGD, Nesterov momentum 0.9"),
        Rule("adagrad", ("sum",), _counted(adagrad_step, lr=0.01), reads=3, writes=2,
             description="Adagrad", positive_state=("sum",)),
        Rule("rmsprop", ("square_avg",), _uncounted(rmsprop_step, lr=0.01), reads=3, writes=2,
             description="RMSprop, alpha 0.99", positive_state=("square_avg",)),
        Rule("rmsprop_centered_momentum", ("square_avg", "momentum_buffer", "grad_avg"),
             _uncounted(rmsprop_step, lr=0.01, momentum=0.9, centered=True), reads=5, writes=4,
             description="RMSprop, centered, momentum 0.9", positive_state=("square_avg",),
             zero_state=("grad_avg",)),
        Rule("adam", ("exp_avg", "exp_avg_sq"), _counted(adam_step, lr=1e-3), reads=4, writes=3,
             description="Adam", positive_state=("exp_avg_sq",)),
        Rule("adamw", ("exp_avg", "exp_avg_sq"), _counted(adamw_step, lr=1e-3), reads=4, writes=3,
             description="AdamW, weight decay 0.01", positive_state=("exp_avg_sq",)),
        Rule("adam_amsgrad", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
             _counted(adam_step, lr=1e-3, amsgrad=True), reads=5, writes=4,
             description="Adam with AMSGrad", positive_state=("exp_avg_sq", "max_exp_avg_sq")),
    ]
}
