import numpy as np
import pytest

import fastdescent as fd
from support import DTYPES, SIZES, THREADS, assert_unchanged, check_backends_agree, random_array, snapshot

CONFIGS = {
    "plain": dict(),
    "plain-wd-maximize": dict(weight_decay=0.05, maximize=True),
    "plain-grad-scale": dict(grad_scale=0.37),
    "momentum": dict(momentum=0.9),
    "momentum-dampening-wd": dict(momentum=0.85, dampening=0.3, weight_decay=0.01),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "nesterov-wd-maximize-scale": dict(momentum=0.7, nesterov=True, weight_decay=0.02, maximize=True, grad_scale=2.5),
    "classical": dict(momentum=0.9, convention="classical"),
    "classical-nesterov-wd": dict(momentum=0.6, convention="classical", nesterov=True, weight_decay=0.03),
}
STEPS = 10


def sgd_driver(config):
    def step(backend, state, grad, lr, t, n_threads):
        kwargs = dict(config)
        if kwargs.get("momentum") and kwargs.get("convention", "pytorch") == "pytorch":
            kwargs["first_step"] = t == 0
        fd.sgd_step(state["param"], grad, state.get("momentum_buffer"), lr=lr,
                    n_threads=n_threads, backend=backend, **kwargs)
    return step


def make_state(rng, n, dtype, config):
    state = {"param": random_array(rng, n, dtype)}
    if config.get("momentum"):
        state["momentum_buffer"] = random_array(rng, n, dtype, scale=0.1)
    return state


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_matches_reference(name, dtype, n, n_threads, rng, kernel_variant):
    config = CONFIGS[name]
    grads = [random_array(rng, n, dtype) for _ in range(STEPS)]
    lrs = [0.05 * 0.8**t for t in range(STEPS)]  # the rate changes every step
    state = make_state(rng, n, dtype, config)
    final = check_backends_agree(sgd_driver(config), state, grads, lrs, n_threads)
    if n:
        assert not np.array_equal(final["param"], state["param"]), "the steps changed nothing"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["plain", "momentum-dampening-wd", "classical-nesterov-wd"])
def test_multi_tensor_matches_per_array(name, dtype, rng, tiny_parts):
    """Lists of mixed sizes, split among 2 threads at arbitrary points, equal per-array steps."""
    config = CONFIGS[name]
    sizes = [0, 1, 130, 7, 0, 4097, 65, 3000, 1]
    states = [make_state(rng, n, dtype, config) for n in sizes]
    grads = [random_array(rng, n, dtype) for n in sizes]
    together = [{k: v.copy() for k, v in s.items()} for s in states]
    alone = [{k: v.copy() for k, v in s.items()} for s in states]
    bufs = [s["momentum_buffer"] for s in together] if config.get("momentum") else None
    first = {"first_step": True} if "dampening" in config else {}
    fd.sgd_step([s["param"] for s in together], grads, bufs, lr=0.1, n_threads=2, **config, **first)
    for s, g in zip(alone, grads):
        fd.sgd_step(s["param"], g, s.get("momentum_buffer"), lr=0.1, n_threads=1, **config, **first)
    for a, b in zip(together, alone):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


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


def test_nd_arrays_are_updated_in_place(rng):
    p = random_array(rng, 24, np.float32).reshape(2, 3, 4)
    g = random_array(rng, 24, np.float32).reshape(2, 3, 4)
    expected = p - np.float32(0.1) * g
    view = p
    fd.sgd_step(p, g, lr=0.1)
    assert view is p
    np.testing.assert_array_equal(p, expected)


def bad_calls(rng):
    """(description, exception, call) for every kind of bad input."""
    p = random_array(rng, 10, np.float32)
    g = random_array(rng, 10, np.float32)
    b = random_array(rng, 10, np.float32)
    ro = p.copy()
    ro.flags.writeable = False
    arrays = (p, g, b, ro)
    ok = dict(lr=0.1, momentum=0.9)
    cases = [
        ("float64 grad", TypeError, lambda: fd.sgd_step(p, g.astype(np.float64), b, **ok)),
        ("float16 param", TypeError, lambda: fd.sgd_step(p.astype(np.float16), g.astype(np.float16), lr=0.1)),
        ("int param", TypeError, lambda: fd.sgd_step(np.arange(10), np.arange(10), lr=0.1)),
        ("complex", TypeError, lambda: fd.sgd_step(p.astype(np.complex64), g.astype(np.complex64), lr=0.1)),
        ("list grad", TypeError, lambda: fd.sgd_step(p, list(g), lr=0.1)),
        ("shape", ValueError, lambda: fd.sgd_step(p, g[:9], b, **ok)),
        ("2-D vs 1-D", ValueError, lambda: fd.sgd_step(p, g.reshape(2, 5), b, **ok)),
        ("non-contiguous", ValueError, lambda: fd.sgd_step(p, np.repeat(g, 2)[::2], b, **ok)),
        ("read-only param", ValueError, lambda: fd.sgd_step(ro, g, lr=0.1)),
        ("read-only buffer", ValueError, lambda: fd.sgd_step(p, g, ro, **ok)),
        ("grad is param", ValueError, lambda: fd.sgd_step(p, p, b, **ok)),
        ("grad overlaps buffer", ValueError, lambda: fd.sgd_step(p, b, b, **ok)),
        ("nan lr", ValueError, lambda: fd.sgd_step(p, g, lr=float("nan"))),
        ("negative lr", ValueError, lambda: fd.sgd_step(p, g, lr=-0.1)),
        ("momentum 1", ValueError, lambda: fd.sgd_step(p, g, b, lr=0.1, momentum=1.0)),
        ("negative momentum", ValueError, lambda: fd.sgd_step(p, g, b, lr=0.1, momentum=-0.1)),
        ("nesterov without momentum", ValueError, lambda: fd.sgd_step(p, g, lr=0.1, nesterov=True)),
        ("missing buffer", ValueError, lambda: fd.sgd_step(p, g, lr=0.1, momentum=0.5)),
        ("negative weight decay", ValueError, lambda: fd.sgd_step(p, g, lr=0.1, weight_decay=-1.0)),
        ("dampening > 1", ValueError, lambda: fd.sgd_step(p, g, b, lr=0.1, momentum=0.5, dampening=1.5)),
        ("unknown convention", ValueError, lambda: fd.sgd_step(p, g, b, convention="keras", **ok)),
        ("classical dampening", ValueError, lambda: fd.sgd_step(p, g, b, convention="classical", dampening=0.1, **ok)),
        ("inf grad_scale", ValueError, lambda: fd.sgd_step(p, g, lr=0.1, grad_scale=float("inf"))),
        ("string lr", TypeError, lambda: fd.sgd_step(p, g, lr="0.1")),
        ("n_threads 0", ValueError, lambda: fd.sgd_step(p, g, lr=0.1, n_threads=0)),
        ("unknown backend", ValueError, lambda: fd.sgd_step(p, g, lr=0.1, backend="gpu")),
        ("list length", ValueError, lambda: fd.sgd_step([p, b], [g], lr=0.1)),
        ("mixed dtypes in list", TypeError,
         lambda: fd.sgd_step([p, p.astype(np.float64)], [g, g.astype(np.float64)], lr=0.1)),
    ]
    return arrays, cases


@pytest.mark.parametrize("index", range(28))
def test_bad_input_raises_and_changes_nothing(index, rng):
    arrays, cases = bad_calls(rng)
    assert len(cases) == 28
    description, exception, call = cases[index]
    before = snapshot(arrays)
    with pytest.raises(exception):
        call()
    assert_unchanged(arrays, before)
