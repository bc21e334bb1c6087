"""Weight averaging: Stochastic Weight Averaging, exponential moving averages, and
the in-place exchange that swaps an average into the parameters and back.

The objects :class:`fastdescent.averaging.SWA` and :class:`fastdescent.averaging.EMA`
keep the averages and decide when to update them; these faces are the fused
kernels they call.
"""

import sys

from .. import _checks
from .._config import effective_n_threads, resolve_backend

#: The largest ``n_averaged``: the kernel counts ``n_averaged + 1`` in a C ``Py_ssize_t``.
MAX_N_AVERAGED = sys.maxsize - 1


def _resolve(params, averages, writable, names):
    indexed, params, averages = _checks.tensor_lists(params, averages)
    _checks.check_buffers(names, (params, averages), writable, indexed)
    return params, averages


def swa_update(averages, params, *, n_averaged, n_threads=None, backend=None):
    r"""Fold the parameters into their equal running average, in place (SWA).

    With :math:`n` = ``n_averaged`` snapshots already in the average,

    .. math:: \bar\theta \leftarrow \bar\theta + \frac{\theta - \bar\theta}{n + 1}

    so that after :math:`N` calls :math:`\bar\theta` is the mean of the
    :math:`N` parameter snapshots; :math:`n = 0` copies the parameters (the
    average of one snapshot is itself, whatever the array held before).
    Stochastic Weight Averaging: Izmailov, Podoprikhin, Garipov, Vetrov & Wilson,
    "Averaging Weights Leads to Wider Optima and Better Generalization" (UAI 2018);
    PyTorch's ``torch.optim.swa_utils.AveragedModel``.

    Parameters
    ----------
    averages : ndarray or list of ndarray
        The running averages, updated in place; each shaped like its parameter.
    params : ndarray or list of ndarray
        C-contiguous float32 or float64 arrays, all of one dtype; read only.
    n_averaged : int, 0 <= n_averaged <= MAX_N_AVERAGED (2**63 - 2 on 64-bit systems)
    n_threads, backend : see :func:`fastdescent.sgd_step`.
    """
    n_averaged = _checks.integer("n_averaged", n_averaged, 0)
    if n_averaged > MAX_N_AVERAGED:
        raise ValueError(f"n_averaged must be <= {MAX_N_AVERAGED}, got {n_averaged}")
    params, averages = _resolve(params, averages, (False, True), ("param", "average"))
    resolve_backend(backend).swa(averages, params, n_averaged=n_averaged, n_threads=effective_n_threads(n_threads))


def ema_update(averages, params, *, decay, n_threads=None, backend=None):
    r"""Blend the parameters into their exponential moving average, in place.

    .. math:: \bar\theta \leftarrow \beta \bar\theta + (1 - \beta)\, \theta

    with :math:`\beta` = ``decay`` in [0, 1). Polyak & Juditsky (1992) for iterate
    averaging; the exponential form as in TensorFlow's ``ExponentialMovingAverage``
    and PyTorch's ``swa_utils.get_ema_multi_avg_fn`` (which computes the same
    blend as a ``lerp``, rounded differently).

    Parameters
    ----------
    averages, params : as in :func:`swa_update`
    decay : float in [0, 1)
    n_threads, backend : see :func:`fastdescent.sgd_step`.
    """
    decay = _checks.unit_interval("decay", decay)
    params, averages = _resolve(params, averages, (False, True), ("param", "average"))
    resolve_backend(backend).ema(averages, params, decay=decay, n_threads=effective_n_threads(n_threads))


def swap_arrays(first, second, *, n_threads=None, backend=None):
    """Exchange the contents of two arrays (or two lists of arrays) in place, in
    one pass and without a temporary: swaps averaged weights into the
    parameters for evaluation, and back. Bit-exact (NaN payloads included).

    Both must be writable, C-contiguous float32 or float64, shaped alike, and
    must not overlap.
    """
    first, second = _resolve(first, second, (True, True), ("first", "second"))
    resolve_backend(backend).swap(first, second, n_threads=effective_n_threads(n_threads))
