"""Gradient accumulation over micro-batches: an optimizer's ``accumulate_steps``.

With ``accumulate_steps=k`` (optax's ``MultiSteps``), the optimizer's
:meth:`~fastdescent.optim.Optimizer.step` takes micro-steps: calls 1 .. k-1 of
a window add ``grad_scale * g`` into one accumulator per parameter (the
parameter's dtype; one multi-tensor kernel pass per bucket, the first of a
window writing instead of adding) and return False without touching the
parameters or the state; call k is one step of the rule on the sum
:math:`S = \\sum_j s_j g_j` with ``grad_scale = 1/k``: one step on the mean of
the k gradients. It is bit-identical to ``step(S, grad_scale=1/k)`` of an
optimizer that does not accumulate, with ``S`` summed in the same order.

The k-th call is fused with the rule's step when it can be: the kernel
``step_accumulated`` reads ``acc`` and ``g`` once, forms S block by block in a
small buffer that stays in cache, zeroes ``acc`` and runs the rule's own element
loop on the block. That needs an elementwise rule (no ``runner``) and no pass
over the whole gradient before the update: with clipping or the non-finite
guard, or for a rule with a ``runner``, S is first completed in the
accumulators, then clipped (the norm is that of the mean gradient), stepped on
and zeroed. A step skipped by the guard discards the window.

:class:`Accumulation` is the state of this: the optimizer (``base.py``) calls
it at a few points (its step, the table of arrays a step writes, state dicts).
"""

import math
from collections.abc import Mapping
from numbers import Integral

import numpy as np

from .. import _checks
from .._config import effective_n_threads, resolve_backend
from .state import _check_like


def checked_steps(value):
    """``accumulate_steps`` as an int >= 1 (TypeError for a bool or a non-integer,
    ValueError below 1)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"accumulate_steps must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"accumulate_steps must be at least 1, got {value}")
    return int(value)


class Accumulation:
    """The accumulators of one optimizer and its micro-steps pending.

    ``steps`` is ``accumulate_steps`` (k); ``pending`` the micro-steps taken in
    the current window (0 .. k-1). The accumulators are created at the first
    micro-step (one per parameter, or one arena per bucket of a ``flat``
    optimizer) and kept, zero between windows.
    """

    def __init__(self, steps):
        self._steps = checked_steps(steps)
        self.pending = 0
        self._arrays = {}  # bucket -> (per-parameter accumulators, arena or None)
        self._completed = False  # the last step's sum is in the accumulators (not fused)

    @property
    def steps(self):
        return self._steps

    @steps.setter
    def steps(self, value):
        value = checked_steps(value)
        if self.pending and value != self._steps:
            raise ValueError(f"accumulate_steps cannot change {self.pending} micro-steps into a window of "
                             f"{self._steps}; change it after the window's last step")
        self._steps = value
        if value == 1:
            self._arrays = {}  # no accumulation: free the accumulators

    # ------------------------------------------------------------- arrays
    def _allocate(self, opt):
        """Create the accumulators of the buckets that have none (all or nothing)."""
        new = {}
        for layout in opt._layouts:
            for bucket in layout.buckets:
                if bucket not in self._arrays:
                    if opt.flat:
                        arena = np.zeros_like(bucket.arenas["param"])
                        offsets = np.cumsum([0] + [p.size for p in bucket.params])
                        views = [arena[a:b].reshape(p.shape) for a, b, p in zip(offsets, offsets[1:], bucket.params)]
                        new[bucket] = (views, arena)
                    else:
                        new[bucket] = ([np.zeros_like(p) for p in bucket.params], None)
        if new:
            self._arrays.update(new)
            opt._written = None  # the table of written arrays takes them in

    def _of(self, bucket, flat):
        """A bucket's accumulators as a kernel takes them (the arena if ``flat``)."""
        arrays, arena = self._arrays[bucket]
        return [arena] if flat else arrays

    def roles(self, bucket):
        """``[(label, arrays)]``: the bucket's accumulators for the optimizer's table of
        the arrays a step writes (a gradient may share no memory with them)."""
        if bucket not in self._arrays:
            return []
        return [("the accumulated gradient of params[{}]", self._arrays[bucket][0])]

    def _clear(self):
        for arrays, arena in self._arrays.values():
            for acc in [arena] if arena is not None else arrays:
                acc.fill(0)
        self.pending = 0

    def check_unchanged(self, what):
        """ValueError if a window is open (``what`` would change the buckets)."""
        if self.pending:
            raise ValueError(f"{what} {self.pending} micro-steps into a gradient accumulation; "
                             "finish the window first")

    # --------------------------------------------------------------- steps
    def step(self, opt, grads, group, grad_scale):
        """``opt.step`` with ``accumulate_steps > 1``: a micro-step (False) or the
        window's last call, the step on the sum (True, or False if the guard
        skipped it)."""
        if group is not None:
            raise ValueError("step(group=...) with accumulate_steps > 1: every micro-step covers all groups")
        if type(grad_scale) is not float or not 0.0 < grad_scale < math.inf:
            grad_scale = _checks.positive("grad_scale", grad_scale)
        self._allocate(opt)
        if self.pending + 1 < self._steps:
            work = opt._work(opt._layouts, grads, None)  # checks the gradients, also against the accumulators
            kernels, n_threads = resolve_backend(opt._backend), effective_n_threads(opt._n_threads)
            for position, bucket, params, bucket_grads, flat in work:
                kernels.accumulate(self._of(bucket, flat), bucket_grads, grad_scale=grad_scale,
                                   first=self.pending == 0, n_threads=n_threads)
            self.pending += 1
            return False
        self._scale, self._completed = grad_scale, False
        try:
            updated = opt._step(grads, None, 1.0 / self._steps, finish=self)
        except BaseException:
            if self._completed:  # the sum was written: the window cannot be taken again
                self._clear()
            raise
        if self._completed:
            self._clear()
        self.pending = 0
        return updated

    def fused(self, opt):
        """True if the last micro-step runs fused with the rule's step."""
        return (opt.spec.runner is None and not opt.skip_nonfinite and opt.clip_grad_norm is None
                and opt.clip_grad_value is None)

    def gradients(self, opt, work):
        """The step's work with the gradients it steps on: unchanged if fused, else
        the accumulators, where the sum is now completed."""
        if self.fused(opt):
            return work
        kernels, n_threads = resolve_backend(opt._backend), effective_n_threads(opt._n_threads)
        summed = []
        for position, bucket, params, bucket_grads, flat in work:
            accumulated = self._of(bucket, flat)
            kernels.accumulate(accumulated, bucket_grads, grad_scale=self._scale, first=False, n_threads=n_threads)
            self._completed = True
            summed.append((position, bucket, params, accumulated, flat))
        return summed

    def run(self, kernels, bucket, flat, params, grads, n_threads, step):
        """Run ``step(params, grads)``, the rule's kernel call of one bucket: fused
        with the sum, or on the sum already completed."""
        if self._completed:
            step(params, grads)
        else:
            kernels.step_accumulated(step, params, grads, self._of(bucket, flat), grad_scale=self._scale,
                                     n_threads=n_threads)

    # ---------------------------------------------------------- state dicts
    def state_dict(self, opt, copy_arrays):
        """The open window (None if none): ``{"steps", "pending", "grads": {index: array}}``."""
        if not self.pending:
            return None
        grads = {}
        for layout in opt._layouts:
            for bucket in layout.buckets:
                for k, acc in zip(bucket.positions, self._arrays[bucket][0]):
                    grads[layout.first + k] = acc.copy() if copy_arrays else acc
        return {"steps": self._steps, "pending": self.pending, "grads": dict(sorted(grads.items()))}

    def checked(self, opt, entry):
        """A state dict's ``"accumulation"`` entry checked against ``opt`` (raises
        before anything changes): ``(pending, {index: array})``, or None for no open
        window (no entry, as in a state dict saved without one)."""
        if entry is None:
            return None
        if not isinstance(entry, Mapping) or set(entry) != {"steps", "pending", "grads"}:
            raise ValueError("the state dict's 'accumulation' must be a dict of 'steps', 'pending' and 'grads'")
        steps, pending, grads = entry["steps"], entry["pending"], entry["grads"]
        for name, value in (("steps", steps), ("pending", pending)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
                raise TypeError(f"the state dict's accumulation {name!r} must be an int, got {value!r}")
        if not 0 <= pending < steps:
            raise ValueError(f"the state dict's accumulation is {pending} micro-steps into a window of {steps}")
        if not isinstance(grads, Mapping):
            raise TypeError("the state dict's accumulation 'grads' must be a dict")
        if pending == 0:
            return None
        if steps != self._steps:
            raise ValueError(f"the state dict is {pending} micro-steps into a window of {steps}; this optimizer "
                             f"accumulates {self._steps} (set accumulate_steps={steps} to resume it)")
        params = opt.params
        if any(type(i) is not int for i in grads) or set(grads) != set(range(len(params))):
            raise ValueError(f"the state dict's accumulation 'grads' must hold one array per parameter "
                             f"(indices 0 to {len(params) - 1})")
        for i, p in enumerate(params):
            _check_like(grads[i], p, f"the accumulated gradient {i}")
        return int(pending), grads

    def load(self, opt, checked):
        """Replace the open window by ``checked`` (from :meth:`checked`)."""
        if checked is None:
            if self.pending:
                self._clear()
            return
        self._allocate(opt)
        pending, grads = checked
        for layout in opt._layouts:
            for bucket in layout.buckets:
                for k, acc in zip(bucket.positions, self._arrays[bucket][0]):
                    np.copyto(acc, grads[layout.first + k])
        self.pending = pending

