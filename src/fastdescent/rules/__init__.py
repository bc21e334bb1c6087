"""Functional faces of the update rules: validate, then call the chosen backend."""

from .averaging import ema_update, swa_update, swap_arrays
from .sgd import sgd_step

__all__ = ["sgd_step"]
from .adagrad import adagrad_step
from .adam import adam_step, adamw_step
from .rmsprop import rmsprop_step

__all__ += ["adagrad_step", "adam_step", "adamw_step", "rmsprop_step"]
__all__ += ["ema_update", "swa_update", "swap_arrays"]
