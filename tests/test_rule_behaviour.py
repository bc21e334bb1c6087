"""Every rule, derived from its spec: agreement with its torch.optim peer's for-loop
implementation, and convergence on a badly conditioned quadratic and on Rosenbrock."""

import math

import numpy as np
import pytest

from fastdescent.catalog import configure
from fastdescent.rules import SPECS
from rule_cases import (EXAMPLES, for_loop, grid_shapes, initial_state, rule_shape, take_step, torch_as_fastdescent,
                        torch_examples)
from support import DTYPES, random_array, random_like

# ----------------------------------------------------------------------------
# Agreement with PyTorch's for-loop implementations.

#: Tolerance: max |p_fd - p_torch| <= TORCH_EPS_FACTOR * eps(dtype) * max |p|. PyTorch
#: fuses lerp/addcmul/addcdiv into FMAs (and rounds its lerp weight in float32), so
#: the two differ by a few roundings per step. Measured over 10 steps: at most 12 eps
#: (40 random seeds, 1000 elements), 30 eps once at 10**4 elements (centered RMSprop
#: with alpha=0.3 and a small eps, where a tiny variance amplifies rounding).
TORCH_EPS_FACTOR = 64
#: The first learning rate of the agreement runs (0.05 unless given here), so that
#: every rule moves the parameters far beyond the bound. Adadelta's steps start at
#: about lr * sqrt(eps) per coordinate (its averages start at zero).
FIRST_LR = {"adadelta": 20.0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(torch_examples()))
def test_matches_torch_for_loop_path(name, dtype, rng):
    torch = pytest.importorskip("torch")
    rule = EXAMPLES[name]
    peer, options = rule.torch_peer
    steps, scale = 10, 0.5
    lrs = [FIRST_LR.get(rule.spec.name, 0.05) * 0.8**t for t in range(steps)]
    peer = getattr(torch.optim, peer)
    for shape in grid_shapes(rule.spec, 1000):
        start = random_array(rng, math.prod(shape), dtype).reshape(shape)
        grads = [random_like(rng, start) for _ in range(steps)]
        state = initial_state(rule, start.copy(), lr=lrs[0])  # PyTorch's initial state
        theirs = torch.tensor(start.copy(), requires_grad=True)
        optimizer = peer([theirs], **{**options, "lr": lrs[0]}, **for_loop(peer))
        for t, (grad, lr) in enumerate(zip(grads, lrs), start=1):
            take_step(rule, state, grad, t=t, lr=lr, grad_scale=scale)
            optimizer.param_groups[0]["lr"] = lr
            theirs.grad = torch.from_numpy(scale * grad)
            with torch_as_fastdescent(torch):
                optimizer.step()
        expected = theirs.detach().numpy()
        bound = TORCH_EPS_FACTOR * np.finfo(dtype).eps * np.max(np.abs(expected))
        deviation = np.max(np.abs(state["param"] - expected))
        assert deviation <= bound, f"{shape}: {deviation} > {bound}"
        # (Muon's normalized steps move each of a matrix's ~1000 elements by ~lr / 30)
        assert np.max(np.abs(state["param"] - start)) > 1e2 * bound, f"{shape}: the steps barely moved"


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


def matrix_quadratic():
    """The rotated quadratic in 20 dimensions, its variable a 4 x 5 matrix (for a rule
    whose update depends on the shape: Adafactor factors it)."""
    value, gradient, x_star, start = rotated_quadratic(dim=20, condition=100.0)
    shape = (4, 5)
    return (lambda x: value(x.reshape(-1))), (lambda x: gradient(x.reshape(-1)).reshape(shape)), \
        x_star.reshape(shape), start.reshape(shape)


PROBLEMS = {"quadratic": rotated_quadratic, "rosenbrock": rosenbrock, "matrix-quadratic": matrix_quadratic}
#: (problem, example, options, initial lr, steps, lr decay per step): hand-tuned,
#: fixed. Every rule must appear (test_every_rule_has_convergence_runs).
RUNS = [
    ("quadratic", "sgd_momentum", dict(momentum=0.9), 1e-3, 4000, 1.0),
    ("rosenbrock", "nesterov", dict(momentum=0.9, nesterov=True), 1e-3, 8000, 1.0),
    ("quadratic", "adagrad", {}, 1.0, 4000, 1.0),
    ("rosenbrock", "adagrad", {}, 0.7, 10000, 1.0),
    ("quadratic", "rmsprop", {}, 0.05, 4000, 0.998),
    ("rosenbrock", "rmsprop", {}, 0.05, 5000, 0.998),
    ("quadratic", "rmsprop", dict(centered=True, momentum=0.9), 0.05, 4000, 0.998),
    ("rosenbrock", "rmsprop", dict(centered=True, momentum=0.9), 0.05, 4000, 0.998),
    ("quadratic", "adam", {}, 0.1, 3000, 1.0),
    ("rosenbrock", "adam", {}, 0.01, 5000, 1.0),
    ("quadratic", "adam", dict(amsgrad=True), 0.5, 3000, 1.0),
    ("rosenbrock", "adam", dict(amsgrad=True), 0.1, 3000, 1.0),
    ("quadratic", "adamw", dict(weight_decay=1e-4), 0.1, 3000, 1.0),
    ("rosenbrock", "adamw", dict(weight_decay=1e-4), 0.01, 5000, 1.0),
    ("quadratic", "adafactor", {}, 0.05, 3000, 0.999),
    ("rosenbrock", "adafactor", {}, 0.1, 8000, 0.999),
    ("matrix-quadratic", "adafactor", {}, 0.05, 3000, 0.999),
    ("matrix-quadratic", "adafactor", dict(beta2_decay=-0.5), 0.1, 8000, 0.999),
    # Lion moves every coordinate by lr: it needs a decaying rate to settle.
    ("quadratic", "lion", {}, 0.02, 3000, 0.998),
    ("rosenbrock", "lion", {}, 0.003, 5000, 0.999),
    # Schedule-Free's x averages every z so far: warmup (which weighs the first steps
    # less) or a polynomial weighting r forgets the start sooner.
    ("quadratic", "schedule_free_adamw", dict(warmup_steps=100), 0.3, 3000, 1.0),
    ("rosenbrock", "schedule_free_adamw", {}, 0.03, 6000, 1.0),
    ("quadratic", "schedule_free_sgd", dict(r=1.0), 1e-3, 4000, 1.0),
    ("rosenbrock", "schedule_free_sgd", dict(r=1.0, momentum=0.95), 1.5e-3, 10000, 1.0),
    ("quadratic", "adamax", {}, 0.1, 3000, 1.0),
    ("rosenbrock", "adamax", {}, 0.01, 5000, 1.0),
    ("quadratic", "nadam", {}, 0.1, 3000, 0.999),
    ("rosenbrock", "nadam", {}, 0.01, 5000, 1.0),
    ("quadratic", "nadam", dict(decoupled_weight_decay=True, weight_decay=1e-4), 0.1, 3000, 0.999),
    # RAdam's first five steps are momentum SGD, stable only below 2 / (largest
    # curvature) = 2e-3 on the quadratic: a small rate that then rises.
    ("quadratic", "radam", {}, 1.5e-3, 4000, 1.0015),
    ("rosenbrock", "radam", {}, 1.4e-3, 10000, 1.0),
    ("quadratic", "adadelta", {}, 10.0, 4000, 0.999),
    ("rosenbrock", "adadelta", {}, 10.0, 10000, 0.9995),
    ("quadratic", "rprop", {}, 0.01, 1500, 1.0),
    ("rosenbrock", "rprop", {}, 0.01, 4000, 1.0),
    ("quadratic", "asgd", {}, 1.5e-3, 5000, 1.0),
    ("rosenbrock", "asgd", {}, 1.5e-3, 10000, 1.0),
    ("quadratic", "muon", dict(weight_decay=0.0), 0.1, 2000, 0.997),  # a 2 x 5 matrix
    ("rosenbrock", "muon", dict(weight_decay=0.0), 0.05, 3000, 0.998),  # a 1 x 2 matrix: normalized steps
]


def test_every_rule_has_convergence_runs():
    covered = {EXAMPLES[run[1]].spec.name for run in RUNS}
    assert covered == set(SPECS), f"add RUNS for {sorted(set(SPECS) - covered)}"


@pytest.mark.parametrize("problem, name, options, lr, steps, gamma", RUNS,
                         ids=[f"{r[0]}-{r[1]}-{'-'.join(r[2]) or 'plain'}" for r in RUNS])
def test_drives_hard_problems_to_their_minimum(problem, name, options, lr, steps, gamma):
    value, gradient, x_star, start = PROBLEMS[problem]()
    rule = configure(EXAMPLES[name].spec, options)
    shape = rule_shape(rule.spec, start.shape)  # Muon's: a matrix of the coordinates
    state = initial_state(rule, start.copy().reshape(shape), lr=lr * gamma)
    for t in range(1, steps + 1):
        take_step(rule, state, gradient(state["param"].reshape(start.shape)).reshape(shape), t=t, lr=lr * gamma**t)
    x = state["param"].reshape(start.shape)
    assert np.linalg.norm(x - x_star) < 1e-2 * np.linalg.norm(start - x_star)
    assert value(x) - value(x_star) < 1e-4 * (value(start) - value(x_star))
