"""NAdam: steps against the equations written independently, and the product of
the momenta (``mu_product``) carried from step to step: by the face, by the
optimizer, through state dicts and checkpoints, and between torch.optim.NAdam and
fastdescent.torch.NAdam, in float32 as PyTorch keeps it. (The grid, torch
agreement, bad input and convergence tests are derived from the spec:
test_rule_*.py.)"""

import math

import numpy as np
import pytest

import fastdescent as fd
from support import random_array

BACKENDS = ("kernel", "reference")


def momentum(t, beta1=0.9, momentum_decay=4e-3):
    return beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))


def float32_product(steps, **schedule):
    """mu_1 * ... * mu_steps, multiplied in float32 one step after the other."""
    product = np.float32(1.0)
    for t in range(1, steps + 1):
        product = product * np.float32(momentum(t, **schedule))
    return float(product)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_by_hand(backend, decoupled, rng):
    n, lr, (beta1, beta2), eps, wd, psi = 80, 0.01, (0.8, 0.9), 1e-6, 0.1, 0.2
    p = random_array(rng, n, np.float64)
    m, v = random_array(rng, n, np.float64), random_array(rng, n, np.float64, positive=True)
    hand, hand_m, hand_v = p.copy(), m.copy(), v.copy()
    mu_product, hand_product = None, 1.0
    for t in range(1, 4):
        g = random_array(rng, n, np.float64)
        state = fd.nadam_step(p, g, m, v, step=t, mu_product=mu_product, lr=lr, betas=(beta1, beta2), eps=eps,
                              weight_decay=wd, momentum_decay=psi, decoupled_weight_decay=decoupled,
                              backend=backend)
        mu, mu_next = momentum(t, beta1, psi), momentum(t + 1, beta1, psi)
        hand_product = float(np.float32(hand_product) * np.float32(mu))
        assert state == {"mu_product": hand_product}
        mu_product = state["mu_product"]
        for i in range(n):
            x = hand[i] * (1 - lr * wd) if decoupled else hand[i]
            d = g[i] if decoupled else g[i] + wd * hand[i]
            hand_m[i] = beta1 * hand_m[i] + (1 - beta1) * d
            hand_v[i] = beta2 * hand_v[i] + (1 - beta2) * d * d
            sigma = math.sqrt(hand_v[i] / (1 - beta2**t)) + eps
            hand[i] = (x - lr * (1 - mu) / (1 - hand_product) * d / sigma
                       - lr * mu_next / (1 - hand_product * mu_next) * hand_m[i] / sigma)
        np.testing.assert_allclose(p, hand, rtol=1e-13, atol=1e-15, err_msg=f"step {t}")
    np.testing.assert_allclose(m, hand_m, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(v, hand_v, rtol=1e-13, atol=1e-15)


def test_face_starts_mu_product_at_one(rng):
    n = 20
    arrays = [random_array(rng, n, np.float32) for _ in range(4)]
    first = [a.copy() for a in arrays]
    second = [a.copy() for a in arrays]
    assert fd.nadam_step(*first, step=1) == fd.nadam_step(*second, step=1, mu_product=1.0)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # A later step with the product of another history takes another step.
    third = [a.copy() for a in arrays]
    fd.nadam_step(*third, step=1, mu_product=0.5)
    assert not np.array_equal(third[0], first[0])


@pytest.mark.parametrize("flat", [False, True])
def test_optimizer_keeps_the_float32_product(flat, rng):
    params = [random_array(rng, 30, np.float64), random_array(rng, 7, np.float32)]
    opt = fd.NAdam(params, lr=0.01, momentum_decay=0.05, flat=flat)
    for steps in range(1, 13):
        opt.step([random_array(rng, p.size, p.dtype) for p in opt.params])
        expected = float32_product(steps, momentum_decay=0.05)
        assert all(s["mu_product"] == expected and type(s["mu_product"]) is float for s in opt.state.values())
    assert list(opt.state[0]) == ["step", "mu_product", "exp_avg", "exp_avg_sq"]


def test_mu_product_goes_through_state_dicts_and_checkpoints(tmp_path, rng):
    params = [random_array(rng, 50, np.float32)]
    grads = [[random_array(rng, 50, np.float32)] for _ in range(8)]
    whole = fd.NAdam([p.copy() for p in params])
    for g in grads:
        whole.step(g)
    first = fd.NAdam([p.copy() for p in params])
    for g in grads[:4]:
        first.step(g)
    first.save(tmp_path / "nadam.ckpt")
    by_dict, by_file = fd.NAdam([p.copy() for p in first.params]), fd.NAdam([p.copy() for p in params])
    by_dict.load_state_dict(first.state_dict())
    by_file.load(tmp_path / "nadam.ckpt")
    for resumed in (by_dict, by_file):
        assert resumed.state[0]["mu_product"] == float32_product(4)
        for g in grads[4:]:
            resumed.step(g)
        np.testing.assert_array_equal(resumed.params[0], whole.params[0])
        assert resumed.state[0]["mu_product"] == whole.state[0]["mu_product"] == float32_product(8)
    bad = first.state_dict()
    bad["state"][0]["mu_product"] = math.nan
    with pytest.raises(ValueError, match="mu_product"):
        by_dict.load_state_dict(bad)


@pytest.mark.parametrize("direction", ["torch-to-fastdescent", "fastdescent-to-torch"])
def test_mu_product_equals_torch_across_state_dict_interchange(direction):
    """Bit for bit the float32 tensor torch.optim.NAdam keeps, before and after one
    implementation resumes from the other's state dict."""
    torch = pytest.importorskip("torch")
    import fastdescent.torch as fdt

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(3)]
    targets = [torch.randn(5, 3), torch.randn(3)]

    def train(opt, params, steps):
        for _ in range(steps):
            opt.zero_grad()
            sum(((p - q) ** 2).sum() for p, q in zip(params, targets)).backward()
            opt.step()

    first_cls, then_cls = ((torch.optim.NAdam, fdt.NAdam) if direction == "torch-to-fastdescent"
                           else (fdt.NAdam, torch.optim.NAdam))
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    reference_params = [torch.nn.Parameter(w.clone()) for w in weights]
    first = first_cls(params, lr=0.01, momentum_decay=0.1)
    reference = torch.optim.NAdam(reference_params, lr=0.01, momentum_decay=0.1, foreach=False)
    train(first, params, 6)
    train(reference, reference_params, 6)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    then = then_cls(resumed_params, lr=0.01, momentum_decay=0.1)
    then.load_state_dict(first.state_dict())
    train(then, resumed_params, 6)
    train(reference, reference_params, 6)
    for p, q in zip(resumed_params, reference_params):
        got, expected = then.state[p]["mu_product"], reference.state[q]["mu_product"]
        assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)
        assert got.item() == float32_product(12, momentum_decay=0.1)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=2.0**-16)


@pytest.mark.parametrize("default_dtype", ["float32", "float64"])
def test_adapter_multiplies_mu_product_in_the_dtype_torch_keeps_it(default_dtype):
    """torch.optim.NAdam keeps mu_product in its default dtype (float32 unless it is
    float64): the adapter follows it, bit for bit."""
    torch = pytest.importorskip("torch")
    import fastdescent.torch as fdt

    default_dtype = getattr(torch, default_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        torch.manual_seed(0)
        weight = torch.randn(4, 3, dtype=torch.float64)
        params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())]
        opts = [fdt.NAdam([params[0]], momentum_decay=0.3), torch.optim.NAdam([params[1]], momentum_decay=0.3)]
        for step in range(20):
            for p, opt in zip(params, opts):
                opt.zero_grad()
                (p**2 * (1 + step % 3)).sum().backward()
                opt.step()
    finally:
        torch.set_default_dtype(previous)
    got, expected = opts[0].state[params[0]]["mu_product"], opts[1].state[params[1]]["mu_product"]
    assert got.dtype == expected.dtype == default_dtype and torch.equal(got, expected)
    torch.testing.assert_close(params[0].detach(), params[1].detach(), rtol=0, atol=2.0**-40)
