"""Validation of hyperparameters and of the arrays handed to a rule.

Every functional face runs these before it touches memory, for either backend, so
a bad call raises and changes nothing.
"""

import math
import operator
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np

from ._runtime import MAX_STEP, check_buffers, checked_lists  # noqa: F401 - MAX_STEP: step counts stay below it


def real(name, value):
    """``value`` as a Python float; TypeError if it is not a real number."""
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, (Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def nonnegative(name, value):
    value = real(name, value)
    if not 0.0 <= value < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def finite(name, value):
    value = real(name, value)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def unit_interval(name, value):
    """A coefficient in [0, 1): momentum, betas, decay rates."""
    value = real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def closed_unit_interval(name, value):
    value = real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def positive(name, value):
    value = real(name, value)
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def integer(name, value, minimum):
    """``value`` as a Python int >= ``minimum``; TypeError if it is not an integer."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def open_unit_interval(name, value):
    """A factor in (0, 1): a decay or reduction factor that must shrink the value."""
    value = real(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def state_entries(owner, state, keys):
    """The values of ``keys`` in a saved state dict, in order: what a
    ``load_state_dict`` reads before it validates each one. TypeError unless
    ``state`` is a dict, ValueError unless its keys are exactly ``keys``."""
    if not isinstance(state, Mapping):
        raise TypeError(f"the state of a {owner} must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    unknown = [k for k in state if k not in keys]
    if missing or unknown:
        raise ValueError(f"the state of a {owner} needs exactly the entries {list(keys)}; "
                         f"missing {missing}, unknown {unknown}")
    return [state[k] for k in keys]


def real_list(name, values):
    """``values`` as a list of Python floats; TypeError unless it is a list or tuple of reals."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of numbers, got {type(values).__name__}")
    return [real(f"{name}[{i}]", v) for i, v in enumerate(values)]


def boolean(name, value):
    """``value`` as a Python bool; TypeError unless it is a bool (NumPy's too)."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")




def step_number(name, step):
    """``step`` as a Python int in [1, 2**63): the 1-based index of the step being taken."""
    if type(step) is int and 1 <= step < MAX_STEP:
        return step
    if isinstance(step, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {step!r}")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {step!r}") from None
    if step < 1:
        raise ValueError(f"{name} counts from 1 (the step being taken), got {step}")
    if step >= MAX_STEP:
        raise ValueError(f"{name} must be below 2**63, got {step}")
    return step


def betas_pair(name, betas):
    """``(beta1, beta2)`` as Python floats, each in [0, 1)."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of floats, got {betas!r}") from None
    return unit_interval(f"{name}[0]", beta1), unit_interval(f"{name}[1]", beta2)


def tensor_lists(param, *others):
    """Normalize the array arguments of a face to lists, one entry per tensor.

    A face accepts either one array per role or a sequence of arrays per role
    (a multi-tensor step). Returns ``(indexed, param_list, *other_lists)``; an
    absent role (None) stays None.
    """
    if isinstance(param, np.ndarray):
        return (False, [param], *[None if o is None else [o] for o in others])
    if isinstance(param, (list, tuple)):
        return (True, list(param), *(None if o is None else _as_list(o) for o in others))
    raise TypeError(f"params must be a numpy.ndarray or a list of them, got {type(param).__name__}")


def _as_list(value):
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"expected a list of arrays to match the list of params, got {type(value).__name__}")


def validated_lists(state_names, params, grads, *states):
    """The arrays of one update as lists (one entry per tensor), all validated.

    ``params`` and every state buffer (roles ``state_names``) are written, ``grads``
    only read; no written buffer may share memory with any other buffer of the
    call. Returns ``[params, grads, *states]``; an absent state stays None.
    """
    return list(checked_lists(("param", "grad", *state_names), (params, grads, *states),
                              (True, False) + (True,) * len(states)))


def shaped_list(name, value, params, shapes, indexed):
    """The arrays of a state buffer shaped otherwise than its parameters, validated.

    ``shapes[k]`` is the shape parameter k's array must have, or None if that
    parameter keeps none (its entry must then be None). ``value`` is None (no
    parameter keeps one), one array (the face got one parameter) or a sequence
    with one entry per parameter. Returns a list with one entry per parameter:
    each a writable, aligned, C-contiguous array of its parameter's dtype and of
    its shape, or None. Raises TypeError or ValueError naming the entry.
    """
    if value is None:
        return [None] * len(params)
    if not indexed:
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray for one parameter, got {type(value).__name__}")
        value = [value]
    elif not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of arrays to match the list of params, got {type(value).__name__}")
    if len(value) != len(params):
        raise ValueError(f"{len(value)} {name} arrays for {len(params)} parameters")
    arrays = list(value)
    for k, (a, p, shape) in enumerate(zip(arrays, params, shapes)):
        label = f"{name}[{k}]" if indexed else name
        if shape is None:
            if a is not None:
                raise ValueError(f"{label} given, but a parameter of shape {p.shape} keeps none")
            continue
        if a is None:
            raise ValueError(f"{label} is None, but a parameter of shape {p.shape} keeps one of shape {shape}")
        check_buffers((label,), ([a],), (True,), False)
        if a.dtype != p.dtype:
            raise TypeError(f"{label} has dtype {a.dtype}, but its parameter has dtype {p.dtype}: dtypes must match")
        if a.shape != shape:
            raise ValueError(f"{label} has shape {a.shape}, but a parameter of shape {p.shape} keeps one of shape {shape}")
    return arrays


def check_disjoint(written, read_only, indexed):
    """ValueError if an array of ``written`` shares memory with any other array of
    the call, of any parameter (``written`` and ``read_only``: name -> list with an
    entry per parameter, entries may be None, or None). Read-only arrays may overlap
    each other. The arrays are C-contiguous: two share memory iff their byte ranges
    intersect, which one sort and sweep of the ranges finds (as check_buffers)."""
    spans = []
    for writable, roles in ((True, written), (False, read_only)):
        for name, arrays in roles.items():
            for k, a in enumerate(arrays or ()):
                if a is not None and a.nbytes:
                    start = a.__array_interface__["data"][0]
                    spans.append((start, start + a.nbytes, writable, f"{name}[{k}]" if indexed else name))
    spans.sort()
    end_any = end_written = 0
    last_any = last_written = None
    for start, end, writable, label in spans:
        other = last_any if writable and last_any is not None and start < end_any else None
        if other is None and last_written is not None and start < end_written:
            other = last_written
        if other is not None:
            raise ValueError(f"{label} shares memory with {other}; a buffer that is written may share no byte "
                             "with any other buffer of the update")
        if end > end_any:
            end_any, last_any = end, label
        if writable and end > end_written:
            end_written, last_written = end, label


__all__ = ["check_buffers", "check_disjoint", "checked_lists", "shaped_list", "tensor_lists", "validated_lists"]
