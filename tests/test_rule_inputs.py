"""Every rule's face refuses bad input before it writes anything, derived from the
specs: each hyperparameter with values its validator must refuse, a bad step, every
buffer missing, superfluous, read-only, of another dtype or shape, strided or
aliased, and bad call options. Each case raises the named exception and leaves every
array byte for byte as it was. A tensorwise rule is checked with a vector and with a
matrix parameter (Adafactor keeps other buffers for each)."""

import math
from functools import partial

import numpy as np
import pytest

from fastdescent import _checks
from fastdescent.rules import FACES, adafactor, muon, rprop
from rule_cases import RICHEST, make_state
from support import assert_unchanged, random_array, snapshot

NAN, INF = math.nan, math.inf

#: Values each validator must refuse, with the exception.
BAD_VALUES = {
    _checks.nonnegative: [(-0.1, ValueError), (NAN, ValueError), (INF, ValueError), ("0.1", TypeError),
                          (None, TypeError), (True, TypeError)],
    _checks.positive: [(0.0, ValueError), (-1.0, ValueError), (NAN, ValueError), ("1", TypeError)],
    _checks.finite: [(INF, ValueError), (NAN, ValueError), ("1", TypeError)],
    _checks.unit_interval: [(1.0, ValueError), (-0.1, ValueError), (NAN, ValueError), ("0.9", TypeError)],
    _checks.closed_unit_interval: [(1.5, ValueError), (-0.1, ValueError), (NAN, ValueError)],
    _checks.open_unit_interval: [(0.0, ValueError), (1.0, ValueError), (NAN, ValueError), ("0.5", TypeError)],
    _checks.integer: [(-1, ValueError), (2.5, TypeError), (True, TypeError), ("3", TypeError), (None, TypeError)],
    _checks.betas_pair: [((1.0, 0.999), ValueError), ((0.9, -0.1), ValueError), ((0.9, NAN), ValueError),
                         ((0.9,), TypeError), (0.9, TypeError), ((0.9, 0.99, 0.999), TypeError),
                         (("0.9", 0.999), TypeError)],
    _checks.boolean: [("yes", TypeError), (None, TypeError), (1, TypeError)],
    _checks.choice: [("nope", ValueError), (1, ValueError)],
    rprop.etas_pair: [((0.5, 1.0), ValueError), ((1.0, 1.2), ValueError), ((0.0, 1.2), ValueError),
                      ((0.5, INF), ValueError), ((NAN, 1.2), ValueError), ((0.5,), TypeError), (0.5, TypeError),
                      (("0.5", 1.2), TypeError)],
    rprop.step_size_bounds: [((-1e-6, 50.0), ValueError), ((1.0, 0.5), ValueError), ((1e-6, INF), ValueError),
                             ((NAN, 1.0), ValueError), ((1e-6,), TypeError), (None, TypeError),
                             ((1e-6, "50"), TypeError)],
    adafactor._nonpositive: [(0.1, ValueError), (NAN, ValueError), ("-0.8", TypeError), (None, TypeError)],
    adafactor._eps_pair: [((-1e-30, 1e-3), ValueError), ((None, -1.0), ValueError), ((None, NAN), ValueError),
                          ((INF, 1e-3), ValueError), ((None,), TypeError), (1e-3, TypeError),
                          (("1e-3", 1e-3), TypeError)],
    adafactor._clipping_threshold: [(0.0, ValueError), (0.999, ValueError), (NAN, ValueError), ("1", TypeError)],
    muon.coefficient_triple: [((3.4, -4.7), TypeError), (3.4, TypeError), ((3.4, NAN, 2.0), ValueError),
                              ((3.4, -4.7, INF), ValueError), (("3.4", -4.7, 2.0), TypeError)],
    muon.ns_steps: [(-1, ValueError), (100, ValueError), (5.0, TypeError), (True, TypeError), ("5", TypeError)],
    muon.adjust_lr_fn: [("nope", ValueError), ("Original", ValueError), (1, ValueError)],
}


def validator(hyper):
    check = hyper.check
    return check.func if isinstance(check, partial) else check


def face_arguments(rule, arrays):
    """(positional buffers, keyword arguments) of a good call of ``rule``'s face."""
    spec = rule.spec
    buffers = [arrays.get(b.name) for b in spec.buffers]
    kwargs = {k: v for k, v in rule.options.items() if next(h for h in spec.hyper if h.name == k).face}
    if spec.uses_step:
        kwargs["step"] = 3
    return buffers, kwargs


def input_shapes(spec):
    """The parameter shapes of the bad-input suite: 10 elements, as a vector and, for
    a tensorwise rule, as a matrix; of those, the ones of the rule's ``param_ndim``."""
    shapes = [(10,), (2, 5)] if spec.tensorwise else [(10,)]
    return [s for s in shapes if spec.param_ndim is None or len(s) == spec.param_ndim]


def bad_calls(rule, rng, shape=(10,)):
    """(arrays, [(description, exception, call)]) for ``rule``'s face on a parameter
    of ``shape``."""
    spec, face = rule.spec, FACES[rule.spec.face_name]
    state = make_state(rng, rule, shape, np.float32)
    param, grad = state.pop("param"), random_array(rng, 10, np.float32).reshape(shape)
    arrays = [param, grad, *state.values()]
    buffers, kwargs = face_arguments(rule, state)

    def call(params=param, grads=grad, replace=None, **changes):
        bufs = list(buffers)
        for name, value in (replace or {}).items():
            bufs[spec.buffer_names.index(name)] = value
        return lambda: face(params, grads, *bufs, **{**kwargs, **changes})

    cases = []
    for hyper in spec.hyper:
        if not hyper.face:
            continue
        values = BAD_VALUES.get(validator(hyper))
        assert values is not None, f"add the bad values of {hyper.check} to BAD_VALUES"
        cases += [(f"{hyper.name}={value!r}", error, call(**{hyper.name: value})) for value, error in values]
    for s in spec.scalar_state:  # its value before the step, as the face takes it
        cases += [(f"{s.name}={value!r}", error, call(**{s.name: value})) for value, error in BAD_VALUES[_checks.finite]]
    if spec.uses_step:
        cases += [("step 0", ValueError, call(step=0)), ("step -3", ValueError, call(step=-3)),
                  ("step 2.5", TypeError, call(step=2.5)), ("step True", TypeError, call(step=True)),
                  ("step 10**400", ValueError, call(step=10**400))]
    for b in spec.buffers:
        a = state.get(b.name)
        if a is None:  # not needed by this configuration (or not kept for this shape): giving it is an error
            unneeded = random_array(rng, 10, np.float32).reshape(b.shape_for(shape) or shape)
            cases.append((f"{b.name} not needed", ValueError, call(replace={b.name: unneeded})))
            continue
        read_only = a.copy()
        read_only.flags.writeable = False
        arrays.append(read_only)
        cases += [
            (f"{b.name} missing", ValueError, call(replace={b.name: None})),
            (f"{b.name} read-only", ValueError, call(replace={b.name: read_only})),
            (f"{b.name} float64", TypeError, call(replace={b.name: a.astype(np.float64)})),
            (f"{b.name} short", ValueError, call(replace={b.name: a.reshape(-1)[:-1]})),
            (f"{b.name} reshaped", ValueError, call(replace={b.name: a.reshape(1, -1, 1)})),
            (f"{b.name} strided", ValueError, call(replace={b.name: np.repeat(a, 2)[::2].reshape(a.shape)})),
            (f"{b.name} is the gradient", ValueError, call(replace={b.name: grad})),
            (f"{b.name} is the parameter", ValueError, call(replace={b.name: param})),
            (f"{b.name} a list for one parameter", TypeError, call(replace={b.name: list(a)})),
        ]
    present = [name for name in spec.buffer_names if name in state]
    for first, second in zip(present, present[1:]):
        cases.append((f"{second} is {first}", ValueError, call(replace={second: state[first]})))
    if present:
        two = {name: [state[name], state[name].copy()] for name in spec.buffer_names if name in state}
        short = dict(two, **{present[-1]: [state[present[-1]]]})
        cases.append((f"one {present[-1]} for two params", ValueError,
                      lambda: face([param, param.copy()], [grad, grad.copy()],
                                   *[short.get(name) for name in spec.buffer_names], **kwargs)))
    cases += [
        ("mixed dtypes in a list", TypeError,
         lambda: face([param, param.astype(np.float64)], [grad, grad.astype(np.float64)],
                      *[None if b is None else [b, b.astype(np.float64)] for b in buffers], **kwargs)),
        ("float64 grad", TypeError, call(grads=grad.astype(np.float64))),
        ("int params", TypeError, call(params=np.arange(10).reshape(param.shape), grads=np.arange(10).reshape(param.shape))),
        ("float16 params", TypeError, call(params=param.astype(np.float16), grads=grad.astype(np.float16))),
        ("grad is param", ValueError, call(grads=param)),
        ("short grad", ValueError, call(grads=grad.reshape(-1)[:9])),
        ("strided grad", ValueError, call(grads=np.repeat(grad, 2)[::2].reshape(shape))),
        ("list of grads for one param", TypeError, call(grads=[grad])),
        ("two params, one grad", ValueError, lambda: face([param, param.copy()], [grad],
                                                          *[None if b is None else [b, b.copy()] for b in buffers],
                                                          **kwargs)),
        ("grad_scale inf", ValueError, call(grad_scale=INF)),
        ("grad_scale string", TypeError, call(grad_scale="1")),
        ("n_threads 0", ValueError, call(n_threads=0)),
        ("unknown backend", ValueError, call(backend="gpu")),
        ("unknown option", TypeError, call(no_such_option=1)),
    ]
    if spec.param_ndim is not None:  # every array well formed, but of the wrong dimension
        flat = [None if b is None else b.reshape(-1) for b in buffers]
        cases.append((f"1-D params for a rule of {spec.param_ndim}-D ones", ValueError,
                      lambda: face(param.reshape(-1), grad.reshape(-1), *flat, **kwargs)))
    return arrays, cases


CASES = [(name, shape, index) for name, rule in RICHEST.items() for shape in input_shapes(rule.spec)
         for index in range(len(bad_calls(rule, np.random.default_rng(0), shape)[1]))]


def case_id(name, shape, index):
    description = bad_calls(RICHEST[name], np.random.default_rng(0), shape)[1][index][0]
    return f"{name}-{description}" if shape == (10,) else f"{name}-{'x'.join(map(str, shape))}-{description}"


@pytest.mark.parametrize("name, shape, index", CASES, ids=[case_id(*case) for case in CASES])
def test_bad_input_raises_and_changes_nothing(name, shape, index, rng):
    arrays, cases = bad_calls(RICHEST[name], rng, shape)
    description, exception, call = cases[index]
    before = snapshot(arrays)
    with pytest.raises(exception):
        call()
    assert_unchanged(arrays, before)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("name", list(RICHEST))
def test_the_good_call_works(name, backend, rng):
    """The fixtures of bad_calls are fine once the one fault is removed."""
    rule = RICHEST[name]
    for shape in input_shapes(rule.spec):
        state = make_state(rng, rule, shape, np.float32)
        param, grad = state.pop("param"), random_array(rng, 10, np.float32).reshape(shape)
        buffers, kwargs = face_arguments(rule, state)
        before = param.copy()
        FACES[rule.spec.face_name](param, grad, *buffers, **kwargs, backend=backend)
        assert np.all(np.isfinite(param)) and not np.array_equal(param, before)
