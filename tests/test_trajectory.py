from functools import partial

import numpy as np
import pytest

from fastdescent import SGD, Adam
from fastdescent.demo import surfaces
from fastdescent.demo.trajectory import run_trajectory


def manual_gradient_descent(surface, start, lr, steps):
    w = np.array(start, dtype=np.float64)
    path = [w.copy()]
    for _ in range(steps):
        w = w - lr * surface.gradient(w)
        path.append(w)
    return np.array(path)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_records_the_path_the_optimizer_takes(backend):
    surface = surfaces.BEALE
    run = run_trajectory(surface, partial(SGD, lr=0.01, backend=backend), tol=0.0, max_steps=25)
    assert run.stop == "budget" and run.steps == 25 and run.path.shape == (26, 2)
    np.testing.assert_allclose(run.path, manual_gradient_descent(surface, surface.start, 0.01, 25), rtol=1e-14)
    np.testing.assert_allclose(run.values, surface.value(run.path), rtol=1e-15)
    np.testing.assert_allclose(run.grad_norms, np.linalg.norm(surface.gradient(run.path), axis=1), rtol=1e-15)
    assert run.values[-1] < run.values[0]


def test_any_optimizer_any_backend_traces_the_same_path_bit_for_bit():
    surface = surfaces.ROSENBROCK
    runs = [run_trajectory(surface, partial(Adam, lr=0.02, backend=backend), tol=0.0, max_steps=300,
                           schedule=lambda t: 0.02 / (1 + 0.01 * t)) for backend in ("kernel", "reference")]
    np.testing.assert_array_equal(runs[0].path, runs[1].path)
    assert runs[0].values[-1] < 0.5 * runs[0].values[0]


def test_stops_at_the_gradient_tolerance():
    surface = surfaces.RAVINE
    run = run_trajectory(surface, partial(SGD, lr=0.015), tol=1e-4, max_steps=10_000)
    assert run.converged and run.grad_norms[-1] <= 1e-4 < run.grad_norms[-2]
    assert run.steps < 10_000
    # a start that is already a minimum stops at once
    assert run_trajectory(surface, partial(SGD, lr=0.01), start=surface.minima[0]).steps == 0


def test_schedule_sets_the_learning_rate_of_each_step():
    seen = []

    class Spy(SGD):
        def step(self, grads):
            seen.append(self.param_groups[0]["lr"])
            super().step(grads)

    surface = surfaces.ROSENBROCK
    schedule = lambda t: 1e-3 * 0.9**t  # noqa: E731
    run = run_trajectory(surface, partial(Spy, lr=123.0), schedule=schedule, tol=0.0, max_steps=12)
    np.testing.assert_allclose(seen, [schedule(t) for t in range(12)])
    w, path = surface.start.copy(), [surface.start.copy()]
    for t in range(12):
        w = w - schedule(t) * surface.gradient(w)
        path.append(w)
    np.testing.assert_allclose(run.path, path, rtol=1e-14)


def test_leaving_the_bounds_or_overflowing_stops_the_run():
    surface = surfaces.SADDLE
    run = run_trajectory(surface, partial(SGD, lr=0.1), bounds=[(-3, 3), (-3, 3)], max_steps=10_000)
    assert run.stop == "left bounds" and abs(run.final_point[1]) > 3 and run.escaped(surface)
    run = run_trajectory(surface, partial(SGD, lr=0.1), max_steps=10_000)
    assert run.stop == "diverged" and run.escaped(surface)
    stuck = run_trajectory(surface, partial(SGD, lr=0.1), start=[1.0, 0.0], tol=1e-8)
    assert stuck.converged and not stuck.escaped(surface)  # converged, but to the saddle
    assert run_trajectory(surfaces.BEALE, partial(SGD, lr=0.1), max_steps=3).escaped(surfaces.BEALE) is None


def test_float32_parameters():
    run = run_trajectory(surfaces.HIMMELBLAU, partial(SGD, lr=0.01), dtype=np.float32, tol=1e-3)
    assert run.converged and run.path.dtype == np.float64
    np.testing.assert_allclose(run.final_point, [3.584428, -1.848126], atol=1e-3)


def test_bad_budget_or_tolerance():
    with pytest.raises(ValueError, match="max_steps"):
        run_trajectory(surfaces.BEALE, partial(SGD, lr=0.1), max_steps=-1)
    with pytest.raises(ValueError, match="tol"):
        run_trajectory(surfaces.BEALE, partial(SGD, lr=0.1), tol=-1.0)
