"""Validation shared by the adaptive rules' faces (beyond ``fastdescent._checks``)."""

import operator

from .. import _checks

#: The largest step: PyTorch's int64 step count (a float conversion of anything
#: beyond 2**1024 would raise OverflowError in the bias corrections).
MAX_STEP = 2**63 - 1


def step_number(step):
    """``step`` as a Python int >= 1: the 1-based index of the step being taken."""
    if type(step) is int and 1 <= step <= MAX_STEP:
        return step
    if isinstance(step, bool):
        raise TypeError(f"step must be an int, got {step!r}")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {step!r}") from None
    if step < 1:
        raise ValueError(f"step counts from 1 (the step being taken), got {step}")
    if step > MAX_STEP:
        raise ValueError(f"step must be <= 2**63 - 1, got {step}")
    return step


def betas_pair(betas):
    """``(beta1, beta2)`` as Python floats, each in [0, 1)."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}") from None
    return _checks.unit_interval("betas[0]", beta1), _checks.unit_interval("betas[1]", beta2)


def required_iff(name, buffers, needed, condition):
    """ValueError unless ``buffers`` is given exactly when ``needed`` (= ``condition``)."""
    if needed and buffers is None:
        raise ValueError(f"{condition} needs {name}")
    if not needed and buffers is not None:
        raise ValueError(f"{name} given, but they are only used when {condition}")
