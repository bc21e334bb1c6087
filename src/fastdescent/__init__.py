"""fastdescent: fused, OpenMP-parallel CPU kernels for optimizer update rules.

Each update rule exists twice: a Cython kernel (one pass over memory, GIL
released, float32/float64) and a NumPy reference written from the equations. The
functional faces (``sgd_step``...) validate their input and call either backend.
"""

from ._config import (
    effective_n_threads,
    get_backend,
    get_num_threads,
    num_threads,
    set_backend,
    set_num_threads,
)
from ._info import show_config
from .rules import sgd_step
from .rules import adagrad_step, adam_step, adamw_step, rmsprop_step
from .optim import SGD, Adagrad, Adam, AdamW, CheckpointError, RMSprop, global_norm
from .rules import ema_update, swa_update, swap_arrays
from . import schedules
from .averaging import EMA, SWA
from .plateau import EarlyStopping, ReduceLROnPlateau
from .schedules import Scheduler

__version__ = "0.1.0"

__all__ = [
    "effective_n_threads",
    "get_backend",
    "get_num_threads",
    "num_threads",
    "set_backend",
    "set_num_threads",
    "sgd_step",
    "show_config",
    "adagrad_step",
    "adam_step",
    "adamw_step",
    "rmsprop_step",
]
__all__ += ["SGD", "Adagrad", "Adam", "AdamW", "CheckpointError", "RMSprop", "global_norm"]
__all__ += ["EMA", "EarlyStopping", "ReduceLROnPlateau", "SWA", "Scheduler", "ema_update", "schedules",
            "swa_update", "swap_arrays"]
