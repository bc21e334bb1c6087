"""Lion: the step against its formula in exact arithmetic, the sign of zero and of
NaN, and fastdescent.torch.Lion against ``lion_pytorch.Lion`` (skipped when that
package is absent) on a real small model, state dicts both ways.

The kernel-vs-reference grid, bad input, the optimizer and the checkpoints are
derived from the spec (test_rule_grid.py and the others)."""

from fractions import Fraction

import numpy as np
import pytest

import fastdescent as fd
from support import DTYPES, assert_bitwise_equal, random_array

BACKENDS = ("kernel", "reference")


def exact_lion(p, g, m, dtype, *, lr, betas, weight_decay=0.0, maximize=False, grad_scale=1.0):
    """One step of the issue's formula on one element, in exact rational arithmetic:
    u = sign(beta1*m + (1-beta1)*g), p -= lr*(u + wd*p), m = beta2*m + (1-beta2)*g,
    with the coefficients the kernel uses (each rounded once to ``dtype``)."""
    def coefficient(x):
        return Fraction(float(dtype(x)))

    b1, w1, b2, w2 = (coefficient(x) for x in (betas[0], 1.0 - betas[0], betas[1], 1.0 - betas[1]))
    d = Fraction(float(g)) * Fraction(-grad_scale if maximize else grad_scale)
    p, m = Fraction(float(p)), Fraction(float(m))
    c = b1 * m + w1 * d
    u = (c > 0) - (c < 0)
    return p - coefficient(lr) * (u + coefficient(weight_decay) * p), b2 * m + w2 * d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.3, maximize=True, grad_scale=0.5),
                                     dict(betas=(0.5, 0.9), weight_decay=0.01)], ids=["plain", "wd-max-scale", "betas"])
def test_each_step_is_the_formula_to_rounding(options, dtype, backend, rng):
    """Twelve steps, each from the previous step's arrays: every element within four
    roundings (relative to the array's largest element) of the exact formula."""
    hyper = {"lr": 0.01, "betas": (0.9, 0.99), **options}
    n, ulp = 200, np.finfo(dtype).eps
    p, m = random_array(rng, n, dtype), random_array(rng, n, dtype, scale=0.1)
    for _ in range(12):
        g = random_array(rng, n, dtype)
        expected = [exact_lion(*args, dtype, **hyper) for args in zip(p, g, m)]
        fd.lion_step(p, g, m, **hyper, backend=backend)
        for k, (name, got) in enumerate((("param", p), ("exp_avg", m))):
            exact = [e[k] for e in expected]
            error = max(abs(Fraction(float(a)) - e) for a, e in zip(got, exact))
            assert error <= 4 * ulp * max(map(abs, exact)), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_sign_of_zero_is_zero(dtype, backend):
    """Where beta1*m + (1-beta1)*g is exactly zero (either sign) the parameter does not
    move but for its decay; the momentum still moves."""
    p = np.array([1.5, -2.0, 0.25, 3.0], dtype)
    m = np.array([0.0, -0.0, 1.0, -0.5], dtype)
    g = np.array([0.0, 0.0, -1.0, 0.5], dtype)  # with beta1 = 0.5: c = 0, -0, 0, 0
    p0, m0 = p.copy(), m.copy()
    fd.lion_step(p, g, m, lr=0.125, betas=(0.5, 0.75), backend=backend)
    assert_bitwise_equal(p, p0)
    np.testing.assert_array_equal(m, 0.75 * m0 + 0.25 * g)
    fd.lion_step(p, np.zeros_like(g), np.zeros_like(m), lr=0.125, betas=(0.5, 0.75), weight_decay=0.5,
                 backend=backend)
    np.testing.assert_array_equal(p, p0 - dtype(0.125) * (dtype(0.5) * p0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_coordinate_moves_by_the_learning_rate(dtype, backend, rng):
    n, lr = 1001, 2.0**-7
    p = (rng.integers(-1000, 1000, n) * 2.0**-10).astype(dtype)  # so that p - lr and p + lr are exact
    m, g = random_array(rng, n, dtype), random_array(rng, n, dtype)
    c = dtype(0.9) * m + dtype(0.1) * g
    before = p.copy()
    fd.lion_step(p, g, m, lr=lr, backend=backend)
    assert_bitwise_equal(before - p, (lr * np.sign(c)).astype(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_reaches_the_parameter(backend, rng):
    """NumPy's sign keeps NaN (torch.sign would give 0 and freeze the parameter)."""
    p, m = random_array(rng, 5, np.float32), random_array(rng, 5, np.float32)
    g = random_array(rng, 5, np.float32)
    g[2] = np.nan
    fd.lion_step(p, g, m, lr=0.01, backend=backend)
    assert np.isnan(p[2]) and np.isnan(m[2])
    assert np.isfinite(np.delete(p, 2)).all() and np.isfinite(np.delete(m, 2)).all()


# -- fastdescent.torch.Lion against lion_pytorch.Lion ---------------------------------------

#: Bound (torch_support.tolerance): parameters and momenta within 2**-16 (float32) and
#: 2**-40 (float64) of lion_pytorch's, relative to each tensor's largest magnitude,
#: after 50 steps. lion_pytorch decays first, p*(1 - lr*wd) - lr*u, where this
#: computes p - lr*(u + wd*p), and torch fuses its momentum's multiply-adds. Measured
#: on the test MLP: without weight decay the parameters are bit-identical (momenta
#: 2e-7 / 3e-16 apart: one rounding); with weight_decay=0.1, 3e-6 / 6e-15.
CONFIGS = {"plain": dict(lr=1e-3), "decay": dict(lr=1e-3, weight_decay=0.1),
           "betas": dict(lr=3e-4, betas=(0.8, 0.95), weight_decay=1.0)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_matches_lion_pytorch(config, dtype):
    torch = pytest.importorskip("torch")
    lion_pytorch = pytest.importorskip("lion_pytorch")
    import fastdescent.torch as fdt
    from torch_support import STEPS, assert_close, batches, mlp, train

    dtype = getattr(torch, dtype)
    ours, theirs = mlp(dtype), mlp(dtype)
    initial = [p.detach().clone() for p in ours.parameters()]
    ours_opt = fdt.Lion(ours.parameters(), **CONFIGS[config])
    theirs_opt = lion_pytorch.Lion(theirs.parameters(), **CONFIGS[config])
    data = batches((10,), dtype=dtype)
    assert len(data) == STEPS == 50
    train(ours, ours_opt, data)
    train(theirs, theirs_opt, data)
    for (name, a), b, start in zip(ours.named_parameters(), theirs.parameters(), initial):
        assert_close(a.detach(), b.detach(), name)
        assert_close(ours_opt.state[a]["exp_avg"], theirs_opt.state[b]["exp_avg"], f"{name} exp_avg")
        assert not torch.equal(a, start)


@pytest.mark.parametrize("direction", ["lion_pytorch-to-fastdescent", "fastdescent-to-lion_pytorch"])
def test_state_dicts_interchange_with_lion_pytorch(direction):
    """Train 20 steps with one, resume with the other: as if the first went on."""
    torch = pytest.importorskip("torch")
    lion_pytorch = pytest.importorskip("lion_pytorch")
    import copy

    import fastdescent.torch as fdt
    from torch_support import assert_close, batches, mlp, roundtrip, train

    first, then = (lion_pytorch.Lion, fdt.Lion) if direction.startswith("lion") else (fdt.Lion, lion_pytorch.Lion)
    options = dict(lr=1e-3, weight_decay=0.1)
    data = batches((10,), steps=40)
    model = mlp()
    opt = first(model.parameters(), **options)
    train(model, opt, data[:20])
    resumed_model = copy.deepcopy(model)
    resumed = then(resumed_model.parameters(), **options)
    resumed.load_state_dict(roundtrip(opt.state_dict()))
    train(model, opt, data[20:])
    train(resumed_model, resumed, data[20:])
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert_close(b.detach(), a.detach(), "parameter")
        assert list(resumed.state[b]) == ["exp_avg"]


def test_channels_last_and_missing_gradients_as_lion_pytorch():
    """A channels_last conv net whose parameters miss gradients at some steps (they keep
    their values and momenta): as lion_pytorch, updated in place in the tensors' layout."""
    torch = pytest.importorskip("torch")
    lion_pytorch = pytest.importorskip("lion_pytorch")
    import fastdescent.torch as fdt
    from torch_support import assert_close, batches, convnet, loss_fn

    models = [convnet(memory_format=torch.channels_last) for _ in range(2)]
    optimizers = [fdt.Lion(models[0].parameters(), lr=1e-3, weight_decay=0.1),
                  lion_pytorch.Lion(models[1].parameters(), lr=1e-3, weight_decay=0.1)]
    weight = models[0][0].weight
    address = weight.data_ptr()
    for model, opt in zip(models, optimizers):
        params = list(model.parameters())
        for step, (x, y) in enumerate(batches((2, 8, 8), steps=20)):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            if step < 5:
                params[0].grad = None  # joins late
            if step % 3 == 1:
                params[3].grad = None  # intermittent
            params[5].grad = None  # never
            opt.step()
    assert weight.data_ptr() == address and not weight.is_contiguous()
    assert optimizers[0].state[weight]["exp_avg"].stride() == weight.stride()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert_close(a.detach(), b.detach(), name)
        if b in optimizers[1].state:
            assert_close(optimizers[0].state[a]["exp_avg"], optimizers[1].state[b]["exp_avg"], name)
        else:
            assert a not in optimizers[0].state or not optimizers[0].state[a]


@pytest.mark.parametrize("missing", ["grads", "exp_avg"])
def test_private_kernel_refuses_a_missing_list(missing, rng):
    from fastdescent import _dispatch

    lists = {name: [random_array(rng, 100, np.float32)] for name in ("params", "grads", "exp_avg")}
    lists[missing] = None
    before = lists["params"][0].copy()
    with pytest.raises(TypeError):
        _dispatch.kernels.lion(*lists.values(), lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, grad_scale=1.0,
                               n_threads=1)
    assert_bitwise_equal(lists["params"][0], before)


def test_every_layout_as_lion_pytorch():
    """Gapped, transposed, channels_last, interleaved, 0-d and late parameters
    (test_torch_layouts' model): as lion_pytorch, within torch_support's bound."""
    torch = pytest.importorskip("torch")
    lion_pytorch = pytest.importorskip("lion_pytorch")
    import fastdescent.torch as fdt
    from test_torch_layouts import STEPS, Layouts
    from torch_support import assert_close

    models = [Layouts(torch.float32) for _ in range(2)]
    optimizers = [fdt.Lion(models[0].parameters(), lr=1e-3, weight_decay=0.1),
                  lion_pytorch.Lion(models[1].parameters(), lr=1e-3, weight_decay=0.1)]
    for model, opt in zip(models, optimizers):
        g = torch.Generator().manual_seed(1)
        for step in range(STEPS):
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x, step), y).backward()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert_close(a.detach(), b.detach(), name)
        assert_close(optimizers[0].state[a]["exp_avg"], optimizers[1].state[b]["exp_avg"], name)
