"""SGD: the two momentum conventions, values by hand, and the constraints between its options."""

import numpy as np
import pytest

import fastdescent as fd
from support import DTYPES, assert_unchanged, random_array, snapshot


@pytest.mark.parametrize("dtype", DTYPES)
def test_classical_equals_pytorch_convention_at_constant_rate(dtype, rng):
    """With a constant rate and no dampening the two conventions trace the same path."""
    n, lr, mu = 1000, 0.01, 0.9
    p1 = random_array(rng, n, np.float64)
    p2, v1, v2 = p1.copy(), np.zeros(n), np.zeros(n)
    for _ in range(20):
        g = random_array(rng, n, np.float64)
        fd.sgd_step(p1, g, v1, lr=lr, momentum=mu)
        fd.sgd_step(p2, g, v2, lr=lr, momentum=mu, convention="classical")
    np.testing.assert_allclose(p1, p2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v2, -lr * v1, rtol=1e-10)


def test_conventions_differ_when_the_rate_changes(rng):
    n = 100
    p1 = random_array(rng, n, np.float64)
    p2, v1, v2 = p1.copy(), np.zeros(n), np.zeros(n)
    for lr in (0.1, 0.1, 0.01, 0.01):
        g = random_array(rng, n, np.float64)
        fd.sgd_step(p1, g, v1, lr=lr, momentum=0.9)
        fd.sgd_step(p2, g, v2, lr=lr, momentum=0.9, convention="classical")
    assert np.max(np.abs(p1 - p2)) > 1e-3


def test_sgd_values_by_hand():
    p = np.array([1.0, -2.0], np.float64)
    g = np.array([0.5, 0.25])
    buf = np.array([0.1, 0.2])
    fd.sgd_step(p, g, buf, lr=0.1, momentum=0.9, weight_decay=0.1)
    d = g + 0.1 * np.array([1.0, -2.0])
    v = 0.9 * np.array([0.1, 0.2]) + d
    np.testing.assert_array_equal(buf, v)
    np.testing.assert_array_equal(p, np.array([1.0, -2.0]) - 0.1 * v)


def test_maximize_climbs():
    p = np.zeros(3)
    fd.sgd_step(p, np.ones(3), lr=0.5, maximize=True)
    np.testing.assert_array_equal(p, [0.5, 0.5, 0.5])


def bad_calls(rng):
    """(description, exception, call) for the constraints between SGD's options (the
    bad input every rule refuses is in test_rule_inputs.py)."""
    p = random_array(rng, 10, np.float32)
    g = random_array(rng, 10, np.float32)
    b = random_array(rng, 10, np.float32)
    arrays = (p, g, b)
    ok = dict(lr=0.1, momentum=0.9)
    cases = [
        ("nesterov without momentum", ValueError, lambda: fd.sgd_step(p, g, lr=0.1, nesterov=True)),
        ("nesterov with dampening", ValueError,
         lambda: fd.sgd_step(p, g, b, nesterov=True, dampening=0.1, **ok)),
        ("missing buffer", ValueError, lambda: fd.sgd_step(p, g, lr=0.1, momentum=0.5)),
        ("buffer without momentum", ValueError, lambda: fd.sgd_step(p, g, b, lr=0.1)),
        ("classical dampening", ValueError, lambda: fd.sgd_step(p, g, b, convention="classical", dampening=0.1, **ok)),
        ("classical first_step", ValueError, lambda: fd.sgd_step(p, g, b, convention="classical", first_step=True, **ok)),
        ("first_step not a bool", TypeError, lambda: fd.sgd_step(p, g, b, first_step="yes", **ok)),
    ]
    return arrays, cases


@pytest.mark.parametrize("index", range(7))
def test_bad_input_raises_and_changes_nothing(index, rng):
    arrays, cases = bad_calls(rng)
    assert len(cases) == 7
    description, exception, call = cases[index]
    before = snapshot(arrays)
    with pytest.raises(exception):
        call()
    assert_unchanged(arrays, before)
