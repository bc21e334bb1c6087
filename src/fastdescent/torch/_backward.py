"""Stepping inside ``backward()``: each parameter is updated as soon as its gradient
is complete, and its gradient freed at once."""

import queue
import threading

import torch

from .._config import effective_n_threads, resolve_backend
from ._adapter import KernelOptimizer

#: Options that need every gradient before the first update (global-norm clipping).
_NEEDS_ALL_GRADIENTS = ("clip_grad_norm", "max_grad_norm")


def step_in_backward(optimizer, overlap=False):
    """Make ``loss.backward()`` update the parameters of ``optimizer`` by itself.

    Each parameter gets a hook (``Tensor.register_post_accumulate_grad_hook``):
    when its gradient is complete, the hook checks and runs its update, with its
    group's hyperparameters as they are then (so learning-rate schedulers work
    as usual), and sets ``param.grad`` to None, which frees the gradient at once
    instead of after the whole pass. Each parameter takes the same kernel and the
    same scalars as in ``optimizer.step()``, which the rules make elementwise:
    after any number of steps the parameters and state are bit-for-bit those of
    the plain ``backward(); step()`` loop. Call ``optimizer.step()`` no more
    (it would find no gradient and do nothing) and ``zero_grad()`` only if you
    like.

    With ``overlap=True`` the updates run on one worker thread, fed by the hooks
    in the order the gradients complete; the kernels release the GIL, so they
    overlap the rest of the backward pass. ``backward()`` still returns only
    once every update of the pass is done (an autograd engine callback waits for
    the worker), so code after it sees the new parameters; ``handle.wait()`` is
    there for symmetry and returns at once then. Errors raised on the worker are
    raised by that ``backward()``.

    What cannot work this way, because it needs every gradient before the first
    update: clipping by the global gradient norm (an optimizer configured with
    one is refused; the ``fastdescent.torch`` classes have no such option:
    ``torch.nn.utils.clip_grad_norm_`` belongs between ``backward`` and
    ``step``), ``torch.amp.GradScaler`` (it unscales and checks every gradient
    first) and gradient accumulation over several backward passes. Each
    parameter's update is checked before it writes, but one failing parameter
    leaves those updated earlier in the pass updated. Step hooks
    (``register_step_pre_hook``) do not run: there is no ``step()`` call.
    Parameters added to the optimizer later (``add_param_group``) are stepped
    at the end of the next backward pass and hooked from then on.

    Returns a handle: ``handle.remove()`` takes the hooks off (and stops the
    worker), after which ``step()`` works as before.
    """
    if not isinstance(optimizer, KernelOptimizer):
        raise TypeError("step_in_backward takes a fastdescent.torch optimizer, "
                        f"not {type(optimizer).__module__}.{type(optimizer).__name__}")
    configured = [name for name in _NEEDS_ALL_GRADIENTS
                  if getattr(optimizer, name, None) or any(g.get(name) for g in optimizer.param_groups)]
    if configured:
        raise ValueError(f"step_in_backward cannot clip by the global gradient norm ({configured[0]} is "
                         "set): the norm needs every gradient before the first update")
    return StepInBackward(optimizer, bool(overlap))


class StepInBackward:
    """The hooks installed by :func:`step_in_backward`; ``remove()`` takes them off."""

    def __init__(self, optimizer, overlap):
        self.optimizer = optimizer
        self.overlap = overlap
        self._located = None   # the optimizer's parameters, while a backward pass runs
        self._backend = None
        self._error = None
        self._queue = None
        self._worker = None
        if overlap:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._work, name="fastdescent-step-in-backward", daemon=True)
            self._worker.start()
        self._handles = {}
        self._hook_new_parameters()

    def _hook_new_parameters(self):
        """Hook every parameter of the optimizer not hooked yet (groups added
        later); return those."""
        new = [p for group in self.optimizer.param_groups for p in group["params"] if id(p) not in self._handles]
        for p in new:
            self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._hook)
        return new

    def _hook(self, param):
        if param.grad is None:
            return
        try:
            if self._located is None:  # the first gradient of this backward pass
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_pass)
                self._backend = (resolve_backend(None), effective_n_threads(None))
                self._located = self.optimizer._locate()
            # A rebuild replaces the step counters pending writes update: only when idle.
            write, keep = self.optimizer._parameter_update(self._located, param, before_rebuild=self._drain)
        except BaseException:
            self._located = None
            self._drain(raise_error=False)
            raise
        param.grad = None
        if self.overlap:
            self._queue.put((write, keep, self._backend))
        else:
            write(*self._backend)

    def _drain(self, raise_error=True):
        if self.overlap:
            self._queue.join()
            error, self._error = self._error, None
            if error is not None and raise_error:
                raise error

    def _end_of_pass(self):
        try:
            self._drain()
            # Parameters added since the last pass had no hook in this one: step them now.
            for p in self._hook_new_parameters():
                if p.grad is not None:
                    write, keep = self.optimizer._parameter_update(self._located, p)
                    p.grad = None
                    write(*self._backend)
        finally:
            self._located = None
        # What a step() call tells the learning-rate schedulers (they warn otherwise).
        self.optimizer._opt_called = True

    def _work(self):
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                write, keep, backend = item
                if self._error is None:
                    write(*backend)
            except BaseException as error:  # raised by backward(), at the end of the pass
                self._error = error
            finally:
                item = write = keep = None  # frees the gradient
                self._queue.task_done()

    def wait(self):
        """Block until every update handed to the worker is done (``backward()``
        already waits for those of its pass)."""
        self._drain()

    def remove(self):
        """Take the hooks off and stop the worker."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}
        if self._worker is not None:
            self._drain(raise_error=False)
            self._queue.put(None)
            self._worker.join()
            self._worker = None
