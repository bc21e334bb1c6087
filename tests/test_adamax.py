"""Adamax: one step against the equations written independently, the infinity
norm's maximum and decay bit for bit, and a NaN gradient reaching the norm as in
PyTorch. (The grid, torch agreement, bad input and convergence tests are derived
from the spec: test_rule_*.py.)"""

import math

import numpy as np
import pytest

import fastdescent as fd
from support import DTYPES, assert_bitwise_equal, random_array

BACKENDS = ("kernel", "reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_by_hand(backend, rng):
    n, t, lr, (beta1, beta2), eps, wd, scale = 200, 3, 0.01, (0.8, 0.95), 1e-3, 0.1, 0.5
    p, g, m = (random_array(rng, n, np.float64) for _ in range(3))
    u = random_array(rng, n, np.float64, scale=0.5, positive=True)
    expected_p, expected_m, expected_u = [], [], []
    for pi, gi, mi, ui in zip(p, g, m, u):
        d = -scale * gi + wd * pi  # maximize
        mi = beta1 * mi + (1 - beta1) * d
        ui = max(beta2 * ui, abs(d) + eps)
        expected_p.append(pi - lr / (1 - beta1**t) * mi / ui)
        expected_m.append(mi)
        expected_u.append(ui)
    raised = np.array(expected_u) > beta2 * u
    assert 0 < raised.sum() < n, "both sides of the maximum should occur"
    fd.adamax_step(p, g, m, u, step=t, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, maximize=True,
                   grad_scale=scale, backend=backend)
    np.testing.assert_allclose(m, expected_m, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(u, expected_u, rtol=1e-15, atol=0)
    np.testing.assert_allclose(p, expected_p, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_decays_by_beta2_down_to_eps(dtype, backend, rng):
    """With zero gradients u_t = max(beta2 * u_{t-1}, eps): it decays geometrically,
    bit for bit, until it is held at eps."""
    n, beta2, eps = 500, 0.5, 1e-3
    p, m = random_array(rng, n, dtype), random_array(rng, n, dtype)
    u = random_array(rng, n, dtype, scale=2.0, positive=True) * dtype(0.01)
    expected = u.copy()
    for t in range(1, 7):
        fd.adamax_step(p, np.zeros(n, dtype), m, u, step=t, betas=(0.9, beta2), eps=eps, backend=backend)
        expected = np.maximum(expected * dtype(beta2), dtype(eps))
        assert_bitwise_equal(u, expected, f"exp_inf after step {t}")
    assert np.any(u == dtype(eps)) and np.any(u > dtype(eps))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_gradient_reaches_the_norm_and_the_parameter(backend, rng):
    """As torch.maximum, the maximum propagates a NaN gradient."""
    n = 33
    p, g, m = (random_array(rng, n, np.float32) for _ in range(3))
    u = random_array(rng, n, np.float32, positive=True)
    g[5] = math.nan
    fd.adamax_step(p, g, m, u, step=1, backend=backend)
    for a in (p, m, u):
        assert np.isnan(a[5]) and np.isfinite(np.delete(a, 5)).all()
