"""Type aliases shared by the annotations of the public API (no run-time role)."""

from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

#: a parameter, gradient or state buffer: a float32 or float64 array
FloatArray: TypeAlias = npt.NDArray[np.floating[Any]]
#: one array or a list of arrays (a whole model in one call)
FloatArrays: TypeAlias = FloatArray | Sequence[FloatArray]
#: what ``state_dict()`` returns and ``load_state_dict()`` takes
StateDict: TypeAlias = dict[str, Any]


class HasParamGroups(Protocol):
    """Anything with ``torch.optim``'s ``param_groups``: fastdescent's optimizers,
    ``torch.optim`` optimizers."""

    param_groups: list[dict[str, Any]]
