"""Functional faces of the update rules: validate, then call the chosen backend."""

from .averaging import ema_update, swa_update, swap_arrays
from .sgd import sgd_step

__all__ = ["sgd_step"]
__all__ += ["ema_update", "swa_update", "swap_arrays"]
