"""ASGD: one step by hand, the eta and mu schedules (as PyTorch stores them), when
averaging starts, and what the average is for."""

import numpy as np
import pytest

import fastdescent as fd
from fastdescent.rules.asgd import as_stored
from support import DTYPES, assert_bitwise_equal, random_array


@pytest.mark.parametrize("averaging", [False, True])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_one_step_by_hand(backend, averaging, rng):
    p, g, ax = (random_array(rng, 101, np.float64) for _ in range(3))
    eta, mu, lambd, wd = 0.03, (0.25 if averaging else 1.0), 0.2, 0.01
    d = g + wd * p
    expected_p = p * (1 - lambd * eta) - eta * d
    expected_ax = ax + (expected_p - ax) * mu if averaging else expected_p
    after = fd.asgd_step(p, g, ax, step=7, eta=eta, mu=mu, lr=0.1, lambd=lambd, alpha=0.5, t0=2.0,
                         weight_decay=wd, backend=backend)
    assert_bitwise_equal(p, expected_p, "param")
    assert_bitwise_equal(ax, expected_ax, "ax")
    assert after == {"eta": as_stored(0.1 / (1 + lambd * 0.1 * 7) ** 0.5), "mu": as_stored(1 / 5)}


def test_schedules_and_the_start_of_averaging(rng):
    """eta_t = lr / (1 + lambd lr t)^alpha and mu_t = 1 / max(1, t - t0), each rounded
    to float32; the average copies the parameters until mu falls below 1, then is
    the mean of the iterates from the last copy on."""
    lr, lambd, alpha, t0 = 0.05, 0.3, 0.75, 3.0
    p, ax = random_array(rng, 64, np.float64), np.zeros(64)
    scalars, iterates = {}, []
    for t in range(1, 11):
        before = dict(scalars)
        scalars = fd.asgd_step(p, random_array(rng, 64, np.float64), ax, step=t, lr=lr, lambd=lambd, alpha=alpha,
                               t0=t0, **before)
        iterates.append(p.copy())
        assert scalars == {"eta": as_stored(lr / (1 + lambd * lr * t) ** alpha),
                           "mu": as_stored(1 / max(1, t - t0))}
        if before.get("mu", 1.0) == 1.0:  # steps 1 to t0 + 2
            assert t <= t0 + 2
            assert_bitwise_equal(ax, p, f"ax after step {t}")
        else:  # mu = 1/2, 1/3, ...: the running mean (to mu's float32 rounding)
            np.testing.assert_allclose(ax, np.mean(iterates[int(t0) + 1:], axis=0), rtol=0, atol=1e-6)


def test_eta_starts_at_lr_as_pytorch_stores_it(rng):
    p, g, ax = (random_array(rng, 10, np.float64) for _ in range(3))
    runs = {eta: [a.copy() for a in (p, ax)] for eta in (None, as_stored(0.1), 0.1)}
    for eta, (param, average) in runs.items():
        fd.asgd_step(param, g, average, step=1, lr=0.1, eta=eta)
    assert as_stored(0.1) != 0.1
    assert_bitwise_equal(runs[None][0], runs[as_stored(0.1)][0], "param")
    assert not np.array_equal(runs[None][0], runs[0.1][0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_eta_and_mu_are_torchs(dtype, rng):
    """The stored eta and mu equal torch.optim.ASGD's bit for bit, lr changing on the way."""
    torch = pytest.importorskip("torch")
    start = random_array(rng, 30, dtype)
    ours = fd.ASGD([start.copy()], lr=0.07, lambd=0.02, t0=2.0)
    theirs = torch.tensor(start.copy(), requires_grad=True)
    peer = torch.optim.ASGD([theirs], lr=0.07, lambd=0.02, t0=2.0, foreach=False)
    for t in range(8):
        grad = random_array(rng, 30, dtype)
        for opt in (ours, peer):
            opt.param_groups[0]["lr"] = 0.07 * 0.9**t
        ours.step([grad])
        theirs.grad = torch.from_numpy(grad.copy())
        peer.step()
        state = peer.state[theirs]
        assert (ours.state[0]["eta"], ours.state[0]["mu"]) == (state["eta"].item(), state["mu"].item())


def test_the_average_sees_through_the_noise():
    """On a quadratic with noisy gradients, the iterate keeps fluctuating at the scale
    the rate allows; the average of the iterates (averaging from the start) is far
    closer to the minimum."""
    rng = np.random.default_rng(5)
    x_star = rng.standard_normal(20)
    p, ax = np.zeros(20), np.zeros(20)
    scalars = {}
    for t in range(1, 4001):
        grad = (p - x_star) + rng.standard_normal(20)
        scalars = fd.asgd_step(p, grad, ax, step=t, lr=0.05, t0=0.0, **scalars)
    assert np.linalg.norm(ax - x_star) < 0.2 * np.linalg.norm(p - x_star)
