"""Adam, AdamW, Adagrad and RMSprop: properties that hold bit for bit, and single
steps against the equations written independently. (Every rule's grid, torch
agreement, bad input and convergence tests are derived from the specs:
test_rule_*.py.)"""

import numpy as np
import pytest

import fastdescent as fd
from fastdescent.catalog import configure
from fastdescent.rules import SPECS
from rule_cases import make_state, take_step
from support import DTYPES, assert_bitwise_equal, random_array


def adam(**options):
    return configure(SPECS["adam"], options)


def run_steps(rule, state, grads, **call):
    state = {k: v.copy() for k, v in state.items()}
    for t, grad in enumerate(grads, start=1):
        take_step(rule, state, grad, t=t, lr=0.02, **call)
    return state


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_without_decay_is_adam(amsgrad, dtype, rng):
    n = 100
    state = make_state(rng, adam(amsgrad=amsgrad), n, dtype)
    grads = [random_array(rng, n, dtype) for _ in range(3)]
    plain = run_steps(adam(amsgrad=amsgrad), state, grads)
    decoupled = run_steps(configure(SPECS["adamw"], dict(amsgrad=amsgrad, weight_decay=0.0)), state, grads)
    for key in state:
        assert_bitwise_equal(decoupled[key], plain[key], key)


def test_adamw_decay_is_decoupled_from_the_adaptive_scaling(rng):
    """With a zero gradient AdamW's decay is exactly p *= 1 - lr*wd; Adam's L2 term is
    rescaled like a gradient instead."""
    n, lr, wd = 50, 0.1, 0.2
    p = random_array(rng, n, np.float64)
    zeros = [np.zeros(n), np.zeros(n)]
    adamw = p.copy()
    fd.adamw_step(adamw, np.zeros(n), *[z.copy() for z in zeros], step=1, lr=lr, weight_decay=wd)
    np.testing.assert_array_equal(adamw, p * (1 - lr * wd))
    adam = p.copy()
    fd.adam_step(adam, np.zeros(n), *[z.copy() for z in zeros], step=1, lr=lr, weight_decay=wd, eps=0.0)
    # A first Adam step moves every coordinate by lr (to rounding), against sign(wd*p).
    np.testing.assert_allclose(adam, p - lr * np.sign(p), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_beta1_zero_makes_exp_avg_the_gradient(dtype, rng):
    """torch.lerp's second form is exact at weight 1: m becomes the gradient itself."""
    n = 300
    rule = adam(betas=(0.0, 0.99))
    state = make_state(rng, rule, n, dtype)
    grad = random_array(rng, n, dtype)
    take_step(rule, state, grad, t=4, lr=0.01, grad_scale=0.5)
    assert_bitwise_equal(state["exp_avg"], dtype(0.5) * grad, "exp_avg")


@pytest.mark.parametrize("dtype", DTYPES)
def test_amsgrad_keeps_the_running_maximum(dtype, rng):
    n = 1000
    rule = adam(amsgrad=True)
    state = make_state(rng, rule, n, dtype)
    for t in range(1, 6):
        before = state["max_exp_avg_sq"].copy()
        take_step(rule, state, random_array(rng, n, dtype, scale=t), t=t, lr=0.01)
        assert_bitwise_equal(state["max_exp_avg_sq"], np.maximum(before, state["exp_avg_sq"]), "max")
    raised = state["max_exp_avg_sq"] > state["exp_avg_sq"]
    assert 0 < raised.sum() < n, "both branches of the maximum should occur"


@pytest.mark.parametrize("dtype", DTYPES)
def test_amsgrad_equals_adam_while_the_second_moment_grows(dtype, rng):
    n = 200
    direction = random_array(rng, n, dtype)
    grads = [direction * dtype(2.0**t) for t in range(5)]  # every |g| grows, so v does
    state = {"param": random_array(rng, n, dtype), "exp_avg": np.zeros(n, dtype),
             "exp_avg_sq": np.zeros(n, dtype), "max_exp_avg_sq": np.zeros(n, dtype)}
    ams = run_steps(adam(amsgrad=True), state, grads)
    del state["max_exp_avg_sq"]
    plain = run_steps(adam(), state, grads)
    assert_bitwise_equal(ams["max_exp_avg_sq"], ams["exp_avg_sq"], "max_exp_avg_sq")
    for key in plain:
        assert_bitwise_equal(ams[key], plain[key], key)


# ----------------------------------------------------------------------------
# Single steps against the equations, written independently in float64 (atol: the
# results may cancel to near zero).

def test_adagrad_step_by_hand(rng):
    n, lr, lr_decay, wd, eps, step = 20, 0.3, 0.1, 0.05, 1e-3, 4
    p0, g = rng.standard_normal(n), rng.standard_normal(n)
    s0 = np.exp(rng.standard_normal(n))
    p, s = p0.copy(), s0.copy()
    fd.adagrad_step(p, g, s, step=step, lr=lr, lr_decay=lr_decay, weight_decay=wd, eps=eps)
    d = g + wd * p0
    np.testing.assert_allclose(s, s0 + d**2, rtol=1e-14, atol=1e-14)
    clr = lr / (1 + (step - 1) * lr_decay)
    np.testing.assert_allclose(p, p0 - clr * d / (np.sqrt(s0 + d**2) + eps), rtol=1e-14, atol=1e-14)


def test_adagrad_first_step_from_zero_moves_by_lr(rng):
    p0, g = rng.standard_normal(64), rng.standard_normal(64)
    p = p0.copy()
    fd.adagrad_step(p, g, np.zeros(64), step=1, lr=0.25, eps=0.0)
    np.testing.assert_allclose(p, p0 - 0.25 * np.sign(g), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_rmsprop_step_by_hand(centered, momentum, rng):
    n, lr, alpha, eps = 20, 0.01, 0.9, 1e-6
    p0, g = rng.standard_normal(n), rng.standard_normal(n)
    a0 = 0.1 * rng.standard_normal(n)
    v0 = a0**2 + np.exp(rng.standard_normal(n))
    b0 = rng.standard_normal(n)
    p, v, a, b = p0.copy(), v0.copy(), a0.copy(), b0.copy()
    fd.rmsprop_step(p, g, v, b if momentum else None, a if centered else None,
                    lr=lr, alpha=alpha, eps=eps, momentum=momentum, centered=centered)
    v1 = alpha * v0 + (1 - alpha) * g**2
    a1 = alpha * a0 + (1 - alpha) * g
    sigma = np.sqrt(v1 - a1**2 if centered else v1) + eps
    np.testing.assert_allclose(v, v1, rtol=1e-14, atol=1e-14)
    if centered:
        np.testing.assert_allclose(a, a1, rtol=1e-13, atol=1e-14)
    if momentum:
        b1 = momentum * b0 + g / sigma
        np.testing.assert_allclose(b, b1, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(p, p0 - lr * b1, rtol=1e-13, atol=1e-14)
    else:
        np.testing.assert_allclose(p, p0 - lr * g / sigma, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("step", [1, 7])
def test_adam_step_by_hand(step, bias_correction, rng):
    n, lr, b1, b2, eps, wd = 20, 0.01, 0.8, 0.95, 1e-4, 0.03
    p0, g = rng.standard_normal(n), rng.standard_normal(n)
    m0, v0 = 0.1 * rng.standard_normal(n), np.exp(rng.standard_normal(n))
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    fd.adam_step(p, g, m, v, step=step, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                 bias_correction=bias_correction)
    d = g + wd * p0
    m1, v1 = b1 * m0 + (1 - b1) * d, b2 * v0 + (1 - b2) * d**2
    if bias_correction:
        m_hat, v_hat = m1 / (1 - b1**step), v1 / (1 - b2**step)
    else:
        m_hat, v_hat = m1, v1
    np.testing.assert_allclose(m, m1, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(v, v1, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(p, p0 - lr * m_hat / (np.sqrt(v_hat) + eps), rtol=1e-13, atol=1e-14)
