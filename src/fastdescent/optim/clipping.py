"""The global gradient norm, fused with the non-finite check and clipping by value.

The kernels (``sum_squares``, ``max_abs`` in src/kernels/norms.pxi, reference twin in
fastdescent/reference/norms.py) reduce one list of arrays of one dtype in a fixed
blocked order, so the norm is the same for any thread count and for any split of
the same elements into arrays (a flat arena or many arrays).
"""

import math

import numpy as np

from .. import _checks
from .._config import effective_n_threads, resolve_backend

# A float64 sum of squares below this may have lost bits to underflow (squares below
# 2**-1022 are subnormal); it is recomputed with the elements scaled up.
_UNDERFLOW_RISK = 2.0**-900
# Rescaling never multiplies by more than 2**this, so the scale itself stays finite.
_MAX_SHIFT = 1000


def bucket_norm(buckets, *, clip_value=math.inf, n_threads, backend=None):
    r"""The 2-norm of every element of ``buckets`` (lists of validated arrays, one dtype each).

    :math:`\|g\|_2 = \sqrt{\sum_i g_i^2}`, the squares summed in double, bucket by
    bucket in order. A non-finite element makes the result ``inf`` or ``nan``; a
    finite result therefore proves every element finite (the check comes free with
    the norm). With a finite ``clip_value`` every element is first clamped in place
    to ``[-clip_value, clip_value]`` (NaN stays NaN) and the norm is that of the
    clamped values.

    float32 squares cannot overflow or underflow in double. For float64, a sum that
    overflows or underflows is recomputed with every element multiplied by a power
    of two :math:`2^{-e}` chosen from the largest magnitude (LAPACK's ``dnrm2``
    idea), and the result scaled back by :math:`2^{e}`; that costs two more reads,
    only in that rare case.
    """
    kernels = resolve_backend(backend)
    total = 0.0
    for arrays in buckets:
        total += kernels.sum_squares(arrays, clip_value=clip_value, scale=1.0, n_threads=n_threads)
    if math.isnan(total):
        return total
    if _UNDERFLOW_RISK <= total < math.inf or not _has_float64(buckets):
        return math.sqrt(total)
    biggest = max(kernels.max_abs(arrays, n_threads=n_threads) for arrays in buckets)
    if biggest == 0.0 or biggest == math.inf:
        return biggest
    shift = min(-math.frexp(biggest)[1], _MAX_SHIFT)
    scale = math.ldexp(1.0, shift)
    total = 0.0
    for arrays in buckets:  # already clamped: clamping again would change nothing
        total += kernels.sum_squares(arrays, clip_value=math.inf, scale=scale, n_threads=n_threads)
    try:
        return math.ldexp(math.sqrt(total), -shift)
    except OverflowError:  # the norm itself exceeds the float64 range
        return math.inf


def _has_float64(buckets):
    return any(arrays and arrays[0].dtype == np.float64 for arrays in buckets)


def dtype_buckets(arrays):
    """``arrays`` split by dtype, in order of first appearance."""
    by_dtype = {}
    for a in arrays:
        by_dtype.setdefault(a.dtype, []).append(a)
    return list(by_dtype.values())


def global_norm(arrays, *, n_threads=None, backend=None):
    r"""The 2-norm of all elements of ``arrays`` taken together, as one vector.

    :math:`\sqrt{\sum_k \sum_i a_{k,i}^2}` (the norm ``torch.nn.utils.clip_grad_norm_``
    clips by; Pascanu et al. 2013, "On the difficulty of training recurrent neural
    networks"). The squares are summed in double in a fixed blocked order, so the
    result is the same for any thread count and does not overflow for large float32
    values; float64 sums that would overflow or underflow are rescaled by a power
    of two. Returns ``inf`` or ``nan`` if any element is not finite.

    Parameters
    ----------
    arrays : ndarray or list of ndarray
        C-contiguous float32 or float64 arrays (dtypes may be mixed; each dtype
        is reduced by one kernel call). Read only.
    n_threads, backend
        As for the update rules.
    """
    _, arrays = _checks.tensor_lists(arrays)
    for k, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"arrays[{k}] must be a numpy.ndarray, got {type(a).__name__}")
    for dtype_arrays in dtype_buckets(arrays):
        _checks.check_buffers(("arrays",), (dtype_arrays,), (False,))
    return bucket_norm(dtype_buckets(arrays), n_threads=effective_n_threads(n_threads), backend=backend)
