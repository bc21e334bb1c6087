"""The reference backend: every rule in plain NumPy, written from its equations.

Each function here has the same name, signature and in-place contract as its
kernel in ``fastdescent._kernels_*`` (the ``n_threads`` argument is accepted and
ignored), so the functional faces can call either. It is the oracle of the
equivalence tests and the "reference mode" users can switch to
(``backend="reference"`` or ``FASTDESCENT_BACKEND=reference``).
"""

from .averaging import ema, swa, swap
from .sgd import sgd

__all__ = ["sgd"]
__all__ += ["ema", "swa", "swap"]
