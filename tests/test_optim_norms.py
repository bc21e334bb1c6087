"""The global-norm kernel: bit-identical to its reference twin, independent of the
thread count and of how the elements are split into arrays, equal to
numpy.linalg.norm within rounding, and safe from overflow and underflow."""

import math

import numpy as np
import pytest

import fastdescent as fd
from fastdescent import _config, reference
from support import DTYPES, THREADS, assert_bitwise_equal, random_array, snapshot, assert_unchanged

#: Mixed sizes: empty arrays, one large among many small, odd lengths across block edges.
SIZES = [0, 1, 7, 130, 0, 4097, 65, 100_003, 3000, 1, 16, 4096, 0]


def random_arrays(rng, dtype, sizes=SIZES, scale=1.0):
    return [random_array(rng, n, dtype, scale=scale) for n in sizes]


def kernels():
    return _config.resolve_backend("kernel")


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_squares_kernel_matches_reference(dtype, n_threads, rng, kernel_variant, tiny_parts):
    arrays = random_arrays(rng, dtype)
    for scale in (1.0, 2.0**-40, 2.0**30):
        got = kernels().sum_squares(arrays, clip_value=math.inf, scale=scale, n_threads=n_threads)
        assert got == reference.sum_squares(arrays, clip_value=math.inf, scale=scale)
        assert got > 0


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clamping_kernel_matches_reference(dtype, n_threads, rng, kernel_variant, tiny_parts):
    arrays = random_arrays(rng, dtype)
    arrays[3][[0, 5, 77]] = [np.nan, np.inf, -np.inf]
    arrays[7][12345] = np.nan
    arrays[7][:10] = -0.0
    clamped_by_kernel, clamped_by_reference = snapshot(arrays), snapshot(arrays)
    got = kernels().sum_squares(clamped_by_kernel, clip_value=0.5, scale=1.0, n_threads=n_threads)
    expected = reference.sum_squares(clamped_by_reference, clip_value=0.5, scale=1.0)
    assert math.isnan(got) and math.isnan(expected)
    for k, (a, b, original) in enumerate(zip(clamped_by_kernel, clamped_by_reference, arrays)):
        assert_bitwise_equal(a, b, f"array {k}")
        np.testing.assert_array_equal(a, np.clip(original, -0.5, 0.5))
    finite = [a for k, a in enumerate(clamped_by_kernel) if k not in (3, 7)]
    kept = kernels().sum_squares(finite, clip_value=0.5, scale=1.0, n_threads=n_threads)
    assert kept == reference.sum_squares(finite, clip_value=0.5, scale=1.0) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_abs_kernel_matches_reference(dtype, rng, kernel_variant, tiny_parts):
    arrays = random_arrays(rng, dtype)
    assert kernels().max_abs(arrays, n_threads=2) == reference.max_abs(arrays)
    assert kernels().max_abs(arrays, n_threads=2) == max(np.abs(a).max(initial=0.0) for a in arrays)
    arrays[5][3] = np.nan  # skipped
    arrays[8][7] = -1e6
    assert kernels().max_abs(arrays, n_threads=2) == reference.max_abs(arrays) == 1e6
    arrays[1][0] = -np.inf
    assert kernels().max_abs(arrays, n_threads=2) == np.inf


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_is_independent_of_threads_and_split(dtype, rng, tiny_parts):
    arrays = random_arrays(rng, dtype)
    norms = {fd.global_norm(arrays, n_threads=n) for n in (1, 2)}
    norms.add(fd.global_norm([np.concatenate(arrays)], n_threads=2))
    norms.add(fd.global_norm([np.concatenate(arrays[:4]), np.concatenate(arrays[4:])], n_threads=1))
    norms.add(fd.global_norm(arrays, backend="reference"))
    assert len(norms) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_equals_numpy_within_rounding(dtype, rng):
    arrays = random_arrays(rng, dtype)
    exact = np.linalg.norm(np.concatenate(arrays).astype(np.float64))
    assert fd.global_norm(arrays) == pytest.approx(exact, rel=1e-13)
    assert fd.global_norm(arrays[0]) == 0.0  # one empty array
    assert fd.global_norm([]) == 0.0


def test_mixed_dtypes_sum_both(rng):
    a, b = random_array(rng, 1000, np.float32), random_array(rng, 999, np.float64)
    expected = math.sqrt(fd.global_norm([a]) ** 2 + fd.global_norm([b]) ** 2)
    assert fd.global_norm([a, b]) == pytest.approx(expected, rel=1e-14)


def test_large_float32_does_not_overflow(rng):
    arrays = random_arrays(rng, np.float32, scale=1e37)  # squares far beyond float32
    with np.errstate(over="ignore"):
        assert np.isinf(np.linalg.norm(np.concatenate(arrays)))  # float32 numpy overflows
    exact = np.linalg.norm(np.concatenate(arrays).astype(np.float64))
    assert fd.global_norm(arrays) == pytest.approx(exact, rel=1e-13)


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-310])
def test_float64_overflow_and_underflow_are_rescaled(scale, rng, tiny_parts):
    arrays = random_arrays(rng, np.float64, scale=scale)
    unit = np.linalg.norm(np.concatenate(arrays) / scale)
    got = {fd.global_norm(arrays, n_threads=n) for n in (1, 2)}
    got.add(fd.global_norm(arrays, backend="reference"))
    assert len(got) == 1
    # Subnormal inputs (1e-310) carry only a few significant bits themselves.
    assert got.pop() == pytest.approx(unit * scale, rel=1e-13 if scale > 1e-300 else 1e-3)


def test_float64_norm_beyond_the_range_is_inf():
    assert fd.global_norm([np.full(4, 1.5e308)]) == math.inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_elements_give_a_non_finite_norm(dtype, bad, rng):
    arrays = random_arrays(rng, dtype)
    arrays[7][50_000] = bad
    norm = fd.global_norm(arrays)
    assert math.isnan(norm) if np.isnan(bad) else norm == math.inf


def test_bad_input_raises(rng):
    a = random_array(rng, 10, np.float32)
    with pytest.raises(TypeError, match="arrays\\[1\\]"):
        fd.global_norm([a, [1.0, 2.0]])
    with pytest.raises(TypeError):
        fd.global_norm([np.arange(3)])
    with pytest.raises(ValueError, match="contiguous"):
        fd.global_norm([np.repeat(a, 2)[::2]])
    before = snapshot([a])
    fd.global_norm([a])
    assert_unchanged([a], before)
