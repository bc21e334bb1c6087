r"""Weight averaging objects: Stochastic Weight Averaging and exponential moving averages.

Both keep one average array per parameter (allocated once), count the optimizer
steps through :meth:`step` (call it after each ``opt.step(...)``) and fold the
parameters in at steps ``start, start + every, start + 2 * every, ...`` with a
fused multi-tensor kernel (:func:`fastdescent.swa_update`,
:func:`fastdescent.ema_update`). The first update copies the parameters.

For evaluation, ``with avg.swapped(): evaluate(...)`` exchanges the averages and
the parameters in place (:func:`fastdescent.swap_arrays`: one pass, nothing
allocated) and exchanges them back on exit. :meth:`copy_to_params` makes the
average the final model.

A typical SWA run (Izmailov et al. 2018): train with the main schedule, then
from step ``s`` hold the rate at (or anneal it to) a constant and average::

    sched = Scheduler(opt, join([cosine(0.1, s), swa_anneal(cosine(0.1, s)(s), 0.01, 100)], [s]))
    swa = SWA(opt, start=s + 100, every=100)
    for t in range(total):
        opt.step(grads(...)); sched.step(); swa.step()
    with swa.swapped():
        evaluate()

Models with batch normalization must recompute its statistics for the averaged
weights (PyTorch's ``update_bn``); this module sees only parameter arrays.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from . import _checks, _runtime
from ._typing import FloatArray, HasParamGroups, StateDict
from .rules.averaging import MAX_N_AVERAGED, ema_update, swa_update, swap_arrays
from .schedules import parameter_arrays


class _Averager:
    """What SWA and EMA share: the averages, the step count, swapping, state."""

    def __init__(self, params: HasParamGroups | FloatArray | Sequence[FloatArray], start: int, every: int) -> None:
        params = parameter_arrays(params)
        _runtime.check_distinct("params", params)
        self.start = _checks.integer("start", start, 1)
        self.every = _checks.integer("every", every, 1)
        # One kernel call takes one dtype: group the tensors by dtype, in order.
        by_dtype: dict[np.dtype, list[FloatArray]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for same_dtype in by_dtype.values():
            _checks.check_buffers(("params",), (same_dtype,), (True,))
        self.params = params
        self.averages = [np.zeros_like(p) for p in params]
        average_of = {id(p): a for p, a in zip(params, self.averages)}
        self._batches = [(group, [average_of[id(p)] for p in group]) for group in by_dtype.values()]
        self.last_step = 0
        self.n_averaged = 0
        self._swapped = False

    def _check_not_swapped(self, action):
        if self._swapped:
            raise RuntimeError(f"cannot {action} while the averages are swapped into the parameters")

    def step(self) -> bool:
        """Count one optimizer step; average the parameters in if it is due.
        Returns True if they were averaged."""
        self._check_not_swapped("step")
        self.last_step += 1
        due = self.last_step >= self.start and (self.last_step - self.start) % self.every == 0
        if due:
            self.update()
        return due

    def update(self) -> None:
        """Average the current parameters in now, whatever the step."""
        self._check_not_swapped("update")
        for params, averages in self._batches:
            if self.n_averaged == 0:
                swa_update(averages, params, n_averaged=0)
            else:
                self._fold(averages, params)
        self.n_averaged += 1

    def _fold(self, averages, params):
        raise NotImplementedError

    def swap(self) -> None:
        """Exchange the averages and the parameters, in place."""
        if self.n_averaged == 0:
            raise RuntimeError("nothing has been averaged yet")
        for params, averages in self._batches:
            swap_arrays(params, averages)
        self._swapped = not self._swapped

    @contextmanager
    def swapped(self) -> Iterator["_Averager"]:
        """``with avg.swapped(): ...`` runs the block with the averaged weights in
        the parameter arrays, and puts the trained weights back after it."""
        self._check_not_swapped("swap again")
        self.swap()
        try:
            yield self
        finally:
            self.swap()

    def copy_to_params(self) -> None:
        """Overwrite the parameters with the averages (the end of training)."""
        self._check_not_swapped("copy")
        if self.n_averaged == 0:
            raise RuntimeError("nothing has been averaged yet")
        for p, a in zip(self.params, self.averages):
            np.copyto(p, a)

    def state_dict(self) -> StateDict:
        self._check_not_swapped("save")
        return {"last_step": self.last_step, "n_averaged": self.n_averaged,
                "averages": [a.copy() for a in self.averages]}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore a :meth:`state_dict`; validates it first, and on any error nothing changes."""
        self._check_not_swapped("load")
        last_step, n_averaged, averages = _checks.state_entries(
            type(self).__name__, state, ("last_step", "n_averaged", "averages"))
        if not isinstance(averages, (list, tuple)) or not all(isinstance(a, np.ndarray) for a in averages):
            raise TypeError("averages must be a list of arrays")
        if len(averages) != len(self.averages):
            raise ValueError(f"the state holds {len(averages)} averages for {len(self.averages)} parameters")
        for i, (saved, mine) in enumerate(zip(averages, self.averages)):
            if saved.shape != mine.shape or saved.dtype != mine.dtype:
                raise ValueError(f"averages[{i}] is {saved.dtype}{saved.shape}, expected {mine.dtype}{mine.shape}")
        last_step = _checks.integer("last_step", last_step, 0)
        n_averaged = _checks.integer("n_averaged", n_averaged, 0)
        if n_averaged > MAX_N_AVERAGED:
            raise ValueError(f"n_averaged must be <= {MAX_N_AVERAGED}, got {n_averaged}")
        for saved, mine in zip(averages, self.averages):
            np.copyto(mine, saved)
        self.last_step, self.n_averaged = last_step, n_averaged


class SWA(_Averager):
    r"""Stochastic Weight Averaging (Izmailov et al., UAI 2018): the equal average of
    the parameters at steps ``start, start + every, ...``,

    .. math:: \bar\theta \leftarrow \bar\theta + (\theta - \bar\theta)/(n + 1)

    with :math:`n` the snapshots already averaged (:func:`fastdescent.swa_update`).
    PyTorch: ``swa_utils.AveragedModel`` updated every ``every`` steps.

    Parameters
    ----------
    params : optimizer, ndarray or list of ndarray
        An optimizer (all arrays of its groups) or the arrays themselves:
        C-contiguous, writable float32/float64 (swapping writes them).
    start : int >= 1
        The first step (counted by :meth:`step`, from 1) whose parameters are averaged.
    every : int >= 1
        Average every ``every`` steps from ``start``.
    """

    def __init__(self, params: HasParamGroups | FloatArray | Sequence[FloatArray], *, start: int = 1,
                 every: int = 1) -> None:
        super().__init__(params, start, every)

    def _fold(self, averages, params):
        swa_update(averages, params, n_averaged=self.n_averaged)


class EMA(_Averager):
    r"""Exponential moving average of the parameters (Polyak averaging in its
    exponential form):

    .. math:: \bar\theta \leftarrow \beta_t \bar\theta + (1 - \beta_t)\, \theta

    at steps ``start, start + every, ...``; the first update copies the parameters
    (as PyTorch's ``AveragedModel`` with ``get_ema_multi_avg_fn``). With
    ``warmup=True`` the decay starts small while the average is young,
    :math:`\beta_t = \min(\beta, (1 + t)/(10 + t))` at step :math:`t` (TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``); else :math:`\beta_t = \beta`.

    Parameters
    ----------
    params : optimizer, ndarray or list of ndarray
    decay : float in [0, 1)
    warmup : bool
    start, every : int >= 1
        As for :class:`SWA`.
    """

    def __init__(self, params: HasParamGroups | FloatArray | Sequence[FloatArray], *, decay: float = 0.999,
                 warmup: bool = False, start: int = 1, every: int = 1) -> None:
        self.decay = _checks.unit_interval("decay", decay)
        self.warmup = bool(warmup)
        super().__init__(params, start, every)

    def current_decay(self) -> float:
        """The decay used by an update at the current step."""
        if not self.warmup:
            return self.decay
        t = self.last_step
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def _fold(self, averages, params):
        ema_update(averages, params, decay=self.current_decay())


__all__ = ["EMA", "SWA"]
