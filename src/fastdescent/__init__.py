"""fastdescent: fused, OpenMP-parallel CPU kernels for optimizer update rules.

Each update rule exists twice: a Cython kernel (one pass over memory, GIL
released, float32/float64) and a NumPy reference written from the equations. The
functional faces (``sgd_step``...) validate their input and call either backend.
``fastdescent.torch`` (needs PyTorch, imported only there) offers the rules as
drop-in ``torch.optim`` optimizers.
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
from . import rules, optim
from .rules import ema_update, swa_update, swap_arrays
from .optim import CheckpointError, global_norm
from . import schedules
from .averaging import EMA, SWA
from .plateau import EarlyStopping, ReduceLROnPlateau
from .schedules import Scheduler

# Every rule's functional face (``sgd_step``...) and optimizer class (``SGD``...),
# derived from its spec in fastdescent.rules.
globals().update(rules.FACES)
globals().update(optim.CLASSES)

__version__ = "0.1.0"

__all__ = [
    "effective_n_threads",
    "get_backend",
    "get_num_threads",
    "num_threads",
    "set_backend",
    "set_num_threads",
    "show_config",
    *rules.FACES,
    *optim.CLASSES,
    "CheckpointError",
    "global_norm",
    "EMA",
    "EarlyStopping",
    "ReduceLROnPlateau",
    "SWA",
    "Scheduler",
    "ema_update",
    "schedules",
    "swa_update",
    "swap_arrays",
]
