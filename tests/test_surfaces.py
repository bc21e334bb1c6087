import numpy as np
import pytest

from fastdescent.demo import surfaces
from fastdescent.demo.surfaces import SURFACES, Quadratic, Rastrigin, Rosenbrock

EXTRA = {
    "rosenbrock_5d": Rosenbrock(dim=5),
    "rastrigin_3d": Rastrigin(dim=3),
    "quadratic_4d": Quadratic(np.array([[4.0, 1.0, 0.0, 0.5], [1.0, 3.0, 0.2, 0.0],
                                        [0.0, 0.2, 2.0, 0.1], [0.5, 0.0, 0.1, 1.0]]),
                              center=[0.3, -1.0, 2.0, 0.5]),
}
ALL = {**SURFACES, **EXTRA}


def random_points(surface, rng, shape):
    """Points spread over the surface's window (and [-2, 2] in further coordinates)."""
    lows = [lo for lo, _ in surface.window] + [-2.0] * (surface.dim - 2)
    highs = [hi for _, hi in surface.window] + [2.0] * (surface.dim - 2)
    return rng.uniform(lows, highs, size=shape + (surface.dim,))


def central_difference(f, x, h):
    """d f / d x_j for every coordinate j, stacked on a new last axis."""
    columns = []
    for j in range(x.shape[-1]):
        step = np.zeros(x.shape[-1])
        step[j] = h
        columns.append((f(x + step) - f(x - step)) / (2 * h))
    return np.stack(columns, axis=-1)


@pytest.mark.parametrize("name", ALL)
def test_shapes_are_vectorized(name, rng):
    surface = ALL[name]
    x = random_points(surface, rng, (3, 4))
    assert surface.value(x).shape == (3, 4)
    assert surface.gradient(x).shape == (3, 4, surface.dim)
    assert surface.hessian(x).shape == (3, 4, surface.dim, surface.dim)
    # one point at a time gives the same numbers as the batch
    np.testing.assert_allclose(surface.gradient(x[1, 2]), surface.gradient(x)[1, 2], rtol=1e-15)
    np.testing.assert_allclose(surface.hessian(x[2, 3]), surface.hessian(x)[2, 3], rtol=1e-15)
    assert np.ndim(surface.value(x[0, 0])) == 0


@pytest.mark.parametrize("name", ALL)
def test_gradient_matches_finite_differences(name, rng):
    surface = ALL[name]
    x = random_points(surface, rng, (50,))
    numeric = central_difference(surface.value, x, 1e-6)
    exact = surface.gradient(x)
    scale = np.maximum(1.0, np.abs(exact))
    np.testing.assert_allclose(numeric / scale, exact / scale, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_hessian_matches_finite_differences_and_is_symmetric(name, rng):
    surface = ALL[name]
    x = random_points(surface, rng, (50,))
    numeric = central_difference(surface.gradient, x, 1e-6)  # [..., i, j] = d g_i / d x_j
    exact = surface.hessian(x)
    np.testing.assert_array_equal(exact, np.swapaxes(exact, -1, -2))
    scale = np.maximum(1.0, np.abs(exact))
    np.testing.assert_allclose(numeric / scale, exact / scale, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_minima_are_strict_local_minima_with_the_stated_value(name):
    surface = ALL[name]
    if surface.minimum_value is None:
        assert len(surface.minima) == 0
        return
    assert len(surface.minima) >= 1
    np.testing.assert_allclose(surface.value(surface.minima), surface.minimum_value, atol=1e-12)
    np.testing.assert_allclose(surface.gradient(surface.minima), 0.0, atol=1e-10)
    assert np.all(np.linalg.eigvalsh(surface.hessian(surface.minima)) > 0)


@pytest.mark.parametrize("name", [n for n in SURFACES if SURFACES[n].minimum_value is not None])
def test_nothing_on_the_grid_is_below_the_minimum(name):
    surface = SURFACES[name]
    _, _, z = surface.grid(300)
    assert z.min() >= surface.minimum_value - 1e-12


def test_minima_where_the_literature_puts_them():
    np.testing.assert_array_equal(surfaces.ROSENBROCK.minima, [[1.0, 1.0]])
    np.testing.assert_array_equal(Rosenbrock(dim=6).minima, [np.ones(6)])
    np.testing.assert_array_equal(surfaces.BEALE.minima, [[3.0, 0.5]])
    np.testing.assert_array_equal(surfaces.RASTRIGIN.minima, [[0.0, 0.0]])
    # Himmelblau (1972): (3, 2), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)
    literature = [(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)]
    np.testing.assert_allclose(surfaces.HIMMELBLAU.minima, literature, atol=1e-6)
    np.testing.assert_allclose(surfaces.RAVINE.minima, [[0.0, 0.0]])


def test_ravine_has_the_requested_condition_number():
    eigenvalues = np.linalg.eigvalsh(Quadratic.ravine(condition=80.0).hessian([0.3, 0.1]))
    np.testing.assert_allclose(eigenvalues, [1.0, 80.0])


@pytest.mark.parametrize("name", ["saddle", "monkey_saddle"])
def test_saddles_are_stationary_and_not_minima(name, rng):
    surface = SURFACES[name]
    (saddle,) = surface.saddles
    np.testing.assert_array_equal(surface.gradient(saddle), 0.0)
    # lower values arbitrarily close to the saddle
    near = saddle + 1e-3 * rng.standard_normal((200, 2))
    assert np.any(surface.value(near) < surface.value(saddle))
    assert np.any(surface.value(near) > surface.value(saddle))


def test_monkey_saddle_is_degenerate_and_plain_saddle_is_not():
    np.testing.assert_array_equal(surfaces.MONKEY_SADDLE.hessian([0.0, 0.0]), 0.0)
    np.testing.assert_array_equal(np.linalg.eigvalsh(surfaces.SADDLE.hessian([0.0, 0.0])), [-2.0, 2.0])


def test_rastrigin_has_local_minima_off_the_origin():
    # a gradient-free check: a local minimum near (1, 1) is lower than its neighbours
    surface = surfaces.RASTRIGIN
    xs, ys, z = surface.grid(513)
    i, j = np.unravel_index(np.argmin(np.where((np.abs(xs - 1) < 0.3) & (np.abs(ys - 1) < 0.3), z, np.inf)), z.shape)
    assert 1 < i < 512 and 1 < j < 512
    assert z[i, j] > 1.0  # not the global minimum
    assert z[i, j] < z[i - 1:i + 2, j - 1:j + 2].ravel()[[0, 1, 2, 3, 5, 6, 7, 8]].min()


def test_bad_points_are_rejected():
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        surfaces.BEALE.value(np.ones((4, 3)))
    with pytest.raises(ValueError):
        surfaces.ROSENBROCK.gradient(1.0)
    with pytest.raises(ValueError, match="positive definite"):
        Quadratic([[1.0, 0.0], [0.0, -1.0]])
