"""Optimizer objects shaped like ``torch.optim``, on the fused kernels.

Parameter groups, one kernel call per (group, dtype) per step, an optional flat
arena, clipping by global norm or by value, a non-finite gradient guard, and
PyTorch-layout state dicts with atomic single-file checkpoints. One class per
rule (``SGD``, ``Adam``...), derived from the rule's spec by
:func:`optimizer_class`.
"""

from ..rules import SPECS
from .base import Optimizer, ParamList, ParamState
from .checkpoint import CheckpointError
from .classes import optimizer_class
from .clipping import global_norm

#: Every rule's optimizer class: class name -> class.
CLASSES = {spec.title: optimizer_class(spec, __name__) for spec in SPECS.values()}
globals().update(CLASSES)

__all__ = [*CLASSES, "CheckpointError", "Optimizer", "ParamList", "ParamState", "global_norm", "optimizer_class"]
