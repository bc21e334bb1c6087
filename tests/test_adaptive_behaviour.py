"""Adaptive rules: agreement with torch.optim, properties, and convergence on hard problems."""

import numpy as np
import pytest

import fastdescent as fd
from adaptive_configs import CONFIGS, used_state, take_step, make_state
from support import DTYPES, assert_bitwise_equal, random_array

# ----------------------------------------------------------------------------
# Agreement with PyTorch's for-loop implementations.

#: Every config PyTorch can express (it has no bias_correction switch; grad_scale
#: is applied to the gradients handed to torch).
TORCH_CONFIGS = [name for name, (_, options) in CONFIGS.items() if "bias_correction" not in options]
#: Tolerance: max |p_fd - p_torch| <= TORCH_EPS_FACTOR * eps(dtype) * max |p|. PyTorch
#: fuses lerp/addcmul/addcdiv into FMAs (and rounds its lerp weight in float32), so
#: the two differ by a few roundings per step. Measured over 10 steps: at most 12 eps
#: (40 random seeds, 1000 elements), 30 eps once at 10**4 elements (centered RMSprop
#: with alpha=0.3 and a small eps, where a tiny variance amplifies rounding).
TORCH_EPS_FACTOR = 64


def torch_optimizer(torch, face, params, lr, options):
    kinds = {fd.adagrad_step: torch.optim.Adagrad, fd.rmsprop_step: torch.optim.RMSprop,
             fd.adam_step: torch.optim.Adam, fd.adamw_step: torch.optim.AdamW}
    extra = {"initial_accumulator_value": 0.1} if face is fd.adagrad_step else {}
    return kinds[face](params, lr=lr, foreach=False, **options, **extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TORCH_CONFIGS)
def test_matches_torch_for_loop_path(name, dtype, rng):
    torch = pytest.importorskip("torch")
    face, options = CONFIGS[name]
    torch_options = {k: v for k, v in options.items() if k != "grad_scale"}
    scale = options.get("grad_scale", 1.0)
    n, steps = 1000, 10
    start = random_array(rng, n, dtype)
    grads = [random_array(rng, n, dtype) for _ in range(steps)]
    lrs = [0.05 * 0.8**t for t in range(steps)]
    # PyTorch's initial state: zeros, and Adagrad's sum at initial_accumulator_value.
    state = {"param": start.copy()}
    for key in used_state(face, options):
        state[key] = np.full(n, 0.1 if key == "state_sum" else 0.0, dtype)
    theirs = torch.tensor(start.copy(), requires_grad=True)
    optimizer = torch_optimizer(torch, face, [theirs], lrs[0], torch_options)
    for t, (grad, lr) in enumerate(zip(grads, lrs)):
        take_step(face, options, state, grad, lr=lr, step=t + 1)
        optimizer.param_groups[0]["lr"] = lr
        theirs.grad = torch.from_numpy(scale * grad)
        optimizer.step()
    expected = theirs.detach().numpy()
    bound = TORCH_EPS_FACTOR * np.finfo(dtype).eps * np.max(np.abs(expected))
    deviation = np.max(np.abs(state["param"] - expected))
    assert deviation <= bound, f"{deviation} > {bound}"
    assert np.max(np.abs(state["param"] - start)) > 1e3 * bound, "the steps barely moved"


# ----------------------------------------------------------------------------
# Properties that hold bit for bit.

PROPERTY_CONFIGS = ["adagrad-lr_decay-wd", "rmsprop-centered-momentum-wd", "adam-amsgrad", "adamw"]


def run_steps(face, options, state, grads, **call):
    state = {k: v.copy() for k, v in state.items()}
    for t, grad in enumerate(grads):
        take_step(face, options, state, grad, lr=0.02, step=t + 1, **call)
    return state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", PROPERTY_CONFIGS)
def test_grad_scale_and_maximize_act_on_the_gradient(name, dtype, rng):
    """grad_scale=s equals handing in s*g; maximize equals handing in -g."""
    face, options = CONFIGS[name]
    n, s = 257, 0.37
    state = make_state(rng, n, dtype, face, options)
    grads = [random_array(rng, n, dtype) for _ in range(4)]
    scaled = run_steps(face, dict(options, grad_scale=s), state, grads)
    prescaled = run_steps(face, options, state, [s * g for g in grads])
    climbed = run_steps(face, dict(options, maximize=True), state, grads)
    negated = run_steps(face, options, state, [-g for g in grads])
    for key in state:
        assert_bitwise_equal(scaled[key], prescaled[key], key)
        assert_bitwise_equal(climbed[key], negated[key], key)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_without_decay_is_adam(amsgrad, dtype, rng):
    n = 100
    state = make_state(rng, n, dtype, fd.adam_step, dict(amsgrad=amsgrad))
    grads = [random_array(rng, n, dtype) for _ in range(3)]
    adam = run_steps(fd.adam_step, dict(amsgrad=amsgrad), state, grads)
    adamw = run_steps(fd.adamw_step, dict(amsgrad=amsgrad, weight_decay=0.0), state, grads)
    for key in state:
        assert_bitwise_equal(adamw[key], adam[key], key)


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
    state = make_state(rng, n, dtype, fd.adam_step, {})
    grad = random_array(rng, n, dtype)
    take_step(fd.adam_step, dict(betas=(0.0, 0.99), grad_scale=0.5), state, grad, lr=0.01, step=4)
    assert_bitwise_equal(state["exp_avg"], dtype(0.5) * grad, "exp_avg")


@pytest.mark.parametrize("dtype", DTYPES)
def test_amsgrad_keeps_the_running_maximum(dtype, rng):
    n = 1000
    options = dict(amsgrad=True)
    state = make_state(rng, n, dtype, fd.adam_step, options)
    for t in range(1, 6):
        before = state["max_exp_avg_sq"].copy()
        take_step(fd.adam_step, options, state, random_array(rng, n, dtype, scale=t), lr=0.01, step=t)
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
    ams = run_steps(fd.adam_step, dict(amsgrad=True), state, grads)
    del state["max_exp_avg_sq"]
    adam = run_steps(fd.adam_step, {}, state, grads)
    assert_bitwise_equal(ams["max_exp_avg_sq"], ams["exp_avg_sq"], "max_exp_avg_sq")
    for key in adam:
        assert_bitwise_equal(ams[key], adam[key], key)


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


@pytest.mark.parametrize("face", [fd.adagrad_step, fd.rmsprop_step, fd.adam_step, fd.adamw_step])
def test_nd_arrays_are_updated_in_place(face, rng):
    shape = (2, 3, 4)
    p = random_array(rng, 24, np.float32).reshape(shape)
    g = random_array(rng, 24, np.float32).reshape(shape)
    state = {"param": p}
    for key in used_state(face, {}):
        state[key] = np.ones(shape, np.float32)
    before = p.copy()
    take_step(face, {}, state, g, lr=0.1, step=1)
    assert state["param"] is p and p.shape == shape
    assert np.all(p != before)


# ----------------------------------------------------------------------------
# Convergence on a badly conditioned quadratic and on the Rosenbrock function.

def rotated_quadratic(dim=10, condition=1000.0):
    """f(x) = (x - x*)' A (x - x*) / 2 with A's eigenvalues 1..condition, axes rotated
    away from the coordinates (so per-coordinate scaling alone cannot fix it)."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a = (q * np.geomspace(1.0, condition, dim)) @ q.T
    x_star = rng.standard_normal(dim)
    assert np.linalg.cond(a) >= 100

    def value(x):
        return 0.5 * (x - x_star) @ a @ (x - x_star)

    def gradient(x):
        return a @ (x - x_star)

    return value, gradient, x_star, np.full(dim, 2.0)


def rosenbrock():
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from the classic start (-1.2, 1); minimum at (1, 1)."""

    def value(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    def gradient(x):
        return np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])

    return value, gradient, np.array([1.0, 1.0]), np.array([-1.2, 1.0])


PROBLEMS = {"quadratic": rotated_quadratic, "rosenbrock": rosenbrock}
#: (problem, face, options, initial lr, steps, lr decay per step): hand-tuned, fixed.
RUNS = [
    ("quadratic", fd.adagrad_step, {}, 1.0, 4000, 1.0),
    ("rosenbrock", fd.adagrad_step, {}, 0.7, 10000, 1.0),
    ("quadratic", fd.rmsprop_step, {}, 0.05, 4000, 0.998),
    ("rosenbrock", fd.rmsprop_step, {}, 0.05, 5000, 0.998),
    ("quadratic", fd.rmsprop_step, dict(centered=True, momentum=0.9), 0.05, 4000, 0.998),
    ("rosenbrock", fd.rmsprop_step, dict(centered=True, momentum=0.9), 0.05, 4000, 0.998),
    ("quadratic", fd.adam_step, {}, 0.1, 3000, 1.0),
    ("rosenbrock", fd.adam_step, {}, 0.01, 5000, 1.0),
    ("quadratic", fd.adam_step, dict(amsgrad=True), 0.5, 3000, 1.0),
    ("rosenbrock", fd.adam_step, dict(amsgrad=True), 0.1, 3000, 1.0),
    ("quadratic", fd.adamw_step, dict(weight_decay=1e-4), 0.1, 3000, 1.0),
    ("rosenbrock", fd.adamw_step, dict(weight_decay=1e-4), 0.01, 5000, 1.0),
]


@pytest.mark.parametrize("problem, face, options, lr, steps, gamma", RUNS,
                         ids=[f"{r[0]}-{r[1].__name__}-{'-'.join(r[2]) or 'plain'}" for r in RUNS])
def test_drives_hard_problems_to_their_minimum(problem, face, options, lr, steps, gamma):
    value, gradient, x_star, start = PROBLEMS[problem]()
    state = {"param": start.copy()}
    for key in used_state(face, options):
        state[key] = np.zeros_like(start)
    for t in range(1, steps + 1):
        take_step(face, options, state, gradient(state["param"]), lr=lr * gamma**t, step=t)
    x = state["param"]
    assert np.linalg.norm(x - x_star) < 1e-2 * np.linalg.norm(start - x_star)
    assert value(x) - value(x_star) < 1e-4 * (value(start) - value(x_star))
