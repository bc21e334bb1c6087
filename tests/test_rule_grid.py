"""Every rule, derived from its spec: kernel vs reference bit for bit over the whole
grid (every example, both dtypes, odd lengths, 1 and 2 threads, every instruction-set
variant, ten steps with a changing rate; a tensorwise rule also on matrices and 3-D
arrays of those lengths), multi-tensor lists against per-array calls, and the
properties every rule's face must have."""

import math

import numpy as np
import pytest

from rule_cases import EXAMPLES, RICHEST, driver, grid_shapes, make_state, stacked, take_step
from support import DTYPES, SIZES, THREADS, assert_bitwise_equal, check_backends_agree, random_array, random_like

STEPS = 10


# The largest size only on 2 threads: on 1 it runs the same loop as 4097 elements do,
# and its reference steps are most of the suite's time.
SIZES_THREADS = [(n, t) for n in SIZES for t in THREADS if n < max(SIZES) or t > 1]


@pytest.mark.parametrize(("n", "n_threads"), SIZES_THREADS, ids=[f"{n}-{t}" for n, t in SIZES_THREADS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_kernel_matches_reference(name, dtype, n, n_threads, rng, kernel_variant):
    rule = EXAMPLES[name]
    lrs = [0.05 * 0.8**t for t in range(STEPS)]  # the rate changes every step
    for shape in grid_shapes(rule.spec, n):
        state = make_state(rng, rule, shape, dtype)
        grads = [random_like(rng, state["param"]) for _ in range(STEPS)]
        final = check_backends_agree(driver(rule), state, grads, lrs, n_threads)
        # Not for one element: a sign-based rule (Rprop) leaves it in place at every step
        # where the gradient's sign flips, ten times in a row once in 2**10 draws.
        if math.prod(shape) > 1:
            assert not np.array_equal(final["param"], state["param"]), f"{shape}: the steps changed nothing"
        for key in state:
            assert np.all(np.isfinite(final[key])), (shape, key)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(RICHEST))
def test_multi_tensor_matches_per_array(name, dtype, rng, tiny_parts):
    """Lists of mixed sizes, split among 2 threads at arbitrary points, equal per-array steps."""
    rule = RICHEST[name]
    shapes = [(0,), (1,), (130,), (7,), (0,), (4097,), (65,), (3000,), (1,), (10, 13), (0, 3), (3, 7, 65), ()]
    states = [make_state(rng, rule, shape, dtype) for shape in shapes]
    together = [{k: v.copy() for k, v in s.items()} for s in states]
    alone = [{k: v.copy() for k, v in s.items()} for s in states]
    for t in (1, 2, 3):
        grads = [random_like(rng, s["param"]) for s in states]
        take_step(rule, stacked(together), grads, t=t, lr=0.1, n_threads=2)
        for s, g in zip(alone, grads):
            take_step(rule, s, g, t=t, lr=0.1, n_threads=1)
    for a, b in zip(together, alone):
        for k in a:
            assert_bitwise_equal(a[k], b[k], k)


def run_steps(rule, state, grads, **call):
    state = {k: v.copy() for k, v in state.items()}
    for t, grad in enumerate(grads, start=1):
        take_step(rule, state, grad, t=t, lr=0.02, **call)
    return state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(RICHEST))
def test_grad_scale_and_maximize_act_on_the_gradient(name, dtype, rng):
    """grad_scale=s equals handing in s*g; maximize (where the rule has it) equals
    handing in -g. Both bit for bit: s is a power of two, so s*g is exact."""
    rule = RICHEST[name]
    s = 0.25
    for shape in grid_shapes(rule.spec, 257):
        state = make_state(rng, rule, shape, dtype)
        grads = [random_like(rng, state["param"]) for _ in range(4)]
        scaled = run_steps(rule, state, grads, grad_scale=s)
        prescaled = run_steps(rule, state, [s * g for g in grads])
        for key in state:
            assert_bitwise_equal(scaled[key], prescaled[key], f"{shape} {key}")
        if "maximize" in rule.hyper:
            climbed = run_steps(rule, state, grads, maximize=not rule.hyper["maximize"])
            negated = run_steps(rule, state, [-g for g in grads])
            for key in state:
                assert_bitwise_equal(climbed[key], negated[key], f"{shape} {key}")


@pytest.mark.parametrize("name", list(RICHEST))
def test_nd_arrays_are_updated_in_place(name, rng):
    """The arrays given are the ones updated; an elementwise rule updates an n-d array
    as its flat 1-D view (a tensorwise rule's update depends on the shape)."""
    rule = RICHEST[name]
    if rule.spec.param_ndim is not None:
        pytest.skip(f"{rule.spec.title} takes {rule.spec.param_ndim}-D parameters only")
    shaped = make_state(rng, rule, (2, 3, 4), np.float32)
    before = {k: v.copy() for k, v in shaped.items()}
    views = dict(shaped)
    grad = random_array(rng, 24, np.float32)
    take_step(rule, shaped, grad.reshape(2, 3, 4), t=1)
    for k in shaped:
        assert shaped[k] is views[k]
    assert not np.array_equal(shaped["param"], before["param"])
    if not rule.spec.tensorwise:
        flat = {k: v.reshape(-1) if v.ndim else v for k, v in before.items()}  # not scalar states
        take_step(rule, flat, grad, t=1)
        for k in flat:
            assert_bitwise_equal(shaped[k].reshape(flat[k].shape), flat[k], k)
