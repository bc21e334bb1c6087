"""Hostile numbers (issue 14, defect 11): out-of-range counters raise ValueError in
both backends before anything is written, and "bit-identical" means identical NaN
positions and identical bits everywhere else: NaN payloads may differ."""

import numpy as np
import pytest

import fastdescent as fd
from fastdescent.catalog import RULES
from support import THREADS, assert_bitwise_equal, random_array

BACKENDS = ("kernel", "reference")


def adaptive_arrays(rng, n=9):
    p, g = random_array(rng, n, np.float32), random_array(rng, n, np.float32)
    return p, g, np.zeros(n, np.float32), np.zeros(n, np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("face", [fd.adam_step, fd.adamw_step, fd.adagrad_step])
@pytest.mark.parametrize("step", [2**63, 10**400])
def test_a_step_beyond_int64_raises_value_error(face, step, backend, rng):
    arrays = adaptive_arrays(rng)
    if face is fd.adagrad_step:
        arrays = arrays[:3]
    before = [a.copy() for a in arrays]
    with pytest.raises(ValueError, match="step"):
        face(*arrays, step=step, backend=backend)
    for a, b in zip(arrays, before):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_largest_step_is_taken(backend, rng):
    fd.adam_step(*adaptive_arrays(rng), step=2**63 - 1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_averaged", [2**63 - 1, 2**63, 10**30])
def test_swa_counts_beyond_the_kernel_raise_value_error(n_averaged, backend, rng):
    average, param = random_array(rng, 9, np.float64), random_array(rng, 9, np.float64)
    before = average.copy()
    with pytest.raises(ValueError, match="n_averaged"):
        fd.swa_update(average, param, n_averaged=n_averaged, backend=backend)
    assert_bitwise_equal(average, before)


def test_the_largest_swa_count_gives_the_same_average_in_both_backends(rng):
    average, param = random_array(rng, 9, np.float64), random_array(rng, 9, np.float64)
    results = []
    for backend in BACKENDS:
        a = average.copy()
        fd.swa_update(a, param, n_averaged=fd.rules.averaging.MAX_N_AVERAGED, backend=backend)
        results.append(a)
    assert_bitwise_equal(*results)


# ----------------------------------------------------------------- NaN payloads
def assert_equal_but_nan_payloads(actual, expected, name):
    """What the bit-identity promise covers: the same NaN positions, and every other
    element identical bit for bit (signed zeros and infinities included)."""
    nan = np.isnan(actual)
    assert np.array_equal(nan, np.isnan(expected)), f"{name}: NaN at other positions"
    assert_bitwise_equal(actual[~nan], expected[~nan], name)


def hostile(rng, n, dtype, positive=False):
    """Random data with NaN (of both signs and other payloads), infinities and zeros."""
    a = random_array(rng, n, dtype, positive=positive)
    where = rng.choice(n, size=n // 3, replace=False)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0], dtype)
    a[where] = specials[rng.integers(0, len(specials), where.size)]
    if dtype == np.float32:  # a quiet NaN with another payload
        a.view(np.uint32)[where[:3]] = 0x7FC01234
    return np.abs(a) if positive else a


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(RULES))
def test_kernel_and_reference_agree_on_hostile_values_up_to_nan_payloads(name, dtype, n_threads, rng, tiny_parts):
    rule = RULES[name]
    n = 4099
    shape = rule.spec.sample_shape(n)  # 1-D, or a matrix for a tensorwise rule
    state = {"param": hostile(rng, n, dtype).reshape(shape), "grad": hostile(rng, n, dtype).reshape(shape)}
    for buffer, sample in zip(rule.state, rule.make_state(rng, n, dtype)):
        if sample is not None:  # (None: a buffer this shape keeps none of)
            state[buffer] = hostile(rng, sample.size, dtype,
                                    positive=bool(np.all(sample >= 0))).reshape(sample.shape)  # accumulators stay >= 0
    results = {}
    for backend in BACKENDS:
        arrays = {k: v.copy() for k, v in state.items()}
        for t in (1, 2, 3):
            rule.step(arrays["param"], arrays["grad"], *(arrays.get(b) for b in rule.state), t=t, backend=backend,
                      n_threads=n_threads if backend == "kernel" else 1)
        results[backend] = arrays
    for buffer in state:
        assert_equal_but_nan_payloads(results["kernel"][buffer], results["reference"][buffer], buffer)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("update", ["swa", "ema", "swap"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_averaging_agrees_on_hostile_values_up_to_nan_payloads(update, dtype, rng, tiny_parts):
    average, param = hostile(rng, 4099, dtype), hostile(rng, 4099, dtype)
    results = []
    for backend in BACKENDS:
        a, p = average.copy(), param.copy()
        if update == "swa":
            fd.swa_update(a, p, n_averaged=3, backend=backend, n_threads=2)
        elif update == "ema":
            fd.ema_update(a, p, decay=0.9, backend=backend, n_threads=2)
        else:
            fd.swap_arrays(a, p, backend=backend, n_threads=2)
            assert_bitwise_equal(p, average)  # a swap is exact, NaN payloads included
        results.append(a)
    assert_equal_but_nan_payloads(*results, update)


def test_a_loaded_step_count_leaves_room_for_the_next_step(rng):
    """The optimizers' next step is the saved count + 1: a count that would take it to
    2**63 is refused when loaded, and nothing changes."""
    p = rng.standard_normal(5)
    opt = fd.Adam([p])
    opt.step([rng.standard_normal(5)])
    sd = opt.state_dict()
    sd["state"][0]["step"] = 2**63 - 1
    before = p.copy()
    with pytest.raises(ValueError, match="2\\*\\*63"):
        opt.load_state_dict(sd)
    assert opt.state[0]["step"] == 1 and np.array_equal(p, before)
    sd["state"][0]["step"] = 2**63 - 2
    opt.load_state_dict(sd)
    opt.step([rng.standard_normal(5)])
    assert opt.state[0]["step"] == 2**63 - 1
