"""Adadelta: one step against the equations written independently, rho = 1, and the
step count kept as PyTorch keeps it although the update does not use it. (The grid,
torch agreement, bad input and convergence tests are derived from the spec:
test_rule_*.py.)"""

import math

import numpy as np
import pytest

import fastdescent as fd
from support import DTYPES, assert_bitwise_equal, random_array

BACKENDS = ("kernel", "reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_by_hand(backend, rng):
    n, lr, rho, eps, wd, scale = 100, 0.7, 0.8, 1e-4, 0.05, 2.0
    p, g = random_array(rng, n, np.float64), random_array(rng, n, np.float64)
    v, u = (random_array(rng, n, np.float64, scale=0.5, positive=True) * 0.1 for _ in range(2))
    expected = []
    for pi, gi, vi, ui in zip(p, g, v, u):
        d = -scale * gi + wd * pi  # maximize
        vi = rho * vi + (1 - rho) * d * d
        delta = math.sqrt(ui + eps) / math.sqrt(vi + eps) * d
        ui = rho * ui + (1 - rho) * delta * delta
        expected.append((pi - lr * delta, vi, ui))
    fd.adadelta_step(p, g, v, u, lr=lr, rho=rho, eps=eps, weight_decay=wd, maximize=True, grad_scale=scale,
                     backend=backend)
    for got, want, name in zip((p, v, u), zip(*expected), ("param", "square_avg", "acc_delta")):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-16, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rho_one_keeps_both_averages(dtype, backend, rng):
    """rho = 1 (allowed, as in PyTorch): the averages never change, and every step is
    the gradient scaled by the fixed ratio of their roots."""
    n, lr, eps = 300, 0.1, 1e-3
    p, g = random_array(rng, n, dtype), random_array(rng, n, dtype)
    v, u = (random_array(rng, n, dtype, scale=0.5, positive=True) for _ in range(2))
    v0, u0, p0 = v.copy(), u.copy(), p.copy()
    fd.adadelta_step(p, g, v, u, lr=lr, rho=1.0, eps=eps, backend=backend)
    assert_bitwise_equal(v, v0, "square_avg")
    assert_bitwise_equal(u, u0, "acc_delta")
    ratio = np.sqrt(u0 + dtype(eps)) / np.sqrt(v0 + dtype(eps))
    assert_bitwise_equal(p, p0 - dtype(lr) * (ratio * g), "param")


def test_optimizer_counts_steps_as_pytorch(rng):
    params = [random_array(rng, 10, np.float32)]
    opt = fd.Adadelta(params, rho=0.5)
    for _ in range(3):
        opt.step([random_array(rng, 10, np.float32)])
    assert list(opt.state[0]) == ["step", "square_avg", "acc_delta"]
    assert opt.state[0]["step"] == 3
