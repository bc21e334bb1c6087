"""Adaptive rules: kernel vs reference, bit for bit, over the whole grid."""

import numpy as np
import pytest

from adaptive_configs import CONFIGS, driver, make_state, take_step
from support import DTYPES, SIZES, THREADS, check_backends_agree, random_array

STEPS = 10


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_matches_reference(name, dtype, n, n_threads, rng, kernel_variant):
    face, options = CONFIGS[name]
    grads = [random_array(rng, n, dtype) for _ in range(STEPS)]
    lrs = [0.05 * 0.8**t for t in range(STEPS)]  # the rate changes every step
    state = make_state(rng, n, dtype, face, options)
    final = check_backends_agree(driver(face, options), state, grads, lrs, n_threads)
    for key, before in state.items():
        if n and key != "max_exp_avg_sq":  # the maximum may legitimately stay put
            assert not np.array_equal(final[key], before), f"the steps left {key} unchanged"
        assert np.all(np.isfinite(final[key])), key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["adagrad-lr_decay-wd", "rmsprop-centered-momentum-wd", "adamw-amsgrad-maximize"])
def test_multi_tensor_matches_per_array(name, dtype, rng, tiny_parts):
    """Lists of mixed sizes, split among 2 threads at arbitrary points, equal per-array steps."""
    face, options = CONFIGS[name]
    sizes = [0, 1, 130, 7, 0, 4097, 65, 3000, 1]
    states = [make_state(rng, n, dtype, face, options) for n in sizes]
    grads = [random_array(rng, n, dtype) for n in sizes]
    together = [{k: v.copy() for k, v in s.items()} for s in states]
    alone = [{k: v.copy() for k, v in s.items()} for s in states]
    stacked = {k: [s[k] for s in together] for k in together[0]}
    take_step(face, options, stacked, grads, lr=0.1, step=3, n_threads=2)
    for s, g in zip(alone, grads):
        take_step(face, options, s, g, lr=0.1, step=3, n_threads=1)
    for a, b in zip(together, alone):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
