"""RAdam: the rectification switch (steps against the equations written
independently, the second moment ignored before the switch) and where it falls.
(The grid, torch agreement, bad input and convergence tests are derived from the
spec: test_rule_*.py.)"""

import math

import numpy as np
import pytest

import fastdescent as fd
from fastdescent.rules import SPECS
from support import DTYPES, assert_bitwise_equal, random_array

BACKENDS = ("kernel", "reference")


def rho(t, beta2):
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf, rho_inf - 2 * t * beta2**t / (1 - beta2**t)


def rectified(t, beta2):
    return SPECS["radam"].scalars(SPECS["radam"].validate({**SPECS["radam"].defaults, "betas": (0.9, beta2)}),
                                  step=t, grad_scale=1.0, fresh=frozenset())["rectified"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_by_hand_across_the_switch(backend, rng):
    """From PyTorch's initial state: five momentum-SGD steps, then rectified Adam steps."""
    n, lr, (beta1, beta2), eps, wd = 64, 0.01, (0.9, 0.999), 1e-8, 0.02
    p = random_array(rng, n, np.float64)
    m, v = np.zeros(n), np.zeros(n)
    hand, hand_m, hand_v = p.copy(), m.copy(), v.copy()
    switched = []
    for t in range(1, 10):
        g = random_array(rng, n, np.float64)
        fd.radam_step(p, g, m, v, step=t, lr=lr, weight_decay=wd, backend=backend)
        rho_inf, rho_t = rho(t, beta2)
        switched.append(rho_t > 5)
        for i in range(n):
            d = g[i] + wd * hand[i]
            hand_m[i] = beta1 * hand_m[i] + (1 - beta1) * d
            hand_v[i] = beta2 * hand_v[i] + (1 - beta2) * d * d
            m_hat = hand_m[i] / (1 - beta1**t)
            if rho_t > 5:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                hand[i] -= lr * r * m_hat * math.sqrt(1 - beta2**t) / (math.sqrt(hand_v[i]) + eps)
            else:
                hand[i] -= lr * m_hat
        np.testing.assert_allclose(p, hand, rtol=1e-13, atol=1e-15, err_msg=f"step {t}")
    np.testing.assert_allclose(m, hand_m, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(v, hand_v, rtol=1e-13, atol=1e-15)
    assert switched == [False] * 5 + [True] * 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_second_moment_is_ignored_until_the_switch(dtype, rng):
    """Before the switch the update does not read exp_avg_sq (it is still averaged);
    from the first rectified step on it does."""
    n = 257
    p, m = random_array(rng, n, dtype), random_array(rng, n, dtype)
    v_small = random_array(rng, n, dtype, positive=True) * dtype(0.01)
    v_large = v_small * dtype(100)
    runs = [[p.copy(), m.copy(), v.copy()] for v in (v_small, v_large)]
    for t in range(1, 7):
        g = random_array(rng, n, dtype)
        for state in runs:
            fd.radam_step(state[0], g, state[1], state[2], step=t, lr=0.01)
        if t <= 5:
            assert_bitwise_equal(runs[0][0], runs[1][0], f"param after step {t}")
        else:
            assert not np.array_equal(runs[0][0], runs[1][0])
    assert not np.array_equal(runs[0][2], runs[1][2])


def test_where_the_switch_falls():
    """Never before step 6; at step 6 for the usual beta2; later as beta2 falls toward
    2/3; never at or below 2/3, where rho_inf <= 5."""
    for beta2 in (0.9, 0.99, 0.999, 0.9999):
        assert [rectified(t, beta2) for t in range(1, 8)] == [False] * 5 + [True] * 2
    first = next(t for t in range(1, 100) if rectified(t, 0.7))
    assert first > 6 and all(rectified(t, 0.7) for t in range(first, 200))
    for beta2 in (0.0, 0.5, 2 / 3):
        assert not any(rectified(t, beta2) for t in (1, 6, 100, 10**6))
