"""Decisions from a monitored metric: reduce the learning rate on a plateau, stop early.

Both watch one number per evaluation (a validation loss, an accuracy) and count
the evaluations since it last improved by more than a threshold:

* :class:`ReduceLROnPlateau` multiplies the learning rate by ``factor`` when that
  count exceeds ``patience`` (PyTorch's ``ReduceLROnPlateau``, same arguments,
  defaults and decisions). Its target is an optimizer, or a
  :class:`fastdescent.schedules.Scheduler`, whose schedule it then scales down:
  a plateau rule after a warm-up is
  ``ReduceLROnPlateau(Scheduler(opt, warmup(constant(0.1), 500)))``.
* :class:`EarlyStopping` tells the loop to stop after ``patience`` evaluations
  without improvement, optionally only once the learning rate has fallen to a
  floor, and can put back the best parameters it saw.

The recipe of reducing the rate on each plateau and stopping once it is below a
floor is the two together with the same ``min_lr``.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _checks
from ._typing import FloatArray, HasParamGroups, StateDict
from .schedules import Scheduler, _param_groups, parameter_arrays

MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")
#: EarlyStopping's ``min_lr`` test allows this relative excess (rounding).
FLOOR_TOLERANCE = 1e-9


class _MetricWatch:
    """What both rules share: the best metric so far and the evaluations since it improved.

    A value improves on ``best`` (PyTorch's rule) when it is below
    ``best * (1 - threshold)`` ("min", "rel"), below ``best - threshold`` ("min",
    "abs"), above ``best * (1 + threshold)`` ("max", "rel") or above
    ``best + threshold`` ("max", "abs"). NaN never improves.
    """

    def __init__(self, mode, threshold, threshold_mode):
        self.mode = _checks.choice("mode", mode, MODES)
        self.threshold = _checks.nonnegative("threshold", threshold)
        self.threshold_mode = _checks.choice("threshold_mode", threshold_mode, THRESHOLD_MODES)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.last_epoch = 0

    def improves(self, value: float) -> bool:
        if self.mode == "min":
            bound = self.best * (1.0 - self.threshold) if self.threshold_mode == "rel" else self.best - self.threshold
            return value < bound
        bound = self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        return value > bound

    def _record(self, metric):
        """Count one evaluation of ``metric``; True if it improved on the best."""
        try:
            value = float(metric)
        except (TypeError, ValueError):
            raise TypeError(f"the metric must be a real number, got {metric!r}") from None
        self.last_epoch += 1
        if self.improves(value):
            self.best = value
            self.num_bad_epochs = 0
            return True
        self.num_bad_epochs += 1
        return False

    def _watch_state(self):
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs, "last_epoch": self.last_epoch}

    def _checked_state(self, state, counters, more=()):
        """A saved state's entries, name -> value: the watch's, ``counters`` (integers
        >= 0) and ``more`` (for the caller to check), validated before anything changes."""
        names = ("best", "num_bad_epochs", "last_epoch") + counters + more
        values = dict(zip(names, _checks.state_entries(type(self).__name__, state, names)))
        values["best"] = _checks.real("best", values["best"])
        for name in ("num_bad_epochs", "last_epoch") + counters:
            values[name] = _checks.integer(name, values[name], 0)
        return values


class _LearningRates:
    """The "lr" of every group of an optimizer, as a target of ReduceLROnPlateau."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        for i, group in enumerate(_param_groups(optimizer)):
            if "lr" not in group:
                raise ValueError(f"param_groups[{i}] has no 'lr'")

    def reduce(self, factor, floors, eps):
        changed = []
        for group, floor in zip(_param_groups(self.optimizer), floors):
            old = float(group["lr"])
            new = max(old * factor, floor)
            changed.append(old - new > eps)
            if changed[-1]:
                group["lr"] = new
        return changed


class ReduceLROnPlateau(_MetricWatch):
    r"""Reduce the learning rate when a metric stops improving (PyTorch's
    ``ReduceLROnPlateau``: same arguments, defaults and decisions).

    Call :meth:`step` with the metric after each evaluation. When more than
    ``patience`` evaluations in a row have not improved on the best value (see
    ``threshold``), each group's rate becomes :math:`\max(\eta \cdot
    \text{factor}, \text{min\_lr})` (a change of ``eps`` or less is skipped),
    the count restarts, and the next ``cooldown`` evaluations are not counted.

    Parameters
    ----------
    target : optimizer or Scheduler
        An optimizer: its groups' ``"lr"`` are multiplied in place. A
        :class:`~fastdescent.schedules.Scheduler`: its schedule is scaled by the
        reductions (for whatever hyperparameter it drives), so the schedule keeps
        running underneath, e.g. a warm-up followed by plateau reductions.
    mode : {"min", "max"}
        Whether the metric should go down (a loss) or up (an accuracy).
    factor : float in (0, 1)
    patience, cooldown : int >= 0
    threshold : float >= 0
    threshold_mode : {"rel", "abs"}
        An improvement must beat ``best * (1 -/+ threshold)`` ("rel") or
        ``best -/+ threshold`` ("abs").
    min_lr : float or list of float
        Floor of the reductions, for all groups or one per group.
    eps : float >= 0
    """

    def __init__(self, target: HasParamGroups | Scheduler, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float | Sequence[float] = 0.0, eps: float = 1e-8) -> None:
        self.target: Scheduler | _LearningRates
        if isinstance(target, Scheduler):
            self.target, optimizer = target, target.optimizer
        else:
            self.target, optimizer = _LearningRates(target), target
        n_groups = len(_param_groups(optimizer))
        self.factor = _checks.open_unit_interval("factor", factor)
        self.patience = _checks.integer("patience", patience, 0)
        self.cooldown = _checks.integer("cooldown", cooldown, 0)
        self.eps = _checks.nonnegative("eps", eps)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != n_groups:
                raise ValueError(f"{len(min_lr)} min_lr values for {n_groups} parameter groups")
            self.min_lrs = [_checks.nonnegative(f"min_lr[{i}]", v) for i, v in enumerate(min_lr)]
        else:
            self.min_lrs = [_checks.nonnegative("min_lr", min_lr)] * n_groups
        super().__init__(mode, threshold, threshold_mode)
        self.cooldown_counter = 0

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def step(self, metric: float) -> bool:
        """Record one evaluation of the metric; True if the rate was reduced now."""
        self._record(metric)
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs <= self.patience:
            return False
        changed = self.target.reduce(self.factor, self.min_lrs, self.eps)
        self.cooldown_counter = self.cooldown
        self.num_bad_epochs = 0
        return any(changed)

    def state_dict(self) -> StateDict:
        return {**self._watch_state(), "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore a :meth:`state_dict`; validates it first, and on any error nothing changes."""
        for name, value in self._checked_state(state, ("cooldown_counter",)).items():
            setattr(self, name, value)


class EarlyStopping(_MetricWatch):
    r"""Tell the training loop to stop once a metric has stopped improving.

    Call :meth:`step` with the metric after each evaluation; it returns True when
    training should stop: after ``patience`` evaluations in a row that did not
    improve on the best by more than ``min_delta`` (Keras' and Lightning's rule;
    ``patience=0`` stops at the first one). An improving evaluation never stops.

    Parameters
    ----------
    optimizer : optimizer, optional
        Needed for ``min_lr`` (its groups' ``"lr"``) and ``restore_best`` (its
        groups' ``"params"``).
    mode : {"min", "max"}
    patience : int >= 0
    min_delta : float >= 0
        An improvement must beat the best by more than this (absolute).
    min_lr : float, optional
        Count evaluations without improvement only while every group's learning
        rate is at or below ``min_lr`` (give or take a relative 1e-9 of rounding): with a :class:`ReduceLROnPlateau` of the
        same floor, the rate is reduced at each plateau and training stops after
        ``patience`` evaluations without improvement at the lowest rate. Call
        this ``step`` before the plateau's, so that the evaluation that triggers
        the last reduction (made at the rate before it) is not counted.
    restore_best : bool
        Keep a copy of the parameters at the best evaluation (copied in place at
        each improvement, allocated once) and copy them back into the optimizer's
        arrays, in place, when stopping. :meth:`restore` does it on demand.
    """

    def __init__(self, optimizer: HasParamGroups | None = None, *, mode: str = "min", patience: int = 10,
                 min_delta: float = 0.0, min_lr: float | None = None, restore_best: bool = False) -> None:
        if (min_lr is not None or restore_best) and optimizer is None:
            raise ValueError("min_lr and restore_best need the optimizer")
        if optimizer is not None:
            _param_groups(optimizer)
        self.optimizer = optimizer
        self.patience = _checks.integer("patience", patience, 0)
        self.min_lr = None if min_lr is None else _checks.nonnegative("min_lr", min_lr)
        self.restore_best = bool(restore_best)
        super().__init__(mode, _checks.nonnegative("min_delta", min_delta), "abs")
        self.best_epoch = 0
        self.should_stop = False
        self._best_params: list[FloatArray] | None = None

    def _at_floor(self):
        if self.min_lr is None:
            return True
        # A rate reduced to the floor by repeated multiplication can stay a few ulps
        # above it (0.1 * 0.1**3 > 1e-4, and the plateau's eps then blocks the last step).
        ceiling = self.min_lr * (1.0 + FLOOR_TOLERANCE)
        return all(float(g["lr"]) <= ceiling for g in _param_groups(self.optimizer))

    def step(self, metric: float) -> bool:
        """Record one evaluation; True if training should stop (and stays True)."""
        if self._record(metric):
            self.best_epoch = self.last_epoch
            if self.restore_best:
                self._save_params()
            return self.should_stop
        if not self._at_floor():
            self.num_bad_epochs = 0
        elif self.num_bad_epochs >= self.patience and not self.should_stop:
            self.should_stop = True
            if self.restore_best:
                self.restore()
        return self.should_stop

    def _save_params(self):
        params = parameter_arrays(self.optimizer)
        if self._best_params is None or [b.shape for b in self._best_params] != [p.shape for p in params]:
            self._best_params = [p.copy() for p in params]
        else:
            for best, p in zip(self._best_params, params):
                np.copyto(best, p)

    def restore(self) -> None:
        """Copy the best parameters seen back into the optimizer's arrays, in place."""
        if self._best_params is None:
            raise RuntimeError("no best parameters saved (restore_best=False, or no evaluation yet)")
        if self.optimizer is None:
            raise RuntimeError("restore needs the optimizer (EarlyStopping(optimizer, ...))")
        params = parameter_arrays(self.optimizer)
        if [(p.shape, p.dtype) for p in params] != [(b.shape, b.dtype) for b in self._best_params]:
            raise ValueError("the optimizer's parameters no longer match the saved best parameters")
        for p, best in zip(params, self._best_params):
            np.copyto(p, best)

    def state_dict(self) -> StateDict:
        best_params = None if self._best_params is None else [b.copy() for b in self._best_params]
        return {**self._watch_state(), "best_epoch": self.best_epoch, "should_stop": self.should_stop,
                "best_params": best_params}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore a :meth:`state_dict`; validates it first, and on any error nothing changes."""
        values = self._checked_state(state, ("best_epoch",), ("should_stop", "best_params"))
        values["should_stop"] = _checks.boolean("should_stop", values["should_stop"])
        best = values.pop("best_params")
        if best is not None:
            if not isinstance(best, (list, tuple)) or not all(isinstance(b, np.ndarray) for b in best):
                raise TypeError("best_params must be None or a list of arrays")
            if self.optimizer is not None:
                expected = [(p.shape, p.dtype) for p in parameter_arrays(self.optimizer)]
                if [(b.shape, b.dtype) for b in best] != expected:
                    raise ValueError("best_params do not match the optimizer's parameters (shapes, dtypes)")
            best = [b.copy() for b in best]
        for name, value in values.items():
            setattr(self, name, value)
        self._best_params = best


__all__ = ["EarlyStopping", "ReduceLROnPlateau"]
