"""Adaptive rules: every bad hyperparameter or buffer raises before anything is written."""

import numpy as np
import pytest

import fastdescent as fd
from support import assert_unchanged, random_array, snapshot

NAN, INF = float("nan"), float("inf")


def bad_calls(rng):
    """(arrays, [(description, exception, call)]) for every kind of bad input."""
    p, g, a, b, c = (random_array(rng, 10, np.float32) for _ in range(5))
    ro = random_array(rng, 10, np.float32)
    ro.flags.writeable = False
    p2, g2, a2, b2 = (random_array(rng, 7, np.float32) for _ in range(4))
    arrays = (p, g, a, b, c, ro, p2, g2, a2, b2)
    adagrad = lambda **kw: fd.adagrad_step(p, g, a, **{"step": 1, **kw})  # noqa: E731
    rmsprop = lambda *bufs, **kw: fd.rmsprop_step(p, g, a, *bufs, **kw)  # noqa: E731
    adam = lambda *bufs, **kw: fd.adam_step(p, g, a, b, *bufs, **{"step": 1, **kw})  # noqa: E731
    adamw = lambda *bufs, **kw: fd.adamw_step(p, g, a, b, *bufs, **{"step": 1, **kw})  # noqa: E731
    cases = [
        # Adagrad hyperparameters.
        ("adagrad negative lr", ValueError, lambda: adagrad(lr=-0.1)),
        ("adagrad nan lr", ValueError, lambda: adagrad(lr=NAN)),
        ("adagrad negative lr_decay", ValueError, lambda: adagrad(lr_decay=-0.1)),
        ("adagrad inf lr_decay", ValueError, lambda: adagrad(lr_decay=INF)),
        ("adagrad negative weight_decay", ValueError, lambda: adagrad(weight_decay=-1e-3)),
        ("adagrad negative eps", ValueError, lambda: adagrad(eps=-1e-10)),
        ("adagrad inf eps", ValueError, lambda: adagrad(eps=INF)),
        ("adagrad step 0", ValueError, lambda: adagrad(step=0)),
        ("adagrad step -3", ValueError, lambda: adagrad(step=-3)),
        ("adagrad float step", TypeError, lambda: adagrad(step=1.0)),
        ("adagrad bool step", TypeError, lambda: adagrad(step=True)),
        ("adagrad missing step", TypeError, lambda: fd.adagrad_step(p, g, a)),
        ("adagrad no sums", ValueError, lambda: fd.adagrad_step(p, g, None, step=1)),
        ("adagrad inf grad_scale", ValueError, lambda: adagrad(grad_scale=INF)),
        ("adagrad string lr", TypeError, lambda: adagrad(lr="0.1")),
        # RMSprop hyperparameters and optional buffers.
        ("rmsprop alpha 1", ValueError, lambda: rmsprop(alpha=1.0)),
        ("rmsprop negative alpha", ValueError, lambda: rmsprop(alpha=-0.5)),
        ("rmsprop nan alpha", ValueError, lambda: rmsprop(alpha=NAN)),
        ("rmsprop negative eps", ValueError, lambda: rmsprop(eps=-1e-8)),
        ("rmsprop momentum 1", ValueError, lambda: rmsprop(b, momentum=1.0)),
        ("rmsprop negative momentum", ValueError, lambda: rmsprop(b, momentum=-0.1)),
        ("rmsprop negative weight_decay", ValueError, lambda: rmsprop(weight_decay=-1.0)),
        ("rmsprop momentum without buffers", ValueError, lambda: rmsprop(momentum=0.9)),
        ("rmsprop buffers without momentum", ValueError, lambda: rmsprop(b)),
        ("rmsprop centered without grad_avgs", ValueError, lambda: rmsprop(centered=True)),
        ("rmsprop grad_avgs without centered", ValueError, lambda: rmsprop(None, c)),
        ("rmsprop no square_avgs", ValueError, lambda: fd.rmsprop_step(p, g, None)),
        ("rmsprop grad_avg is square_avg", ValueError, lambda: rmsprop(None, a, centered=True)),
        ("rmsprop read-only momentum buffer", ValueError, lambda: rmsprop(ro, momentum=0.9)),
        # Adam / AdamW hyperparameters and optional buffers.
        ("adam beta1 1", ValueError, lambda: adam(betas=(1.0, 0.999))),
        ("adam beta2 1", ValueError, lambda: adam(betas=(0.9, 1.0))),
        ("adam negative beta1", ValueError, lambda: adam(betas=(-0.1, 0.999))),
        ("adam nan beta2", ValueError, lambda: adam(betas=(0.9, NAN))),
        ("adam three betas", TypeError, lambda: adam(betas=(0.9, 0.99, 0.999))),
        ("adam scalar betas", TypeError, lambda: adam(betas=0.9)),
        ("adam string beta", TypeError, lambda: adam(betas=("0.9", 0.999))),
        ("adam negative eps", ValueError, lambda: adam(eps=-1e-8)),
        ("adam nan eps", ValueError, lambda: adam(eps=NAN)),
        ("adam negative lr", ValueError, lambda: adam(lr=-1e-3)),
        ("adam negative weight_decay", ValueError, lambda: adam(weight_decay=-0.01)),
        ("adamw negative weight_decay", ValueError, lambda: adamw(weight_decay=-0.01)),
        ("adam step 0", ValueError, lambda: adam(step=0)),
        ("adamw float step", TypeError, lambda: adamw(step=2.5)),
        ("adam amsgrad without max", ValueError, lambda: adam(amsgrad=True)),
        ("adamw max without amsgrad", ValueError, lambda: adamw(c)),
        ("adam no exp_avg_sqs", ValueError, lambda: fd.adam_step(p, g, a, None, step=1)),
        # Buffers.
        ("adam exp_avg is exp_avg_sq", ValueError, lambda: fd.adam_step(p, g, a, a, step=1)),
        ("adam grad is exp_avg", ValueError, lambda: fd.adam_step(p, g, g, b, step=1)),
        ("adam max is param", ValueError, lambda: adam(p, amsgrad=True)),
        ("adam read-only exp_avg_sq", ValueError, lambda: fd.adam_step(p, g, a, ro, step=1)),
        ("adam float64 exp_avg", TypeError, lambda: fd.adam_step(p, g, a.astype(np.float64), b, step=1)),
        ("adam short exp_avg_sq", ValueError, lambda: fd.adam_step(p, g, a, b[:9], step=1)),
        ("adam 2-D max", ValueError, lambda: adam(c.reshape(2, 5), amsgrad=True)),
        ("adam strided exp_avg", ValueError, lambda: fd.adam_step(p, g, np.repeat(a, 2)[::2], b, step=1)),
        ("adagrad list sums for one param", TypeError, lambda: fd.adagrad_step(p, g, list(a), step=1)),
        ("adam state list too short", ValueError, lambda: fd.adam_step([p, p2], [g, g2], [a, a2], [b], step=1)),
        ("adam bad second tensor", ValueError,
         lambda: fd.adam_step([p, p2], [g, g2], [a, a2], [b, b2[:6]], step=1)),
        ("rmsprop bad second tensor dtype", TypeError,
         lambda: fd.rmsprop_step([p, p2], [g, g2], [a, a2.astype(np.float64)])),
        ("adagrad n_threads 0", ValueError, lambda: adagrad(n_threads=0)),
        ("adam unknown backend", ValueError, lambda: adam(backend="gpu")),
    ]
    return arrays, cases


N_CASES = 60


def test_case_count(rng):
    assert len(bad_calls(rng)[1]) == N_CASES


@pytest.mark.parametrize("index", range(N_CASES))
def test_bad_input_raises_and_changes_nothing(index, rng):
    arrays, cases = bad_calls(rng)
    description, exception, call = cases[index]
    before = snapshot(arrays)
    with pytest.raises(exception):
        call()
    assert_unchanged(arrays, before)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_good_calls_of_the_same_shapes_work(backend, rng):
    """The fixtures of bad_calls are fine once the one fault is removed."""
    def arrays(k):
        return [random_array(rng, 10, np.float32, positive=True) for _ in range(k)]

    p, g = random_array(rng, 10, np.float32), random_array(rng, 10, np.float32)
    fd.adagrad_step(p, g, *arrays(1), step=1, backend=backend)
    fd.rmsprop_step(p, g, *arrays(2), np.zeros(10, np.float32), momentum=0.9, centered=True, backend=backend)
    fd.adam_step(p, g, *arrays(3), step=3, amsgrad=True, backend=backend)
    fd.adamw_step([p], [g], *([a] for a in arrays(2)), step=np.int64(2), betas=[0.5, 0.5], backend=backend)
    assert np.all(np.isfinite(p))
