"""The test grids, derived from the rule specs: every example of every rule
(``fastdescent.catalog.configurations()``), how to draw its state and how to step it.

A new rule's examples join every grid here without any test being edited.
"""

import inspect
import math
from contextlib import contextmanager

import numpy as np

from fastdescent.catalog import configurations
from fastdescent.rules import SPECS
from fastdescent.rules._spec import FIRST_GRADIENT, PARAMETER
from support import random_array

#: Every example of every rule: name -> catalog.Rule.
EXAMPLES = configurations()


def richest(spec):
    """The example of ``spec`` that keeps the most buffers (the first of those)."""
    examples = [EXAMPLES[e.name] for e in spec.examples]
    return max(examples, key=lambda rule: len(rule.state))


#: One example per rule, the one with the most buffers: name -> catalog.Rule.
RICHEST = {name: richest(spec) for name, spec in SPECS.items()}


def torch_examples():
    """The examples ``torch.optim`` can run: name -> (class name, options)."""
    return {name: rule.torch_peer for name, rule in EXAMPLES.items() if rule.torch_peer is not None}


def rule_shape(spec, shape):
    """``shape`` (an int: 1-D) if the rule of ``spec`` takes parameters of that shape,
    else a shape of as many elements that it takes (Muon: a matrix)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if spec.param_ndim is None or len(shape) == spec.param_ndim:
        return shape
    return spec.sample_shape(math.prod(shape))


def scalar_states(rule, hyper):
    """The rule's scalar states (NAdam's mu_product...) at their initial values, each a
    0-d float64 array, so that the grids copy and compare them like the buffers."""
    return {s.name: np.array(s.initial_value(hyper), dtype=np.float64) for s in rule.spec.scalar_state}


def for_loop(torch_class):
    """The options that select ``torch_class``'s for-loop implementation: ``foreach=False``
    where it has the choice (torch.optim.Muon has only that path)."""
    return {"foreach": False} if "foreach" in inspect.signature(torch_class).parameters else {}


@contextmanager
def torch_as_fastdescent(torch):
    """torch.optim computing as fastdescent does where the two differ by design, so
    that comparing them measures float rounding alone: torch.optim.Muon rounds its
    update to bfloat16 and runs the Newton-Schulz iteration in bfloat16 (about 1% of
    each step); inside this block it runs the same iteration in the parameter's
    dtype, as fastdescent does. test_muon.py compares with the bfloat16 one."""
    from torch.optim import _muon

    bfloat16_iteration = _muon._zeropower_via_newtonschulz

    def in_parameter_dtype(grad, ns_coefficients, ns_steps, eps):
        a, b, c = ns_coefficients
        tall = grad.size(0) > grad.size(1)
        x = grad.T.clone() if tall else grad.clone()
        x.div_(x.norm().clamp(min=eps))
        for _ in range(ns_steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if tall else x

    _muon._zeropower_via_newtonschulz = in_parameter_dtype
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = bfloat16_iteration


def grid_shapes(spec, n):
    """The parameter shapes the grids run for about ``n`` elements: ``(n,)``, and
    for a tensorwise rule (Adafactor factors matrices) also an odd square-ish
    matrix, a tall one (many row blocks) and a wide 3-D one (several column
    strips), or empty ones for ``n == 0``; of those, the ones of the rule's
    ``param_ndim``. A rule of matrices (Muon) gets at most 65 rows, as in
    ``spec.sample_shape``: its matrix products grow as rows squared times
    columns, and at 10**6 elements a square matrix took minutes of CI for
    nothing the elementwise pass does not also do on a wide one."""
    if not spec.tensorwise:
        return [(n,)]
    if n == 0:
        shapes = [(0,), (0, 3), (4, 0), (2, 0, 3)]
    else:
        rows = math.isqrt(n) | 1 if spec.param_ndim is None else min(math.isqrt(n) | 1, 65)
        shapes = [(n,), (rows, -(-n // rows) | 1), (max(1, n // 37) | 1, 37), (3, 5, max(1, n // 15) | 1)]
    return [s for s in shapes if spec.param_ndim is None or len(s) == spec.param_ndim]


def make_state(rng, rule, shape, dtype):
    """Random parameter and state buffers (``"param"`` and each buffer's name) for a
    parameter of ``shape`` (an int or a shape the rule does not take: as many
    elements in one it takes, :func:`rule_shape`), drawn as each buffer's ``sample``
    says: never zeros or constants, except buffers that must start at zero. A buffer
    the parameter's shape keeps none of is left out; the scalar states at their
    initial values."""
    shape = rule_shape(rule.spec, shape)
    state = {"param": random_array(rng, math.prod(shape), dtype).reshape(shape)}
    for buffer in rule.spec.needed(rule.hyper):
        buffer_shape = buffer.shape_for(shape)
        if buffer_shape is None:
            continue
        n = math.prod(buffer_shape)
        if buffer.sample == "positive":
            a = random_array(rng, n, dtype, scale=0.5, positive=True) * dtype(0.1)
        elif buffer.sample == "zero":
            a = np.zeros(n, dtype)
        else:
            a = random_array(rng, n, dtype, scale=0.1)
        state[buffer.name] = a.reshape(buffer_shape)
    return {**state, **scalar_states(rule, rule.hyper)}


def initial_state(rule, param, **hyper):
    """The state PyTorch starts from: each buffer the parameter keeps at its initial
    value (a buffer that starts as the first gradient is allocated, and written by
    the first step; one that starts as the parameter is its copy) and the scalar
    states at theirs. ``hyper`` overrides hyperparameters of the configuration (the
    ``lr`` of the first step: Rprop's step sizes and ASGD's eta start at it)."""
    h = rule.spec.validate({**rule.hyper, **hyper})
    state = {"param": param}
    for buffer in rule.spec.kept(h, param.shape):
        fill = buffer.initial(h)
        shape = buffer.shape_for(param.shape)
        if fill is PARAMETER:
            state[buffer.name] = param.copy()
        else:
            state[buffer.name] = np.empty(shape, param.dtype) if fill is FIRST_GRADIENT else np.full(shape, fill,
                                                                                                    param.dtype)
    return {**state, **scalar_states(rule, h)}


def stacked(states):
    """The states of many parameters as one multi-tensor state: name -> list, with
    None for a parameter that keeps no such buffer."""
    names = dict.fromkeys(name for state in states for name in state)
    return {name: [state.get(name) for state in states] for name in names}


def take_step(rule, state, grad, *, t, **call):
    """Step ``t`` (from 1) of ``rule``'s face on the buffers in ``state``, whose scalar
    states are passed in and replaced by the values after the step; ``call`` may
    override hyperparameters (``lr=...``) and pass ``grad_scale``, ``backend``,
    ``n_threads``. ``state`` holds arrays, or lists of arrays (one per tensor, as
    :func:`stacked` makes them; a scalar state is then read from the first and
    written to all)."""
    scalars = {}
    for s in rule.spec.scalar_state:
        value = state[s.name]
        scalars[s.name] = float(value[0] if isinstance(value, list) else value)
    after = rule.step(state["param"], grad, *(state.get(name) for name in rule.state), t=t,
                      scalar_state=scalars, **call)
    for name, value in (after or {}).items():
        for array in state[name] if isinstance(state[name], list) else [state[name]]:
            array[...] = value


def driver(rule):
    """A ``step`` for support.check_backends_agree."""
    def step(backend, state, grad, lr, t, n_threads):
        take_step(rule, state, grad, t=t + 1, lr=lr, backend=backend, n_threads=n_threads)
    return step
