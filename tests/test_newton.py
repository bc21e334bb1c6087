import numpy as np
import pytest

import fastdescent
from fastdescent.demo import surfaces
from fastdescent.demo.newton import lookahead_nesterov, lookahead_nesterov_step, newton, newton_step
from fastdescent.demo.surfaces import Quadratic


def random_quadratic(rng, dim):
    """Random axes, curvatures from 1 to 1000: positive definite and badly conditioned."""
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    matrix = rotation @ np.diag(np.geomspace(1.0, 1e3, dim)) @ rotation.T
    return Quadratic((matrix + matrix.T) / 2, center=rng.standard_normal(dim), start=rng.standard_normal(dim) * 5)


@pytest.mark.parametrize("dim", [2, 5, 20])
def test_newton_solves_a_quadratic_in_one_step(dim, rng):
    surface = random_quadratic(rng, dim)
    run = newton(surface, tol=1e-8 * np.linalg.norm(surface.matrix))
    assert run.converged and run.steps == 1 and run.fallbacks == 0
    np.testing.assert_allclose(run.final_point, surface.center, atol=1e-9)
    step = newton_step(surface, surface.start)
    assert step.direction == "newton" and step.step_size == 1.0


def test_newton_never_forms_an_inverse(rng, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("np.linalg.inv was called")

    monkeypatch.setattr(np.linalg, "inv", forbidden)
    monkeypatch.setattr(np.linalg, "pinv", forbidden)
    assert newton(random_quadratic(rng, 4)).converged


def test_indefinite_hessian_falls_back_to_a_gradient_step_and_says_so():
    surface = surfaces.SADDLE
    x = np.array([0.7, 0.2])
    step = newton_step(surface, x)
    assert step.direction == "gradient"
    assert surface.value(step.point) < surface.value(x)
    # pure Newton would have jumped onto the saddle point (0, 0); the fallback moves away from it
    assert abs(step.point[1]) > abs(x[1])
    run = newton(surface, bounds=[(-5, 5), (-5, 5)])
    assert run.stop == "left bounds" and run.fallbacks == run.steps > 0
    assert run.escaped(surface)


def test_newton_from_a_local_maximum_region_reaches_a_minimum_of_himmelblau():
    surface = surfaces.HIMMELBLAU
    start = np.array([-0.2, -0.8])  # near the local maximum: Hessian negative definite
    assert np.all(np.linalg.eigvalsh(surface.hessian(start)) < 0)
    run = newton(surface, start, tol=1e-10)
    assert run.converged and run.fallbacks >= 1
    assert np.min(np.linalg.norm(surface.minima - run.final_point, axis=1)) < 1e-8


@pytest.mark.parametrize("name", ["rosenbrock", "beale", "ravine"])
def test_damped_newton_decreases_f_every_step_and_converges(name):
    surface = surfaces.SURFACES[name]
    run = newton(surface, tol=1e-9)
    assert run.converged and run.steps < 100
    assert np.all(np.diff(run.values) < 0)
    np.testing.assert_allclose(run.final_point, surface.minima[0], atol=1e-6)


def test_levenberg_damping_makes_the_step_a_newton_step_and_shortens_it():
    surface = surfaces.SADDLE
    x = np.array([0.7, 0.2])
    step = newton_step(surface, x, damping=3.0)  # H + 3I = diag(5, 1) is positive definite
    assert step.direction == "newton"
    expected_direction = -surface.gradient(x) / np.array([5.0, 1.0])
    np.testing.assert_allclose(step.point, x + step.step_size * expected_direction, rtol=1e-15)
    with pytest.raises(ValueError, match="damping"):
        newton_step(surface, x, damping=-1.0)


def test_lookahead_step_takes_the_gradient_at_the_lookahead_point(rng):
    w, v = rng.standard_normal(3), rng.standard_normal(3)
    seen = []

    def gradient(point):
        seen.append(point.copy())
        return 2.0 * point

    w0, v0 = w.copy(), v.copy()
    lookahead_nesterov_step(w, v, gradient, lr=0.1, momentum=0.8)
    np.testing.assert_allclose(seen[0], w0 + 0.8 * v0)
    np.testing.assert_allclose(v, 0.8 * v0 - 0.1 * 2.0 * (w0 + 0.8 * v0))
    np.testing.assert_allclose(w, w0 + v)


def kernel_nesterov_path(surface, start, lr, momentum, steps, convention, backend):
    """The iterates of sgd_step(nesterov=True): one gradient per step, no look-ahead."""
    theta = np.array(start, dtype=np.float64)
    buffer = np.zeros_like(theta)
    path = [theta.copy()]
    for t in range(steps):
        extra = {"first_step": t == 0} if convention == "pytorch" else {}
        fastdescent.sgd_step(theta, surface.gradient(theta), buffer, lr=lr, momentum=momentum,
                             nesterov=True, convention=convention, backend=backend, **extra)
        path.append(theta.copy())
    return np.array(path)


@pytest.mark.parametrize("convention", ["pytorch", "classical"])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("name, lr", [("ravine", 0.02), ("rosenbrock", 2e-4), ("beale", 1e-3), ("himmelblau", 3e-3)])
def test_lookahead_and_lookahead_free_nesterov_trace_the_same_path(name, lr, convention, backend, rng):
    surface = surfaces.SURFACES[name]
    start = surface.start + 0.1 * rng.standard_normal(2)
    momentum, steps = 0.9, 150
    lookahead = lookahead_nesterov(surface, start, lr=lr, momentum=momentum, tol=0.0, max_steps=steps)
    kernel = kernel_nesterov_path(surface, start, lr, momentum, steps, convention, backend)
    assert lookahead.steps == steps
    assert np.linalg.norm(kernel[-1] - kernel[0]) > 0.1  # it really moved
    np.testing.assert_allclose(lookahead.extras["lookahead"], kernel, rtol=1e-9, atol=1e-12)
    # ... and w_t itself is a different sequence with the same limit behaviour
    assert not np.allclose(lookahead.path, kernel)
