import tracemalloc

import numpy as np
import pytest

import fastdescent as fd
from support import (DTYPES, SIZES, THREADS, assert_bitwise_equal, assert_unchanged, check_backends_agree,
                     random_array, snapshot)

STEPS = 10


# ---------------------------------------------------------------- kernels vs reference twins


def swa_driver(backend, state, snapshot_, _, t, n_threads):
    fd.swa_update(state["average"], snapshot_, n_averaged=t, n_threads=n_threads, backend=backend)


def ema_driver(backend, state, snapshot_, decay, t, n_threads):
    fd.ema_update(state["average"], snapshot_, decay=decay, n_threads=n_threads, backend=backend)


def swap_driver(backend, state, other, _, t, n_threads):
    fd.swap_arrays(state["first"], state["second"], n_threads=n_threads, backend=backend)
    if t % 3 == 2:  # change the contents between swaps
        state["first"] += other


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["swa", "ema", "swap"])
def test_kernel_matches_reference(kind, dtype, n, n_threads, rng, kernel_variant):
    snapshots = [random_array(rng, n, dtype) for _ in range(STEPS)]
    decays = [0.5, 0.9, 0.99, 0.999, 0.0, 0.7, 0.95, 0.3, 0.9999, 0.1]
    if kind == "swap":
        state = {"first": random_array(rng, n, dtype), "second": random_array(rng, n, dtype)}
    else:
        state = {"average": random_array(rng, n, dtype, scale=3.0)}
    driver = {"swa": swa_driver, "ema": ema_driver, "swap": swap_driver}[kind]
    final = check_backends_agree(driver, state, snapshots, decays, n_threads)
    if n:
        changed = final["first"] if kind == "swap" else final["average"]
        assert not np.array_equal(changed, state["first" if kind == "swap" else "average"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["swa", "ema", "swap"])
def test_multi_tensor_matches_per_array(kind, dtype, rng, tiny_parts):
    """Lists of mixed sizes split among 2 threads at arbitrary points equal per-array calls."""
    sizes = [0, 1, 130, 7, 0, 4097, 65, 3000, 1]
    averages = [random_array(rng, n, dtype) for n in sizes]
    params = [random_array(rng, n, dtype) for n in sizes]
    together = [snapshot(averages), snapshot(params)]
    alone = [snapshot(averages), snapshot(params)]
    call = {
        "swa": lambda a, p, n_threads: fd.swa_update(a, p, n_averaged=3, n_threads=n_threads),
        "ema": lambda a, p, n_threads: fd.ema_update(a, p, decay=0.9, n_threads=n_threads),
        "swap": lambda a, p, n_threads: fd.swap_arrays(a, p, n_threads=n_threads),
    }[kind]
    call(*together, n_threads=2)
    for a, p in zip(*alone):
        call(a, p, n_threads=1)
    for x, y in zip(together[0] + together[1], alone[0] + alone[1]):
        assert_bitwise_equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swa_is_the_mean_of_the_snapshots(dtype, rng):
    snapshots = [random_array(rng, 1000, dtype) for _ in range(25)]
    average = random_array(rng, 1000, dtype)  # garbage: the first update must overwrite it
    for n, s in enumerate(snapshots):
        fd.swa_update(average, s, n_averaged=n)
        if n == 0:
            assert_bitwise_equal(average, s)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(average, np.mean(np.array(snapshots, np.float64), axis=0), rtol=tol, atol=tol)


def test_ema_closed_form(rng):
    decay = 0.9
    snapshots = [random_array(rng, 100, np.float64) for _ in range(30)]
    average = snapshots[0].copy()
    for s in snapshots[1:]:
        fd.ema_update(average, s, decay=decay)
    weights = [decay**29] + [(1 - decay) * decay ** (29 - k) for k in range(1, 30)]
    np.testing.assert_allclose(average, np.tensordot(weights, snapshots, axes=1), rtol=1e-12, atol=1e-14)


def test_swap_is_bit_exact_with_nan_payloads():
    a = np.array([np.nan, -0.0, 1.5, np.inf], np.float64)
    a.view(np.uint64)[0] |= 0x1234  # a NaN with a payload
    b = np.arange(4, dtype=np.float64)
    a0, b0 = a.copy(), b.copy()
    fd.swap_arrays(a, b)
    assert_bitwise_equal(a, b0)
    assert_bitwise_equal(b, a0)


def bad_calls(rng):
    avg = random_array(rng, 10, np.float32)
    p = random_array(rng, 10, np.float32)
    ro = p.copy()
    ro.flags.writeable = False
    arrays = (avg, p, ro)
    cases = [
        (TypeError, lambda: fd.swa_update(avg, p.astype(np.float64), n_averaged=1)),
        (ValueError, lambda: fd.swa_update(avg, p[:9], n_averaged=1)),
        (ValueError, lambda: fd.swa_update(ro, p, n_averaged=1)),
        (ValueError, lambda: fd.swa_update(avg, avg, n_averaged=1)),
        (ValueError, lambda: fd.swa_update(avg, np.repeat(p, 2)[::2], n_averaged=1)),
        (ValueError, lambda: fd.swa_update(avg, p, n_averaged=-1)),
        (TypeError, lambda: fd.swa_update(avg, p, n_averaged=1.0)),
        (TypeError, lambda: fd.swa_update(avg, p, n_averaged=True)),
        (TypeError, lambda: fd.swa_update(avg.astype(np.int32), p.astype(np.int32), n_averaged=1)),
        (ValueError, lambda: fd.swa_update([avg], [p, p], n_averaged=1)),
        (ValueError, lambda: fd.ema_update(avg, p, decay=1.0)),
        (ValueError, lambda: fd.ema_update(avg, p, decay=-0.1)),
        (ValueError, lambda: fd.ema_update(avg, p, decay=float("nan"))),
        (TypeError, lambda: fd.ema_update(avg, p, decay="0.9")),
        (ValueError, lambda: fd.ema_update(ro, p, decay=0.9)),
        (ValueError, lambda: fd.swap_arrays(avg, ro)),
        (ValueError, lambda: fd.swap_arrays(avg, avg)),
        (ValueError, lambda: fd.swap_arrays(avg, p.reshape(2, 5))),
        (ValueError, lambda: fd.swap_arrays(avg, p, n_threads=0)),
        (ValueError, lambda: fd.swap_arrays(avg, p, backend="gpu")),
    ]
    return arrays, cases


@pytest.mark.parametrize("index", range(20))
def test_bad_input_raises_and_changes_nothing(index, rng):
    arrays, cases = bad_calls(rng)
    assert len(cases) == 20
    exception, call = cases[index]
    before = snapshot(arrays)
    with pytest.raises(exception):
        call()
    assert_unchanged(arrays, before)


# ---------------------------------------------------------------- SWA and EMA objects


def test_swa_averages_from_start_every_k_steps(rng):
    p = random_array(rng, 50, np.float64)
    swa = fd.SWA([p], start=3, every=2)
    seen = []
    averaged_at = []
    for t in range(1, 12):
        p[...] = rng.standard_normal(50)
        if swa.step():
            averaged_at.append(t)
            seen.append(p.copy())
    assert averaged_at == [3, 5, 7, 9, 11] and swa.n_averaged == 5
    np.testing.assert_allclose(swa.averages[0], np.mean(seen, axis=0), rtol=1e-13)


def test_ema_warmup_decay(rng):
    p = random_array(rng, 20, np.float64)
    ema = fd.EMA(p, decay=0.99, warmup=True)
    expected = None
    for t in range(1, 40):
        p[...] = rng.standard_normal(20)
        decay_t = min(0.99, (1 + t) / (10 + t))
        ema.step()
        assert ema.current_decay() == decay_t
        expected = p.copy() if expected is None else decay_t * expected + (1 - decay_t) * p
        np.testing.assert_allclose(ema.averages[0], expected, rtol=1e-12)
    assert ema.current_decay() == min(0.99, 40 / 49)
    assert fd.EMA(p, decay=0.99).current_decay() == 0.99


def test_swapped_evaluates_the_average_and_restores_bit_exact(rng):
    params = [random_array(rng, 1000, np.float32), random_array(rng, (3, 7), np.float64).reshape(3, 7)]
    swa = fd.SWA(params)
    for _ in range(4):
        for p in params:
            p += rng.standard_normal(p.shape).astype(p.dtype)
        swa.step()
    trained = snapshot(params)
    averages = snapshot(swa.averages)
    with swa.swapped():
        for p, a in zip(params, averages):
            assert_bitwise_equal(p, a)
        with pytest.raises(RuntimeError):
            swa.step()
    for p, t in zip(params, trained):
        assert_bitwise_equal(p, t)
    swa.copy_to_params()
    for p, a in zip(params, averages):
        assert_bitwise_equal(p, a)


def test_swap_allocates_nothing_per_swap(rng):
    fd.set_backend("kernel")  # the reference twin does allocate
    p = random_array(rng, 200_000, np.float64)
    ema = fd.EMA(p, decay=0.9)
    ema.update()
    ema.swap()
    ema.swap()  # warm caches
    tracemalloc.start()
    with ema.swapped():
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000, f"a swap allocated {peak} bytes"  # the arrays are 1.6 MB


def test_averager_refuses_before_anything_is_averaged(rng):
    swa = fd.SWA(random_array(rng, 4, np.float32), start=5)
    swa.step()
    with pytest.raises(RuntimeError):
        swa.swap()
    with pytest.raises(RuntimeError):
        swa.copy_to_params()


@pytest.mark.parametrize("kwargs", [dict(start=0), dict(every=0), dict(start=1.5)])
def test_averager_bad_arguments(kwargs, rng):
    with pytest.raises((ValueError, TypeError)):
        fd.SWA(random_array(rng, 4, np.float32), **kwargs)


@pytest.mark.parametrize("params", [lambda a: [a, a[:2]], lambda a: [a.astype(np.int64)], lambda a: [a[::2]],
                                    lambda a: 3.0])
def test_averager_bad_params(params, rng):
    with pytest.raises((ValueError, TypeError)):
        fd.EMA(params(random_array(rng, 6, np.float64)))


@pytest.mark.parametrize("cls, kwargs", [(fd.SWA, dict(start=2, every=3)), (fd.EMA, dict(decay=0.9, warmup=True))])
def test_averager_state_round_trip_resumes_exactly(cls, kwargs, rng):
    params = [random_array(rng, 300, np.float32), random_array(rng, 5, np.float64)]
    copy = snapshot(params)
    a, b = cls(params, **kwargs), cls(copy, **kwargs)
    for _ in range(8):
        for p in params:
            p += rng.standard_normal(p.shape).astype(p.dtype)
        a.step()
    b.load_state_dict(a.state_dict())
    for p, q in zip(params, copy):
        q[...] = p
    for _ in range(9):
        for p, q in zip(params, copy):
            p += rng.standard_normal(p.shape).astype(p.dtype)
            q[...] = p
        assert a.step() == b.step()
    assert (a.last_step, a.n_averaged) == (b.last_step, b.n_averaged)
    for x, y in zip(a.averages, b.averages):
        assert_bitwise_equal(x, y)
    with pytest.raises(ValueError):
        cls(params[:1], **kwargs).load_state_dict(a.state_dict())


# ---------------------------------------------------------------- against torch.optim.swa_utils


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_matches_torch_averaged_model(kind, rng):
    torch = pytest.importorskip("torch")
    swa_utils = torch.optim.swa_utils
    w = random_array(rng, 64, np.float64)
    module = torch.nn.Linear(8, 8, bias=False).double()
    if kind == "swa":
        averaged, ours = swa_utils.AveragedModel(module), fd.SWA(w)
    else:
        averaged = swa_utils.AveragedModel(module, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.95))
        ours = fd.EMA(w, decay=0.95)
    for _ in range(12):
        w[...] = rng.standard_normal(64)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w.reshape(8, 8)))
        averaged.update_parameters(module)
        ours.update()
    # PyTorch blends with lerp, which rounds differently.
    np.testing.assert_allclose(ours.averages[0], averaged.module.weight.detach().numpy().ravel(), rtol=1e-12)
