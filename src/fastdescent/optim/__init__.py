"""Optimizer objects shaped like ``torch.optim``, on the fused kernels.

Parameter groups, one kernel call per (group, dtype) per step, an optional flat
arena, clipping by global norm or by value, a non-finite gradient guard, and
PyTorch-layout state dicts with atomic single-file checkpoints.
"""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .base import Optimizer, ParamList, ParamState
from .checkpoint import CheckpointError
from .clipping import global_norm
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["Adagrad", "Adam", "AdamW", "CheckpointError", "Optimizer", "ParamList", "ParamState", "RMSprop", "SGD", "global_norm"]
