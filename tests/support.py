"""Shared test helpers: random data, snapshots and bitwise comparison."""

import numpy as np

DTYPES = (np.float32, np.float64)
#: Lengths of the equivalence grid: empty, scalar-like, shorter than one vector,
#: odd and past a page, and about a million (several threads' worth).
SIZES = (0, 1, 7, 4097, 1_000_003)
THREADS = (1, 2)


def random_array(rng, n, dtype, scale=1.0, positive=False):
    """Fresh normal (or log-normal, if ``positive``) data: never zeros, never constant."""
    a = rng.standard_normal(n) * scale
    if positive:
        a = np.exp(a)
    return a.astype(dtype)


def random_like(rng, a, **kwargs):
    """Fresh random data (see random_array) of the shape and dtype of array ``a``."""
    return random_array(rng, a.size, a.dtype, **kwargs).reshape(a.shape)


def snapshot(arrays):
    return [None if a is None else a.copy() for a in arrays]


def assert_unchanged(arrays, before):
    for a, b in zip(arrays, before):
        if a is not None:
            assert np.array_equal(a, b, equal_nan=True), "an array was modified"


def step_optimizer(opt, grads):
    """``opt.step(grads)``, or for a flat optimizer the step on ``grads`` copied into
    its gradient views; asserts that the step updated the parameters."""
    if opt.flat:
        for view, grad in zip(opt.grads, grads):
            view[...] = grad
        assert opt.step()
    else:
        assert opt.step(grads)


def assert_bitwise_equal(actual, expected, name=""):
    """Equal bit for bit (so -0.0 != 0.0 and NaN payloads must match)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    unsigned = np.dtype(f"u{actual.dtype.itemsize}")  # any float or int dtype (bfloat16 and int8 state too)
    a, b = actual.view(unsigned), expected.view(unsigned)
    mismatch = np.flatnonzero(a != b)
    if mismatch.size:
        i = mismatch[0]
        raise AssertionError(
            f"{name}: {mismatch.size} of {a.size} elements differ; first at {i}: "
            f"{actual.flat[i]!r} != {expected.flat[i]!r}"
        )


def check_backends_agree(step, state, grads, lrs, n_threads, bitwise=True):
    """Drive the kernel and the reference through the same steps; compare every buffer.

    ``state`` maps buffer names to arrays (the parameter and the rule's state);
    ``step(backend, state, grad, lr, t, n_threads)`` takes step ``t`` in place.
    Each backend works on its own copy; all buffers are compared after every step.
    """
    kernel = {k: v.copy() for k, v in state.items()}
    reference = {k: v.copy() for k, v in state.items()}
    for t, (grad, lr) in enumerate(zip(grads, lrs)):
        step("kernel", kernel, grad, lr, t, n_threads)
        step("reference", reference, grad, lr, t, 1)
        for name in state:
            assert_bitwise_equal(kernel[name], reference[name], f"{name} after step {t + 1}")
    return kernel
