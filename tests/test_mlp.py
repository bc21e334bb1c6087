import numpy as np
import pytest

import fastdescent
from fastdescent.demo.data import MiniBatches
from fastdescent.demo.mlp import MLP


def random_batch(rng, n, sizes):
    return rng.standard_normal((n, sizes[0])), rng.integers(0, sizes[-1], n)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("sizes", [[5, 7, 4], [6, 8, 5, 3]])
def test_backward_matches_finite_differences(activation, sizes, rng):
    model = MLP(sizes, activation=activation, dtype=np.float64, seed=rng)
    x, y = random_batch(rng, 9, sizes)
    loss, grads = model.loss_and_gradients(x, y)
    assert loss == pytest.approx(model.loss(x, y), rel=1e-14)
    h = 1e-6
    for param, grad in zip(model.params, grads):
        numeric = np.empty_like(param)
        for i in np.ndindex(param.shape):
            saved = param[i]
            param[i] = saved + h
            up = model.loss(x, y)
            param[i] = saved - h
            down = model.loss(x, y)
            param[i] = saved
            numeric[i] = (up - down) / (2 * h)
        assert np.abs(grad).max() > 1e-4  # gradients are not trivially zero
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_loss_is_the_mean_cross_entropy(rng):
    model = MLP([4, 6, 3], dtype=np.float64, seed=rng)
    x, y = random_batch(rng, 5, [4, 6, 3])
    logits = model.forward(x)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(probabilities[np.arange(5), y]))
    assert model.loss(x, y) == pytest.approx(expected, rel=1e-12)
    # large logits do not overflow
    model.params[-1][:] = [1000.0, 0.0, -1000.0]
    assert np.isfinite(model.loss(x, y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_and_gradients_keep_the_dtype_and_stay_in_place(dtype, rng):
    model = MLP([8, 16, 4], dtype=dtype, seed=0)
    assert [p.shape for p in model.params] == [(8, 16), (16,), (16, 4), (4,)]
    assert model.n_parameters == 8 * 16 + 16 + 16 * 4 + 4
    grads_before = [id(g) for g in model.grads]
    x, y = random_batch(rng, 10, [8, 16, 4])
    _, grads = model.loss_and_gradients(x, y)
    assert [id(g) for g in grads] == grads_before
    for p, g in zip(model.params, grads):
        assert p.dtype == g.dtype == dtype and p.flags.c_contiguous and g.flags.c_contiguous
    assert model.forward(x).dtype == dtype


def test_same_seed_same_initialization():
    a, b = MLP([3, 5, 2], seed=7), MLP([3, 5, 2], seed=7)
    for p, q in zip(a.params, b.params):
        np.testing.assert_array_equal(p, q)
    bound = 1 / np.sqrt(3)
    assert np.abs(a.params[0]).max() <= bound and np.ptp(a.params[0]) > bound


def test_sgd_steps_fit_a_separable_problem(rng):
    x = rng.standard_normal((200, 2))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    model = MLP([2, 16, 2], activation="tanh", dtype=np.float32, seed=1)
    initial_loss = model.loss(x, y)
    batches = MiniBatches(x, y, batch_size=20, seed=0)
    for _ in range(30):
        for xb, yb in batches:
            _, grads = model.loss_and_gradients(xb, yb)
            fastdescent.sgd_step(model.params, grads, lr=0.5)
    assert model.accuracy(x, y) > 0.95
    assert model.loss(x, y) < 0.5 * initial_loss


def test_bad_arguments():
    with pytest.raises(ValueError, match="sizes"):
        MLP([4])
    with pytest.raises(ValueError, match="activation"):
        MLP([4, 2], activation="sigmoid")
    with pytest.raises(TypeError, match="dtype"):
        MLP([4, 2], dtype=np.int32)
    with pytest.raises(ValueError, match="labels"):
        MLP([4, 2]).loss(np.ones((3, 4)), [0, 1])


# ---- the mini-batch iterator ----

def test_each_epoch_visits_every_sample_once_in_a_new_order(rng):
    x = rng.standard_normal((103, 3))
    ids = np.arange(103)
    batches = MiniBatches(x, ids, batch_size=10, seed=3)
    assert len(batches) == 11
    orders = []
    for _ in range(3):
        epoch = list(batches)
        assert [len(b[1]) for b in epoch] == [10] * 10 + [3]
        order = np.concatenate([b[1] for b in epoch])
        np.testing.assert_array_equal(np.sort(order), ids)
        np.testing.assert_array_equal(np.concatenate([b[0] for b in epoch]), x[order])  # rows stay aligned
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def test_seed_reproduces_the_epochs_and_drop_last_drops_the_short_batch():
    ids = np.arange(50)
    a = MiniBatches(ids, batch_size=8, seed=11, drop_last=True)
    b = MiniBatches(ids, batch_size=8, seed=11, drop_last=True)
    assert len(a) == 6
    for _ in range(2):
        epoch_a, epoch_b = list(a), list(b)
        assert all(len(batch) == 8 for batch in epoch_a) and len(epoch_a) == 6
        for u, v in zip(epoch_a, epoch_b):
            np.testing.assert_array_equal(u, v)


def test_without_shuffle_batches_are_views_in_order():
    x = np.arange(20.0).reshape(10, 2)
    batches = list(MiniBatches(x, batch_size=4, shuffle=False))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert np.shares_memory(batches[0], x)
    np.testing.assert_array_equal(np.concatenate(batches), x)


def test_mini_batch_arguments_are_checked():
    with pytest.raises(ValueError, match="same length"):
        MiniBatches(np.ones(3), np.ones(4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        MiniBatches(np.ones(3), batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        MiniBatches(np.ones(3), batch_size=2.0)
    with pytest.raises(TypeError):
        MiniBatches(batch_size=2)
