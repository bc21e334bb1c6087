"""The reference backend: every rule in plain NumPy, written from its equations.

Each function here has the same name, signature and in-place contract as its
kernel in ``fastdescent._kernels_*`` (the ``n_threads`` argument is accepted and
ignored), so the functional faces can call either. It is the oracle of the
equivalence tests and the "reference mode" users can switch to
(``backend="reference"`` or ``FASTDESCENT_BACKEND=reference``).
"""

from .averaging import ema, swa, swap
from .norms import max_abs, sum_squares
from .sgd import sgd

__all__ = ["sgd"]
from .adagrad import adagrad
from .adam import adam
from .rmsprop import rmsprop

__all__ += ["adagrad", "adam", "rmsprop"]
__all__ += ["max_abs", "sum_squares"]
__all__ += ["ema", "swa", "swap"]
