"""Muon: one step by hand, the orthogonalization (against the SVD's polar factor and
against PyTorch's), the shape adjustment of the rate, the 2-D-only contract, and
training against torch.optim.Muon's own bfloat16 iteration with its stated bound."""

import math

import numpy as np
import pytest

import fastdescent as fd
from fastdescent.rules.muon import NS_COEFFICIENTS, adjusted_lr, orthogonalize
from rule_cases import torch_as_fastdescent
from support import DTYPES, assert_bitwise_equal, random_array


@pytest.fixture
def serial_torch():
    """torch, on one thread (tiny models; a shared machine)."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(previous)


def matrix(rng, shape, dtype=np.float64):
    return random_array(rng, math.prod(shape), dtype).reshape(shape)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_one_step_by_hand(backend, shape, nesterov, rng):
    p, g, buf = (matrix(rng, shape) for _ in range(3))
    lr, wd, mu = 0.02, 0.1, 0.9
    expected_buf = buf + (1 - mu) * (g - buf)                       # torch's buf.lerp_(g, 1 - mu), w < 0.5
    update = expected_buf - (1 - mu) * (expected_buf - g) if nesterov else expected_buf  # g.lerp(buf, mu)
    rows, columns = shape
    expected_p = p * (1 - lr * wd) - lr * math.sqrt(max(1, rows / columns)) * orthogonalize(
        update, NS_COEFFICIENTS, 5, 1e-7)
    fd.muon_step(p, g, buf, lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov, backend=backend)
    assert_bitwise_equal(buf, expected_buf, "momentum_buffer")
    assert_bitwise_equal(p, expected_p, "param")


def test_cubic_newton_schulz_converges_to_the_polar_factor(rng):
    """With the classic cubic coefficients (1.5, -0.5, 0) the iteration converges to
    U V^T of the SVD G = U S V^T, for wide and tall matrices alike."""
    for shape in [(20, 30), (30, 20), (16, 16)]:
        g = matrix(rng, shape)
        u, _, vt = np.linalg.svd(g, full_matrices=False)
        np.testing.assert_allclose(orthogonalize(g, (1.5, -0.5, 0.0), 40, 1e-7), u @ vt, atol=1e-12)


def test_quintic_newton_schulz_is_roughly_orthogonal_and_keeps_the_singular_vectors(rng):
    """PyTorch's default coefficients: five steps give U S' V^T with S' near 1 (by
    design not exactly), in the dtype of the update."""
    for dtype in DTYPES:
        g = matrix(rng, (24, 40), dtype)
        o = orthogonalize(g, NS_COEFFICIENTS, 5, 1e-7)
        assert o.dtype == dtype and o.flags.c_contiguous and o.shape == g.shape
        u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
        s = np.diag(u.T @ o.astype(np.float64) @ vt.T)
        assert np.all((0.5 < s) & (s < 1.5))
        off_diagonal = u.T @ o @ vt.T - np.diag(s)
        assert np.max(np.abs(off_diagonal)) < 1e3 * np.finfo(dtype).eps


def test_orthogonalization_matches_torchs_in_the_same_dtype(rng):
    """The iteration of torch.optim._muon run in float64: the same to rounding; and
    PyTorch's own bfloat16 run: within bfloat16's precision."""
    torch = pytest.importorskip("torch")
    from torch.optim import _muon

    for shape in [(12, 20), (20, 12)]:
        g = matrix(rng, shape)
        ours = orthogonalize(g, NS_COEFFICIENTS, 5, 1e-7)
        bfloat16 = _muon._zeropower_via_newtonschulz(torch.from_numpy(g), NS_COEFFICIENTS, 5, 1e-7)
        with torch_as_fastdescent(torch):
            same_dtype = _muon._zeropower_via_newtonschulz(torch.from_numpy(g), NS_COEFFICIENTS, 5, 1e-7)
        np.testing.assert_allclose(ours, same_dtype.numpy(), rtol=0, atol=1e-13)
        assert np.max(np.abs(ours - bfloat16.double().numpy())) < 2**-5 * np.max(np.abs(ours))


@pytest.mark.parametrize("fn", [None, "original", "match_rms_adamw"])
def test_adjusted_rate_is_torchs(fn):
    torch = pytest.importorskip("torch")
    from torch.optim._muon import _adjust_lr

    for shape in [(1, 1), (3, 7), (7, 3), (64, 64), (1000, 10)]:
        assert adjusted_lr(0.02, fn, shape) == _adjust_lr(0.02, fn, torch.Size(shape))
    assert adjusted_lr(0.02, fn, (3, 0)) == (0.02 * (0.2 * math.sqrt(3)) if fn == "match_rms_adamw" else 0.02)


@pytest.mark.parametrize("fn", [None, "match_rms_adamw"])
def test_the_adjustment_scales_the_step(fn, rng):
    """Without weight decay the parameter moves by the adjusted rate times O."""
    p, g = matrix(rng, (8, 2)), matrix(rng, (8, 2))
    before = p.copy()
    fd.muon_step(p, g, np.zeros_like(p), lr=0.1, weight_decay=0.0, momentum=0.0, adjust_lr_fn=fn)
    o = orthogonalize(g, NS_COEFFICIENTS, 5, 1e-7)
    ratio = 2.0 if fn is None else 0.2 * math.sqrt(8)
    np.testing.assert_allclose(before - p, 0.1 * ratio * o, rtol=1e-13, atol=1e-15)


def test_two_dimensional_parameters_only(rng):
    flat = random_array(rng, 12, np.float64)
    with pytest.raises(ValueError, match="2-D"):
        fd.muon_step(flat, flat.copy(), np.zeros(12))
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*2-D"):
        fd.Muon([matrix(rng, (3, 4)), flat])
    opt = fd.Muon([matrix(rng, (3, 4))])
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group({"params": [matrix(rng, (2, 2, 3))]})
    assert len(opt.param_groups) == 1


def test_torch_adapter_refuses_what_it_cannot_orthogonalize():
    torch = pytest.importorskip("torch")
    import fastdescent.torch as fdt

    with pytest.raises(ValueError, match="2D"):  # torch.optim.Muon's own check
        fdt.Muon([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(TypeError, match="complex"):
        fdt.Muon([torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))])
    fdt.Muon([torch.nn.Parameter(torch.randn(4, 3).t())])  # as torch.optim.Muon (stepped in a scratch copy)
    opt = fdt.Muon([torch.nn.Parameter(torch.randn(4, 3))])
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5))]})


@pytest.mark.parametrize("options", [{}, dict(nesterov=False), dict(lr=0.02, adjust_lr_fn="match_rms_adamw")],
                         ids=["nesterov", "momentum", "match_rms_adamw"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_stays_close_to_torchs_bfloat16_iteration(dtype, options, serial_torch):
    """An MLP's weight matrices trained 50 steps by fastdescent.torch.Muon and by
    torch.optim.Muon as it is (its iteration in bfloat16): every weight within 10%
    of how far training moved it (measured: at most 6%). Everything but the
    iteration's precision is compared to float rounding in test_torch.py."""
    torch = serial_torch
    import fastdescent.torch as fdt
    from torch_support import batches, mlp, train, trained

    dtype = getattr(torch, dtype)
    ours, theirs = mlp(dtype), mlp(dtype)
    start = [p.detach().clone() for p in trained("Muon", ours)]
    data = batches((10,), dtype=dtype)
    train(ours, fdt.Muon(trained("Muon", ours), **options), data)
    train(theirs, torch.optim.Muon(trained("Muon", theirs), **options), data)
    for a, b, s in zip(trained("Muon", ours), trained("Muon", theirs), start):
        moved = (b - s).abs().max().item()
        assert (a - b).abs().max().item() <= 0.1 * moved
