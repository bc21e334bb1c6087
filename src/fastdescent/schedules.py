r"""Hyperparameter schedules: pure functions of the step, and a scheduler that applies them.

A *schedule* maps a step :math:`t \ge 0` to a value. It is a pure function: call it
with one step to get a Python float, or with a NumPy array of steps to get an array
of values (to plot a schedule, or to check it against its closed form)::

    s = fd.schedules.cosine(0.1, T_max=1000, eta_min=1e-4)
    s(0)                       # 0.1
    s(np.arange(1001))         # the whole curve, float64

Schedules give the value itself, not a factor of the optimizer's learning rate, so
one schedule can drive any hyperparameter: the learning rate, the momentum, a beta,
the weight decay. :class:`Scheduler` binds a schedule to a hyperparameter of an
optimizer's parameter groups and writes the value at every ``step()``.

Argument names follow ``torch.optim.lr_scheduler`` (``T_max``, ``eta_min``,
``gamma``, ``step_size``, ``milestones``...), with ``*_lr`` read as ``*_value``
because a schedule is not only for learning rates. Where PyTorch defines a
schedule by recursion, ours is the closed form (equal up to rounding).

Composition: :func:`warmup` puts a linear warm-up before any schedule and
:func:`join` runs schedules one after another (optax's ``join_schedules``);
:class:`fastdescent.plateau.ReduceLROnPlateau` can scale a :class:`Scheduler`'s
values down when a metric stalls.
"""

import math
import re
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from . import _checks
from ._typing import FloatArray, HasParamGroups, StateDict

#: a schedule's vectorized body: 1-D float64 steps -> 1-D values
_Values = Callable[[npt.NDArray[np.float64]], npt.NDArray[Any]]

# --------------------------------------------------------------------------
# Argument checks shared by the schedules, the plateau rules and the averagers.


# --------------------------------------------------------------------------
# The schedule type.


def _as_steps(step):
    """``(steps, shape)``: steps as a 1-D float64 array; ``shape`` None for a scalar."""
    if isinstance(step, (bool, np.bool_)):
        raise TypeError(f"step must be a number or an array of numbers, got {step!r}")
    if isinstance(step, (Integral, float, np.integer, np.floating)):
        t = float(step)
        if not 0.0 <= t < math.inf:
            raise ValueError(f"step must be finite and >= 0, got {step!r}")
        return np.array([t]), None
    steps = np.asarray(step)
    if steps.dtype.kind not in "iuf":
        raise TypeError(f"steps must be integers or reals, got an array of dtype {steps.dtype}")
    flat = steps.astype(np.float64).ravel()
    if not np.all((flat >= 0.0) & (flat < math.inf)):  # also rejects NaN
        raise ValueError("steps must be finite and >= 0")
    return flat, steps.shape


class Schedule:
    """A value as a pure function of the step (built by the functions of this module).

    ``schedule(step)`` returns a Python float for a scalar step and a float64 array
    shaped like ``step`` for an array of steps. Steps must be finite and >= 0; they
    may be fractional (PyTorch allows fractional epochs for warm restarts).
    """

    __slots__ = ("name", "params", "_values")

    def __init__(self, name: str, values: _Values, **params: Any) -> None:
        self.name = name
        self.params = params
        self._values = values  # 1-D float64 steps -> 1-D float64 values

    @overload
    def __call__(self, step: float) -> float: ...

    @overload
    def __call__(self, step: npt.NDArray[Any] | Sequence[float]) -> npt.NDArray[np.float64]: ...

    def __call__(self, step: float | npt.ArrayLike) -> float | npt.NDArray[np.float64]:
        steps, shape = _as_steps(step)
        values = self._values(steps)
        return float(values[0]) if shape is None else values.reshape(shape)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"


def _schedule(name, value):
    if not isinstance(value, Schedule):
        raise TypeError(f"{name} must be a fastdescent Schedule (see from_function), got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------
# Schedules.


def constant(value: float) -> Schedule:
    """The same value at every step (optax ``constant_schedule``)."""
    value = _checks.finite("value", value)
    return Schedule("constant", lambda t: np.full(t.shape, value), value=value)


def step_decay(init_value: float, step_size: float, gamma: float = 0.1) -> Schedule:
    r"""Step decay ("simulated annealing" in older texts): multiply by ``gamma``
    every ``step_size`` steps, :math:`v_t = v_0 \gamma^{\lfloor t / s \rfloor}`
    (PyTorch ``StepLR``).
    """
    init_value = _checks.finite("init_value", init_value)
    step_size = _checks.positive("step_size", step_size)
    gamma = _checks.open_unit_interval("gamma", gamma)
    return Schedule("step_decay", lambda t: init_value * gamma ** np.floor(t / step_size),
                    init_value=init_value, step_size=step_size, gamma=gamma)


def multi_step(init_value: float, milestones: Sequence[float], gamma: float = 0.1) -> Schedule:
    r"""Multiply by ``gamma`` at each milestone: :math:`v_t = v_0 \gamma^{|\{m \le t\}|}`
    (PyTorch ``MultiStepLR``; optax ``piecewise_constant_schedule`` with equal scales).
    ``milestones`` must be strictly increasing and positive.
    """
    init_value = _checks.finite("init_value", init_value)
    gamma = _checks.open_unit_interval("gamma", gamma)
    milestones = _increasing("milestones", milestones)
    edges = np.array(milestones, dtype=np.float64)
    return Schedule("multi_step", lambda t: init_value * gamma ** np.searchsorted(edges, t, side="right"),
                    init_value=init_value, milestones=milestones, gamma=gamma)


def exponential(init_value: float, gamma: float) -> Schedule:
    r"""Exponential decay :math:`v_t = v_0 \gamma^t` (PyTorch ``ExponentialLR``; optax
    ``exponential_decay`` with ``transition_steps=1``). ``gamma > 1`` is allowed: an
    exponentially growing rate is the learning-rate range test (Smith 2017).
    """
    init_value = _checks.finite("init_value", init_value)
    gamma = _checks.positive("gamma", gamma)
    return Schedule("exponential", lambda t: init_value * gamma**t, init_value=init_value, gamma=gamma)


def inverse_time(init_value: float, decay_rate: float, power: float = 1.0) -> Schedule:
    r"""Inverse-time decay :math:`v_t = v_0 / (1 + \lambda t)^p` (Keras
    ``InverseTimeDecay`` for :math:`p = 1`; scikit-learn's ``invscaling`` is the
    large-:math:`t` form). The :math:`1/t` rates of Robbins & Monro (1951) satisfy
    :math:`\sum \eta_t = \infty,\ \sum \eta_t^2 < \infty` for :math:`1/2 < p \le 1`.
    """
    init_value = _checks.finite("init_value", init_value)
    decay_rate = _checks.positive("decay_rate", decay_rate)
    power = _checks.positive("power", power)
    return Schedule("inverse_time", lambda t: init_value / (1.0 + decay_rate * t) ** power,
                    init_value=init_value, decay_rate=decay_rate, power=power)


def polynomial(init_value: float, total_iters: float, power: float = 1.0, end_value: float = 0.0) -> Schedule:
    r"""Polynomial decay to ``end_value`` over ``total_iters`` steps, then constant:

    .. math:: v_t = v_{end} + (v_0 - v_{end}) (1 - \min(t, T) / T)^p

    (PyTorch ``PolynomialLR``, which ends at 0; optax ``polynomial_schedule``.)
    """
    init_value = _checks.finite("init_value", init_value)
    end_value = _checks.finite("end_value", end_value)
    total_iters = _checks.positive("total_iters", total_iters)
    power = _checks.positive("power", power)

    def values(t):
        return end_value + (init_value - end_value) * (1.0 - np.minimum(t, total_iters) / total_iters) ** power

    return Schedule("polynomial", values, init_value=init_value, total_iters=total_iters,
                    power=power, end_value=end_value)


def linear(init_value: float, end_value: float, total_iters: float) -> Schedule:
    """Straight line from ``init_value`` to ``end_value`` over ``total_iters`` steps,
    then constant: :func:`polynomial` with ``power=1`` (PyTorch ``LinearLR``, whose
    factors multiply the optimizer's rate; optax ``linear_schedule``). Annealing the
    momentum from 0.5 to 0.9 is ``linear(0.5, 0.9, n)``.
    """
    s = polynomial(init_value, total_iters, power=1.0, end_value=end_value)
    return Schedule("linear", s._values, init_value=s.params["init_value"], end_value=s.params["end_value"],
                    total_iters=s.params["total_iters"])


def _cosine_from(high, low, fraction):
    """Half a cosine from ``high`` (fraction 0) down to ``low`` (fraction 1)."""
    return low + (high - low) * (1.0 + np.cos(np.pi * fraction)) / 2.0


def cosine(init_value: float, T_max: float, eta_min: float = 0.0) -> Schedule:
    r"""Cosine decay to a floor (Loshchilov & Hutter 2017), then constant:

    .. math:: v_t = \eta_{min} + \tfrac12 (v_0 - \eta_{min})(1 + \cos(\pi \min(t, T) / T))

    PyTorch ``CosineAnnealingLR`` for :math:`t \le T` (after :math:`T` PyTorch's
    rate climbs back up a second half-period; this one stays at the floor); optax
    ``cosine_decay_schedule`` with ``alpha = eta_min / init_value``.
    """
    init_value = _checks.finite("init_value", init_value)
    eta_min = _checks.finite("eta_min", eta_min)
    T_max = _checks.positive("T_max", T_max)
    return Schedule("cosine", lambda t: _cosine_from(init_value, eta_min, np.minimum(t, T_max) / T_max),
                    init_value=init_value, T_max=T_max, eta_min=eta_min)


def cosine_warm_restarts(init_value: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0) -> Schedule:
    r"""SGDR, cosine annealing with warm restarts (Loshchilov & Hutter 2017): a
    cosine from ``init_value`` to ``eta_min`` over :math:`T_i` steps, then a restart;
    the periods are :math:`T_0, T_0 m, T_0 m^2, \dots` for ``T_mult`` :math:`= m`.
    Within period :math:`i`, started at step :math:`S_i = T_0 (m^i - 1)/(m - 1)`
    (:math:`i T_0` if :math:`m = 1`):

    .. math:: v_t = \eta_{min} + \tfrac12 (v_0 - \eta_{min})(1 + \cos(\pi (t - S_i) / T_i))

    (PyTorch ``CosineAnnealingWarmRestarts``; integer ``T_0 >= 1`` and ``T_mult >= 1`` as there.)
    """
    init_value = _checks.finite("init_value", init_value)
    eta_min = _checks.finite("eta_min", eta_min)
    T_0 = _checks.integer("T_0", T_0, 1)
    T_mult = _checks.integer("T_mult", T_mult, 1)

    def start(i):  # step at which period i begins
        return T_0 * (float(T_mult) ** i - 1.0) / (T_mult - 1)

    def values(t):
        if T_mult == 1:
            return _cosine_from(init_value, eta_min, np.mod(t, T_0) / T_0)
        i = np.floor(np.log1p(t / T_0 * (T_mult - 1)) / math.log(T_mult))
        # The logarithm can round across a restart; the starts are exact integers.
        i = np.where(t < start(i), i - 1, i)
        i = np.where(t >= start(i + 1), i + 1, i)
        return _cosine_from(init_value, eta_min, (t - start(i)) / (T_0 * float(T_mult) ** i))

    return Schedule("cosine_warm_restarts", values, init_value=init_value, T_0=T_0, T_mult=T_mult, eta_min=eta_min)


CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def cyclic(base_value: float, max_value: float, step_size_up: float = 2000, step_size_down: float | None = None,
           mode: str = "triangular", gamma: float = 1.0) -> Schedule:
    r"""Cyclical learning rates (Smith 2017), PyTorch ``CyclicLR``.

    A cycle rises from ``base_value`` to ``max_value`` in ``step_size_up`` steps and
    falls back in ``step_size_down`` (default: the same). With cycle length
    :math:`L`, :math:`c = \lfloor 1 + t/L \rfloor`, :math:`x = 1 + t/L - c` and
    :math:`r` = ``step_size_up`` / :math:`L`, the position in the cycle is
    :math:`h = x / r` rising and :math:`(x - 1)/(r - 1)` falling, and

    .. math:: v_t = b + (m - b)\, h\, a_t

    with amplitude :math:`a_t = 1` ("triangular"), :math:`2^{1-c}` ("triangular2",
    halved every cycle) or :math:`\gamma^t` ("exp_range"). ``max_value`` may be
    below ``base_value``: ``cyclic(0.95, 0.85, ...)`` cycles the momentum opposite
    to a learning rate cycled with the same steps (PyTorch's ``cycle_momentum``).
    """
    base_value = _checks.finite("base_value", base_value)
    max_value = _checks.finite("max_value", max_value)
    step_size_up = _checks.positive("step_size_up", step_size_up)
    step_size_down = step_size_up if step_size_down is None else _checks.positive("step_size_down", step_size_down)
    mode = _checks.choice("mode", mode, CYCLIC_MODES)
    gamma = _checks.real("gamma", gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    length = step_size_up + step_size_down
    ratio = step_size_up / length

    def values(t):
        cycle = np.floor(1.0 + t / length)
        x = 1.0 + t / length - cycle
        height = (max_value - base_value) * np.where(x <= ratio, x / ratio, (x - 1.0) / (ratio - 1.0))
        if mode == "triangular":
            return base_value + height
        if mode == "triangular2":
            return base_value + height * (1.0 / 2.0 ** (cycle - 1.0))
        return base_value + height * gamma**t

    return Schedule("cyclic", values, base_value=base_value, max_value=max_value, step_size_up=step_size_up,
                    step_size_down=step_size_down, mode=mode, gamma=gamma)


ANNEAL_STRATEGIES = ("cos", "linear")


def _anneal(strategy, start, end, fraction):
    """From ``start`` (fraction 0) to ``end`` (fraction 1), by half a cosine or a line."""
    if strategy == "cos":
        return end + (start - end) / 2.0 * (np.cos(np.pi * fraction) + 1.0)
    return (end - start) * fraction + start


def one_cycle(max_value: float, total_steps: int, pct_start: float = 0.3, anneal_strategy: str = "cos",
              div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False,
              initial_value: float | None = None, final_value: float | None = None) -> Schedule:
    r"""The 1cycle policy (Smith & Topin 2019), PyTorch ``OneCycleLR``.

    From ``initial_value`` (default ``max_value / div_factor``) up to ``max_value``
    at step :math:`p T - 1` (:math:`p` = ``pct_start``, :math:`T` = ``total_steps``),
    then down to ``final_value`` (default ``initial_value / final_div_factor``) at
    step :math:`T - 1`, each phase by half a cosine or a line. With
    ``three_phase=True`` the descent first returns to ``initial_value`` at step
    :math:`2pT - 2`, then anneals to ``final_value``. After step :math:`T - 1`
    the value stays at ``final_value`` (PyTorch raises past step :math:`T`).

    The momentum of the same policy moves the other way: give explicit values,
    e.g. ``one_cycle(0.85, T, initial_value=0.95, final_value=0.95)`` (PyTorch's
    ``base_momentum``/``max_momentum``). optax: ``cosine_onecycle_schedule`` and
    ``linear_onecycle_schedule`` (different phase boundaries).
    """
    max_value = _checks.finite("max_value", max_value)
    total_steps = _checks.integer("total_steps", total_steps, 1)
    pct_start = _checks.real("pct_start", pct_start)
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
    anneal_strategy = _checks.choice("anneal_strategy", anneal_strategy, ANNEAL_STRATEGIES)
    div_factor = _checks.positive("div_factor", div_factor)
    final_div_factor = _checks.positive("final_div_factor", final_div_factor)
    if initial_value is None:
        initial_value = max_value / div_factor
    initial_value = _checks.finite("initial_value", initial_value)
    if final_value is None:
        final_value = initial_value / final_div_factor
    final_value = _checks.finite("final_value", final_value)
    rise_end = pct_start * total_steps - 1.0
    if three_phase:
        phases = [(rise_end, initial_value, max_value), (2.0 * pct_start * total_steps - 2.0, max_value, initial_value),
                  (total_steps - 1.0, initial_value, final_value)]
    else:
        phases = [(rise_end, initial_value, max_value), (total_steps - 1.0, max_value, final_value)]
    ends = [0.0] + [end for end, _, _ in phases]
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"one_cycle phases would be empty: pct_start={pct_start} and total_steps={total_steps} "
                         f"give phase ends {ends[1:]}")

    def values(t):
        t = np.minimum(t, total_steps - 1.0)
        out = None
        for begin, (end, start_value, end_value) in reversed(list(zip(ends, phases))):
            phase = _anneal(anneal_strategy, start_value, end_value, (t - begin) / (end - begin))
            out = phase if out is None else np.where(t <= end, phase, out)
        return out

    return Schedule("one_cycle", values, max_value=max_value, total_steps=total_steps, pct_start=pct_start,
                    anneal_strategy=anneal_strategy, three_phase=bool(three_phase),
                    initial_value=initial_value, final_value=final_value)


def swa_anneal(init_value: float, swa_value: float, anneal_steps: int = 10, anneal_strategy: str = "cos") -> Schedule:
    r"""The learning rate of an SWA phase, PyTorch ``SWALR``: from ``init_value``
    (the rate when averaging starts) to the constant ``swa_value`` in
    ``anneal_steps`` steps (:math:`A`), by half a cosine or a line, then constant:

    .. math:: v_t = \alpha\, v_{swa} + (1 - \alpha)\, v_0, \quad
              \alpha = f(\min(1, t / A))

    with :math:`f(x) = (1 - \cos \pi x)/2` or :math:`x`. ``anneal_steps=0`` is
    ``swa_value`` from the start. Join it after the main schedule with :func:`join`.
    """
    init_value = _checks.finite("init_value", init_value)
    swa_value = _checks.finite("swa_value", swa_value)
    anneal_steps = _checks.integer("anneal_steps", anneal_steps, 0)
    anneal_strategy = _checks.choice("anneal_strategy", anneal_strategy, ANNEAL_STRATEGIES)

    def values(t):
        x = np.minimum(1.0, t / anneal_steps) if anneal_steps else np.ones_like(t)
        alpha = (1.0 - np.cos(np.pi * x)) / 2.0 if anneal_strategy == "cos" else x
        return swa_value * alpha + init_value * (1.0 - alpha)

    return Schedule("swa_anneal", values, init_value=init_value, swa_value=swa_value,
                    anneal_steps=anneal_steps, anneal_strategy=anneal_strategy)


def swa_cyclic(max_value: float, min_value: float, cycle_length: int) -> Schedule:
    r"""The cyclical rate of Stochastic Weight Averaging (Izmailov et al. 2018, eq. 2):
    in each cycle of :math:`c` steps the value falls linearly from near
    ``max_value`` (:math:`\alpha_1`) to ``min_value`` (:math:`\alpha_2`), reached at
    the cycle's last step, then jumps back:

    .. math:: v_t = (1 - \tau_t)\alpha_1 + \tau_t \alpha_2, \quad
              \tau_t = ((t \bmod c) + 1) / c

    (step :math:`t` here is the paper's iteration :math:`i - 1`). Average at the
    low points: ``SWA(..., start=k * c, every=c)`` when the scheduler value of step
    :math:`t` drives optimizer step :math:`t + 1`. No PyTorch or optax counterpart.
    """
    max_value = _checks.finite("max_value", max_value)
    min_value = _checks.finite("min_value", min_value)
    cycle_length = _checks.integer("cycle_length", cycle_length, 1)

    def values(t):
        tau = (np.mod(t, cycle_length) + 1.0) / cycle_length
        return (1.0 - tau) * max_value + tau * min_value

    return Schedule("swa_cyclic", values, max_value=max_value, min_value=min_value, cycle_length=cycle_length)


def warmup(schedule: Schedule, warmup_steps: int, start_value: float = 0.0) -> Schedule:
    r"""A linear warm-up (Goyal et al. 2017) from ``start_value`` to ``schedule(0)``
    over ``warmup_steps`` steps, then ``schedule`` shifted to begin where the
    warm-up ends:

    .. math:: v_t = \begin{cases} v_s + (f(0) - v_s)\, t / W & t < W \\ f(t - W) & t \ge W \end{cases}

    (PyTorch: ``SequentialLR([LinearLR(...), main], milestones=[W])``; optax
    ``warmup_cosine_decay_schedule`` and ``warmup_exponential_decay_schedule``
    for two particular schedules.)
    """
    schedule = _schedule("schedule", schedule)
    warmup_steps = _checks.integer("warmup_steps", warmup_steps, 1)
    start_value = _checks.finite("start_value", start_value)
    peak = float(schedule._values(np.zeros(1))[0])
    ramp = Schedule("linear", lambda t: start_value + (peak - start_value) * (t / warmup_steps))
    joined = join([ramp, schedule], [warmup_steps])
    return Schedule("warmup", joined._values, schedule=schedule, warmup_steps=warmup_steps, start_value=start_value)


def join(schedules: Sequence[Schedule], boundaries: Sequence[float]) -> Schedule:
    r"""Schedules in sequence (optax ``join_schedules``, PyTorch ``SequentialLR``):
    ``schedules[0]`` until step ``boundaries[0]``, then ``schedules[i + 1]``
    evaluated at :math:`t - b_i` (each schedule starts from its own step 0) for
    :math:`b_i \le t < b_{i+1}`. ``boundaries`` must be strictly increasing and
    positive, one fewer than the schedules.
    """
    schedules = [_schedule(f"schedules[{i}]", s) for i, s in enumerate(schedules)]
    boundaries = _increasing("boundaries", boundaries)
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"join needs one boundary fewer than schedules: {len(schedules)} schedules, "
                         f"{len(boundaries)} boundaries")
    offsets = np.array([0.0] + [float(b) for b in boundaries])

    def values(t):
        piece = np.searchsorted(offsets, t, side="right") - 1
        out = np.empty_like(t)
        for i, s in enumerate(schedules):
            mask = piece == i
            if mask.any():
                out[mask] = s._values(t[mask] - offsets[i])
        return out

    return Schedule("join", values, schedules=schedules, boundaries=boundaries)


def from_function(fn: Callable[[Any], float]) -> Schedule:
    """A schedule from any function of one step (PyTorch ``LambdaLR`` without the
    factor): ``fn`` is called once per step with the step as an int (a float for
    a fractional step) and must return a real number. Lets custom shapes take
    part in :func:`join` and :func:`warmup`.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")

    def values(t):
        return np.array([_checks.finite("schedule value", fn(int(x) if x.is_integer() else float(x)))
                         for x in t.tolist()], dtype=np.float64)

    return Schedule("from_function", values, fn=fn)


def _increasing(name, values):
    """A list of strictly increasing, positive, finite reals."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}")
    values = [_checks.positive(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {values}")
    return values


# --------------------------------------------------------------------------
# Driving an optimizer.

_ALIASES = {"beta1": ("betas", 0), "beta2": ("betas", 1)}
_INDEXED = re.compile(r"^(\w+)\[(\d+)\]$")


class Hyperparameter:
    """One hyperparameter of a parameter group, by name: ``"lr"``, ``"momentum"``,
    ``"weight_decay"``..., an element of a tuple such as ``"betas[0]"``, or the
    aliases ``"beta1"`` / ``"beta2"`` for ``"betas[0]"`` / ``"betas[1]"``.
    """

    __slots__ = ("name", "key", "index")
    name: str
    key: str
    index: int | None

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"hyperparameter must be a string, got {name!r}")
        self.name = name
        match = _INDEXED.match(name)
        if name in _ALIASES:
            self.key, self.index = _ALIASES[name]
        elif match:
            self.key, self.index = match.group(1), int(match.group(2))
        else:
            self.key, self.index = name, None

    def check(self, groups: list[dict[str, Any]]) -> None:
        """Raise ValueError unless every group has this hyperparameter as a real number."""
        for i, group in enumerate(groups):
            if self.key not in group:
                raise ValueError(f"param_groups[{i}] has no hyperparameter {self.key!r} (for {self.name!r})")
            value = group[self.key]
            if self.index is not None:
                if not isinstance(value, (tuple, list)) or self.index >= len(value):
                    raise ValueError(f"param_groups[{i}][{self.key!r}] = {value!r} has no element {self.index}")
                value = value[self.index]
            _checks.real(f"param_groups[{i}][{self.name!r}]", value)

    def get(self, group: dict[str, Any]) -> float:
        value = group[self.key]
        return float(value if self.index is None else value[self.index])

    def set(self, group: dict[str, Any], value: float) -> None:
        if self.index is None:
            group[self.key] = value
            return
        old = group[self.key]
        new = list(old)
        new[self.index] = value
        group[self.key] = type(old)(new)


def _param_groups(optimizer):
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise TypeError(f"expected an optimizer with a param_groups list of dicts, got {type(optimizer).__name__}")
    return groups


def parameter_arrays(source: HasParamGroups | FloatArray | Sequence[FloatArray]) -> list[FloatArray]:
    """The parameter arrays of ``source``: every ``"params"`` entry of an optimizer's
    groups (in order), or one array, or a list of arrays."""
    if isinstance(source, np.ndarray):
        return [source]
    if hasattr(source, "param_groups"):
        arrays = [p for group in _param_groups(source) for p in group["params"]]
    elif isinstance(source, (list, tuple)):
        arrays = list(source)
    else:
        raise TypeError(f"expected an optimizer, an array or a list of arrays, got {type(source).__name__}")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"params[{i}] must be a numpy.ndarray, got {type(a).__name__}")
    return arrays


class Scheduler:
    """Drive one hyperparameter of an optimizer's parameter groups with a schedule.

    ``Scheduler(opt, cosine(0.1, 1000))`` writes ``cosine(0.1, 1000)(t)`` into
    every group's ``"lr"`` at step ``t``: step 0 on construction, step ``t`` after
    the ``t``-th call of :meth:`step` (PyTorch's convention: call it after
    ``opt.step(...)``). ``schedule`` is one schedule for all groups or a list with
    one per group; any callable ``f(step) -> float`` works (called with an int).
    ``hyperparameter`` names the group entry (see :class:`Hyperparameter`):
    ``Scheduler(opt, linear(0.5, 0.9, 1000), "momentum")`` anneals the momentum,
    ``Scheduler(opt, cyclic(0.95, 0.85), "beta1")`` cycles Adam's beta1.
    Several schedulers may drive different hyperparameters of one optimizer.

    A :class:`fastdescent.plateau.ReduceLROnPlateau` given this scheduler as its
    target scales the values down: the value written is then
    ``max(s * scale, min(floor, s))`` with ``s`` the schedule's value: a
    reduction never takes it below the plateau's floor, while the schedule itself
    may go lower.

    Works with any object whose ``param_groups`` is a list of dicts (fastdescent
    and ``torch.optim`` optimizers). Register it in the optimizer checkpoint
    (``opt.register_state("lr_schedule", sched)``) to resume the schedule exactly.
    """

    def __init__(self, optimizer: HasParamGroups, schedule: Callable[[int], float] | Sequence[Callable[[int], float]],
                 hyperparameter: str = "lr") -> None:
        self.optimizer = optimizer
        groups = _param_groups(optimizer)
        self.hyperparameter = Hyperparameter(hyperparameter)
        self.hyperparameter.check(groups)
        if isinstance(schedule, (list, tuple)):
            if len(schedule) != len(groups):
                raise ValueError(f"{len(schedule)} schedules for {len(groups)} parameter groups")
            schedules = list(schedule)
        else:
            schedules = [schedule] * len(groups)
        for i, s in enumerate(schedules):
            if not callable(s):
                raise TypeError(f"schedule[{i}] must be callable, got {type(s).__name__}")
        self.schedules = schedules
        self.last_step = 0
        self.scale = [1.0] * len(groups)
        self.floor = [0.0] * len(groups)  # used only once a reduction set scale < 1
        self._apply()

    def _scheduled(self, i):
        return _checks.finite("schedule value", self.schedules[i](self.last_step))

    def _value(self, scheduled, scale, floor):
        if scale == 1.0:
            return scheduled
        return max(scheduled * scale, min(floor, scheduled))

    def _apply(self):
        groups = _param_groups(self.optimizer)
        if len(groups) != len(self.schedules):
            raise RuntimeError(f"the optimizer now has {len(groups)} parameter groups; "
                               f"this scheduler was built for {len(self.schedules)}")
        for i, group in enumerate(groups):
            value = self._value(self._scheduled(i), self.scale[i], self.floor[i])
            self.hyperparameter.set(group, value)

    def step(self) -> None:
        """Advance one step and write the new values into the groups."""
        self.last_step += 1
        self._apply()

    def get_last_value(self) -> list[float]:
        """The values last written, one per group (PyTorch's ``get_last_lr``)."""
        return [self.hyperparameter.get(g) for g in _param_groups(self.optimizer)]

    def reduce(self, factor: float, floors: Sequence[float], eps: float = 0.0) -> list[bool]:
        """Scale every group's values by ``factor`` from now on, never below its
        floor (``floors``, one per group); a group whose value would fall by no
        more than ``eps`` is left alone. Returns one bool per group: reduced.
        Called by ``ReduceLROnPlateau``.
        """
        changed = []
        groups = _param_groups(self.optimizer)
        for i, group in enumerate(groups):
            scheduled = self._scheduled(i)
            old = self._value(scheduled, self.scale[i], self.floor[i])
            new = self._value(scheduled, self.scale[i] * factor, floors[i])
            reduce = old - new > eps
            if reduce:
                self.scale[i] *= factor
                self.floor[i] = floors[i]
                self.hyperparameter.set(group, new)
            changed.append(reduce)
        return changed

    def state_dict(self) -> StateDict:
        return {"last_step": self.last_step, "scale": list(self.scale), "floor": list(self.floor)}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore the step (and plateau scaling), and write that step's values.
        Validates the state first; on any error nothing changes."""
        last_step, scale, floor = _checks.state_entries("Scheduler", state, ("last_step", "scale", "floor"))
        last_step = _checks.integer("last_step", last_step, 0)
        scale = [_checks.positive(f"scale[{i}]", s) for i, s in enumerate(_checks.real_list("scale", scale))]
        floor = [_checks.finite(f"floor[{i}]", f) for i, f in enumerate(_checks.real_list("floor", floor))]
        if len(scale) != len(self.schedules) or len(floor) != len(self.schedules):
            raise ValueError(f"the state has {len(scale)} groups, this scheduler {len(self.schedules)}")
        previous = self.last_step, self.scale, self.floor
        self.last_step, self.scale, self.floor = last_step, scale, floor
        try:
            self._apply()  # the schedule itself may refuse the step
        except BaseException:
            self.last_step, self.scale, self.floor = previous
            self._apply()
            raise

    def __repr__(self) -> str:
        return f"Scheduler({self.hyperparameter.name!r}, step {self.last_step}, {self.schedules[0]!r})"


__all__ = [
    "Hyperparameter",
    "Schedule",
    "Scheduler",
    "constant",
    "cosine",
    "cosine_warm_restarts",
    "cyclic",
    "exponential",
    "from_function",
    "inverse_time",
    "join",
    "linear",
    "multi_step",
    "one_cycle",
    "polynomial",
    "step_decay",
    "swa_anneal",
    "swa_cyclic",
    "warmup",
]
