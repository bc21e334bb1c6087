"""PyTorch adapter: fastdescent kernels as drop-in ``torch.optim`` optimizers.

``fastdescent.torch.Adam`` (and one class per rule with a ``torch.optim`` peer:
``SGD``, ``Adagrad``, ``RMSprop``, ``AdamW``...) take the arguments of their
``torch.optim`` namesakes and step CPU tensors in place with the fused kernels;
see :mod:`fastdescent.torch.optimizers`. :func:`step_in_backward` makes
``loss.backward()`` itself update each parameter as soon as its gradient is
complete. Every class also takes ``state_dtype``, ``rounding``, ``seed`` and
``master_weights`` (:mod:`fastdescent.precision`): bfloat16 or int8 state,
bfloat16 and float16 parameters with or without a float32 master copy;
:func:`upcast_state_dict` makes such a state dict loadable by ``torch.optim``.
PyTorch is an optional dependency: ``import fastdescent`` never
imports it, this module does.
"""

try:
    import torch  # noqa: F401
except ImportError as error:
    raise ImportError(
        "fastdescent.torch needs PyTorch, which is not installed: pip install torch"
    ) from error

from ._backward import step_in_backward
from ._lowprec import upcast_state_dict
from .benchmark import benchmark_against_torch
from .optimizers import CLASSES

globals().update(CLASSES)

__all__ = [*CLASSES, "benchmark_against_torch", "step_in_backward", "upcast_state_dict"]
