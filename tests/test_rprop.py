"""Rprop: one step by hand through every branch of sign(g * prev), the clamps and
the signed zeros; bit-identity with torch.optim.Rprop; the learning rate only
starts the step sizes."""

import numpy as np
import pytest

import fastdescent as fd
from support import DTYPES, assert_bitwise_equal, random_array

ETAS, BOUNDS = (0.5, 1.2), (1e-3, 0.5)

#: (gradient, prev, step size) -> (new step size, new prev, move of the parameter)
BRANCHES = [
    ((2.0, 3.0, 0.1), (0.1 * 1.2, 2.0, -0.1 * 1.2)),        # sign held: grow, step against it
    ((-2.0, -3.0, 0.1), (0.1 * 1.2, -2.0, 0.1 * 1.2)),
    ((2.0, -3.0, 0.1), (0.1 * 0.5, 0.0, 0.0)),              # flipped: shrink, no step, keep +0
    ((-2.0, 3.0, 0.1), (0.1 * 0.5, 0.0, 0.0)),
    ((2.0, 0.0, 0.1), (0.1, 2.0, -0.1)),                    # no previous sign: same size, step
    ((-2.0, 0.0, 0.1), (0.1, -2.0, 0.1)),
    ((0.0, 3.0, 0.1), (0.1, 0.0, 0.0)),                     # zero gradient: nothing moves
    ((-0.0, 3.0, 0.1), (0.1, -0.0, 0.0)),                   # ... and -0 is kept as it is
    ((2.0, 3.0, 0.45), (0.5, 2.0, -0.5)),                   # grows past the largest size
    ((2.0, -3.0, 0.0015), (1e-3, 0.0, 0.0)),                # shrinks past the smallest
    ((2.0, 0.0, 0.8), (0.5, 2.0, -0.5)),                    # out of bounds at the start: clamped
]


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_one_step_by_hand_through_every_branch(backend):
    g, prev, size = (np.array([row[0][k] for row in BRANCHES]) for k in range(3))
    new_size, new_prev, move = (np.array([row[1][k] for row in BRANCHES]) for k in range(3))
    param = np.linspace(-1.0, 1.0, len(BRANCHES))
    expected = param + move
    fd.rprop_step(param, g, prev, size, etas=ETAS, step_sizes=BOUNDS, backend=backend)
    assert_bitwise_equal(size, new_size, "step_size")
    assert_bitwise_equal(prev, new_prev, "prev")  # +0 and -0 told apart
    assert_bitwise_equal(param, expected, "param")


def test_a_step_after_a_flip_keeps_the_size_and_moves():
    param, prev, size = np.zeros(1), np.array([1.0]), np.array([0.1])
    fd.rprop_step(param, np.array([-1.0]), prev, size, etas=ETAS)
    assert (param[0], prev[0], size[0]) == (0.0, 0.0, 0.05)
    fd.rprop_step(param, np.array([-1.0]), prev, size, etas=ETAS)
    assert (param[0], prev[0], size[0]) == (0.05, -1.0, 0.05)


def test_maximize_climbs_and_keeps_the_negated_zero():
    param, prev, size = np.zeros(2), np.array([-1.0, 1.0]), np.full(2, 0.1)
    fd.rprop_step(param, np.array([2.0, 0.0]), prev, size, maximize=True)
    assert param[0] == 0.1 * 1.2 and param[1] == 0.0
    assert_bitwise_equal(prev, np.array([-2.0, -0.0]), "prev")  # -g, as PyTorch keeps it


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_to_torch(dtype, maximize, rng):
    """PyTorch's Rprop has no fused multiply-add to round differently: the same bits,
    over steps with sign flips, zero gradients and both clamps."""
    torch = pytest.importorskip("torch")
    n = 2001
    start = random_array(rng, n, dtype)
    ours = fd.Rprop([start.copy()], lr=0.02, etas=(0.3, 1.7), step_sizes=(1e-3, 0.05), maximize=maximize)
    theirs = torch.tensor(start.copy(), requires_grad=True)
    peer = torch.optim.Rprop([theirs], lr=0.02, etas=(0.3, 1.7), step_sizes=(1e-3, 0.05), maximize=maximize,
                             foreach=False)
    for _ in range(12):
        grad = random_array(rng, n, dtype)
        grad[rng.random(n) < 0.1] = 0.0
        ours.step([grad])
        theirs.grad = torch.from_numpy(grad.copy())
        peer.step()
    assert_bitwise_equal(ours.params[0], theirs.detach().numpy(), "param")
    for name in ("prev", "step_size"):
        assert_bitwise_equal(ours.state[0][name], peer.state[theirs][name].numpy(), name)


def test_learning_rate_only_starts_the_step_sizes(rng):
    start = random_array(rng, 50, np.float64)
    grads = [random_array(rng, 50, np.float64) for _ in range(4)]
    steady, changed = fd.Rprop([start.copy()], lr=0.1), fd.Rprop([start.copy()], lr=0.1)
    for t, grad in enumerate(grads):
        if t == 1:
            changed.param_groups[0]["lr"] = 1e-4  # as a schedule would: no effect, as in PyTorch
        steady.step([grad])
        changed.step([grad])
    assert_bitwise_equal(changed.params[0], steady.params[0], "param")
    fresh = fd.Rprop([start.copy()], lr=0.3)
    fresh.step([np.zeros(50)])  # no sign information: the sizes stay where they start
    assert np.all(fresh.state[0]["step_size"] == 0.3)
