"""The machinery shared by the ``torch.optim`` subclasses: NumPy views of tensors,
their cache, and one multi-tensor kernel call per parameter group and dtype.

Each optimizer keeps, per parameter group, a *plan*: NumPy views (sharing memory,
never copies) of every parameter and state buffer, sorted into one bucket per
parameter dtype. A step then only has to look up the gradients, view them, and
hand the lists to the functional face (``fastdescent.adam_step``...), which checks
every buffer in C and runs the fused kernel. A plan is rebuilt when anything it
caches may have moved: another ``state`` mapping (``load_state_dict``), another
group dict or parameter list, a parameter whose storage moved (``param.data = ...``),
a state tensor that was replaced, or a parameter that gets its first gradient
(its state is created then, as ``torch.optim`` does).

``state["step"]`` stays what ``torch.optim`` stores (a scalar float tensor per
parameter), but the scalars of one bucket are views into one small tensor, so a
step increments them all with one NumPy operation instead of one torch call each.
"""

import functools
from itertools import repeat
from operator import attrgetter, is_, is_not, itemgetter

import numpy as np
import torch
from torch.autograd.graph import increment_version

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
_REAL_OF = {np.dtype(np.complex64): np.float32, np.dtype(np.complex128): np.float64}
# Unbound, to loop over many tensors in C with map().
_GRAD = attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_NUMPY = torch.Tensor.numpy


def _where(group_index, index, group, param):
    """How an error message names parameter ``index`` of group ``group_index``."""
    names = group.get("param_names")
    name = f"{names[index]!r} " if names and index < len(names) else ""
    return (f"parameter {name}(param_groups[{group_index}]['params'][{index}], "
            f"shape {tuple(param.shape)}, dtype {param.dtype}, device {param.device})")


def _is_dense(t):
    """True if ``t`` covers one block of memory without gaps or overlap, in any
    dimension order (contiguous, channels_last, a transposed contiguous tensor...)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _is_plain(t):
    """Real and C-contiguous: its ``.numpy()`` view can go to a kernel as it is."""
    return t.is_contiguous() and not t.is_complex()


def _flat_view(t):
    """1-D NumPy view of the memory of dense tensor ``t``, in memory order; complex
    elements as (real, imaginary) pairs. Elementwise rules may run on this view as
    long as every buffer of the update has the same layout."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.as_strided((t.numel(),), (1,))
    a = t.numpy().reshape(-1)
    real = _REAL_OF.get(a.dtype)
    return a if real is None else a.view(real)


def _view(t, plain):
    return t.detach().numpy() if plain else _flat_view(t)


def _same_layout(t, p):
    """True if ``t`` is laid out in memory as parameter ``p`` (so one elementwise
    pass may run over both memory blocks side by side)."""
    return t.is_contiguous() if p.is_contiguous() else t.stride() == p.stride()


def _in_layout_of(p, t):
    """``t`` itself if it is laid out as ``p``, else a copy in ``p``'s layout."""
    if _same_layout(t, p):
        return t
    return torch.empty_like(p, memory_format=torch.preserve_format).copy_(t)


class _Entry:
    """One parameter that has state: its tensors and where to check for changes."""

    __slots__ = ("param", "index", "ptr", "state", "keys", "tensors", "plain", "fresh")


class _Bucket:
    """The parameters of one group and one dtype: one kernel call per step."""

    __slots__ = ("entries", "params", "param_views", "state_views", "steps", "n_fresh",
                 "ptrs", "states", "checks", "all_plain")


class _Plan:
    __slots__ = ("group", "state_map", "param_list", "n_params", "buffer_names", "buckets", "pending")


class _Stale(Exception):
    """A cached view may no longer point at the tensor's memory: rebuild the plan."""


class KernelOptimizer:
    """Mixin placed before a ``torch.optim`` class: replaces its ``step``.

    A rule class sets ``_counts_steps`` (it keeps ``state["step"]``) and
    ``_step_in_math`` (the update depends on that count, so parameters at
    different counts need separate calls) and defines:

    * ``_buffer_names(group)``: the state buffers the face takes, in its order;
    * ``_init_state(param, group, state)``: fill ``state`` as ``torch.optim``
      does when the parameter first has a gradient (by default: ``step`` and
      zeros); returns True if the new buffers must be initialised by the next
      update (SGD's momentum buffer);
    * ``_update(group, params, grads, buffers, step, fresh, states)``: update the
      arrays (``states``: the parameters' torch state dicts, for a rule's scalar
      state such as NAdam's ``mu_product``).
    """

    _counts_steps = False
    _step_in_math = False

    # -- construction ---------------------------------------------------------

    def _after_init(self):
        # GradScaler may then pass ``grad_scale``/``found_inf`` attributes to ``step``
        # (the fused torch path); we let it unscale and skip steps itself instead.
        self._step_supports_amp_scaling = False
        for group_index, group in enumerate(self.param_groups):
            self._check_group(group_index, group)
            for index, p in enumerate(group["params"]):
                self._check_param(group_index, index, group, p)

    def __setstate__(self, state):
        # load_state_dict and unpickling come here: the cached views show old tensors.
        super().__setstate__(state)
        self.__dict__["_fd_plans"] = []

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if "_fd_plans" in self.__dict__:  # not while torch's __init__ adds the first groups
            group_index = len(self.param_groups) - 1
            group = self.param_groups[group_index]
            self._check_group(group_index, group)
            for index, p in enumerate(group["params"]):
                self._check_param(group_index, index, group, p)

    def _check_group(self, group_index, group):
        name = type(self).__name__
        for option in ("differentiable", "capturable"):
            if group.get(option, False):
                raise ValueError(
                    f"fastdescent.torch.{name} does not support {option}=True "
                    f"(param_groups[{group_index}]); use torch.optim.{name} for that")

    def _check_param(self, group_index, index, group, p):
        def where():
            return _where(group_index, index, group, p)
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where()} is not a torch.Tensor: {type(p).__name__}")
        if p.device.type != "cpu":
            raise ValueError(f"{where()}: fastdescent.torch runs on CPU tensors only")
        if p.layout != torch.strided:
            raise TypeError(f"{where()}: only dense (strided) parameters are supported, not {p.layout}")
        if p.dtype not in _KERNEL_DTYPES:
            raise TypeError(
                f"{where()}: fastdescent kernels take float32, float64 (and complex64/128 "
                f"as real pairs) parameters; cast the parameter or use torch.optim")
        if not _is_dense(p):
            raise ValueError(
                f"{where()} is not dense in memory (strides {p.stride()}): the kernels "
                "need parameters that fill one block (contiguous, channels_last...)")

    def _init_state(self, param, group, state):
        if self._counts_steps:
            state["step"] = new_step_tensor(group)
        for name in self._buffer_names(group):
            state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return False

    # -- step -----------------------------------------------------------------

    def step(self, closure=None):
        """Perform a single optimization step (see the ``torch.optim`` class).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss; it runs with gradients enabled.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            # Every group is checked and viewed before any is updated.
            work = [self._prepare(group_index, group) for group_index, group in enumerate(self.param_groups)]
            for group, calls in work:
                for bucket, taken, grads in calls:
                    self._run(group, bucket, taken, grads)
        except BaseException:
            self._forget_fresh_state()
            raise
        return loss

    def _plans(self):
        plans = self.__dict__.get("_fd_plans")
        if plans is None:
            plans = self.__dict__["_fd_plans"] = []
        return plans

    def _prepare(self, group_index, group):
        """(group, [(bucket, taken, grad views)]) for the parameters that have a gradient."""
        plans = self._plans()
        while len(plans) <= group_index:
            plans.append(None)
        plan = plans[group_index]
        if (plan is None or plan.group is not group or plan.state_map is not self.state
                or plan.param_list is not group["params"] or plan.n_params != len(group["params"])
                or plan.buffer_names != self._buffer_names(group)):
            plan = plans[group_index] = self._build(group_index, group)
        else:
            self._check_group(group_index, group)
        try:
            return group, self._gather(group_index, group, plan)
        except _Stale:
            plan = plans[group_index] = self._build(group_index, group)
            return group, self._gather(group_index, group, plan)

    def _gather(self, group_index, group, plan):
        """[(bucket, taken, grad views)] for the buckets with gradients; ``taken``
        lists the positions that have one (None: all of them)."""
        for p in plan.pending:
            if p.grad is not None:
                raise _Stale  # its first gradient: create its state
        calls = []
        for bucket in plan.buckets:
            grads = list(map(_GRAD, bucket.params))
            if all(map(is_not, grads, repeat(None))):
                self._check_fresh(bucket)
                views = self._plain_grad_views(bucket, grads)
                if views is None:
                    views = [self._grad_view(group_index, group, e, g) for e, g in zip(bucket.entries, grads)]
                calls.append((bucket, None, views))
                continue
            taken = [k for k, g in enumerate(grads) if g is not None]
            if taken:
                entries = [bucket.entries[k] for k in taken]
                for e in entries:
                    if e.param.data_ptr() != e.ptr or not all(map(is_, map(e.state.get, e.keys), e.tensors)):
                        raise _Stale
                views = [self._grad_view(group_index, group, e, grads[k]) for e, k in zip(entries, taken)]
                calls.append((bucket, taken, views))
        return calls

    @staticmethod
    def _check_fresh(bucket):
        """Raise _Stale unless every cached view still shows its tensor (in C loops:
        this runs for every parameter at every step)."""
        if list(map(_DATA_PTR, bucket.params)) != bucket.ptrs:
            raise _Stale
        for get, tensors in bucket.checks:
            if not all(map(is_, map(get, bucket.states), tensors)):
                raise _Stale

    @staticmethod
    def _plain_grad_views(bucket, grads):
        """``.numpy()`` of every gradient if all are plain and as their parameters
        (the common case), else None."""
        if not (bucket.all_plain and all(map(_IS_CONTIGUOUS, grads))):
            return None
        try:
            return list(map(_NUMPY, grads))  # fails for sparse, requires_grad, other devices...
        except (TypeError, RuntimeError):
            return None

    def _grad_view(self, group_index, group, e, g):
        """The gradient of ``e`` as a view the kernel can take, or a clear error.

        A gradient laid out differently from its parameter is copied into the
        parameter's layout (it is only read); everything else is a view.
        """
        p = e.param
        if e.plain and g.is_contiguous():
            try:
                return g.numpy()
            except (TypeError, RuntimeError):
                pass
        problem = None
        if g.layout != torch.strided:
            name = type(self).__name__
            problem = TypeError(f"fastdescent.torch.{name} does not support sparse gradients "
                                f"({g.layout}); use torch.optim.{name}")
        elif g.device != p.device:
            problem = ValueError(f"its gradient is on {g.device}")
        elif g.dtype != p.dtype:
            problem = TypeError(f"its gradient has dtype {g.dtype}")
        elif g.shape != p.shape:
            problem = ValueError(f"its gradient has shape {tuple(g.shape)}")
        if problem is not None:
            raise type(problem)(f"{_where(group_index, e.index, group, p)}: {problem}")
        return _view(_in_layout_of(p, g.detach().resolve_conj().resolve_neg()), e.plain)

    def _run(self, group, bucket, taken, grads):
        """Update the parameters ``taken`` (None: all) of ``bucket``: one face call,
        or one per step count (and per fresh/old SGD buffer) if they differ."""
        steps = bucket.steps
        if taken is None:
            entries, params, state = bucket.entries, bucket.param_views, bucket.state_views
            torch_params = bucket.params
        else:
            entries = [bucket.entries[k] for k in taken]
            params = [bucket.param_views[k] for k in taken]
            state = [[views[k] for k in taken] for views in bucket.state_views]
            torch_params = [bucket.params[k] for k in taken]
            if steps is not None:
                steps = steps[taken]
        next_steps = None if steps is None else steps + 1  # in the step dtype, as torch counts
        if self._step_in_math and not (next_steps == next_steps[0]).all():
            keys = next_steps.tolist()
        elif bucket.n_fresh:
            keys = [e.fresh for e in entries]
        else:
            keys = None
        if keys is None:
            step = None if next_steps is None else float(next_steps[0])
            self._update(group, params, grads, state, step, False, [e.state for e in entries])
        else:
            for key in sorted(set(keys)):
                pick = [i for i, k in enumerate(keys) if k == key]
                step = None if next_steps is None else float(next_steps[pick[0]])
                self._update(group, [params[i] for i in pick], [grads[i] for i in pick],
                             [[views[i] for i in pick] for views in state], step,
                             entries[pick[0]].fresh, [entries[i].state for i in pick])
        if bucket.n_fresh:
            for e in entries:
                if e.fresh:
                    e.fresh = False
                    bucket.n_fresh -= 1
        if steps is not None:
            if taken is None:
                bucket.steps[...] = next_steps
            else:
                bucket.steps[taken] = next_steps
        # NumPy writes bypass autograd's version counters: bump them as torch's
        # in-place updates would, so a stale saved tensor is still detected.
        increment_version(torch_params)

    def _forget_fresh_state(self):
        """After a failed step: drop buffers that were created for it and never
        written (SGD's momentum), so that no later step takes them for real state."""
        for plan in self._plans():
            for bucket in plan.buckets if plan is not None else ():
                for e in bucket.entries:
                    if e.fresh:
                        for name in e.keys:
                            e.state.pop(name, None)
        self.__dict__["_fd_plans"] = []

    # -- plans ----------------------------------------------------------------

    def _build(self, group_index, group):
        """Views of every parameter with state (creating the state of those that
        now have a first gradient), one bucket per dtype."""
        self._check_group(group_index, group)
        names = self._buffer_names(group)
        keys = names + (("step",) if self._counts_steps else ())
        by_dtype = {}
        pending = []
        for index, p in enumerate(group["params"]):
            self._check_param(group_index, index, group, p)
            state = self.state[p] if p in self.state else None
            fresh = False
            if not self._has_state(state, names):
                if p.grad is None:
                    pending.append(p)
                    continue
                state = self.state[p]
                fresh = self._init_state(p, group, state)
            e = _Entry()
            e.param, e.index, e.ptr, e.keys, e.fresh = p, index, p.data_ptr(), keys, fresh
            e.state = {} if state is None else state  # stateless rule (plain SGD)
            e.plain = _is_plain(p)
            self._conform_state(group_index, index, group, e, names)
            by_dtype.setdefault(p.dtype, []).append(e)
        plan = _Plan()
        plan.group, plan.state_map = group, self.state
        plan.param_list, plan.n_params = group["params"], len(group["params"])
        plan.buffer_names, plan.pending = names, pending
        plan.buckets = [self._bucket(entries, names) for entries in by_dtype.values()]
        return plan

    def _has_state(self, state, names):
        """True if ``state`` holds everything the update needs (plain SGD needs nothing)."""
        needed = names + (("step",) if self._counts_steps else ())
        if not needed:
            return True
        if not state:
            return False
        missing = [n for n in needed if n not in state]
        if missing and self._counts_steps:
            raise KeyError(
                f"optimizer state has no {missing} (an option that needs it was switched on "
                f"after the state was created; torch.optim.{type(self).__name__} fails the same way)")
        return not missing

    def _conform_state(self, group_index, index, group, e, names):
        """Check each state buffer against its parameter; give it the parameter's
        layout if it has another (e.g. loaded from a contiguous checkpoint)."""
        p = e.param
        for name in names:
            t = e.state[name]
            if not isinstance(t, torch.Tensor) or t.device != p.device or t.dtype != p.dtype or t.shape != p.shape:
                desc = (f"{type(t).__name__}" if not isinstance(t, torch.Tensor)
                        else f"{t.dtype} {tuple(t.shape)} on {t.device}")
                raise ValueError(f"{_where(group_index, index, group, p)}: state[{name!r}] is {desc}")
            e.state[name] = _in_layout_of(p, t)

    def _bucket(self, entries, names):
        b = _Bucket()
        b.entries = entries
        b.params = [e.param for e in entries]
        b.param_views = [_view(e.param, e.plain) for e in entries]
        b.state_views = [[_view(e.state[name], e.plain) for e in entries] for name in names]
        b.n_fresh = sum(e.fresh for e in entries)
        from .._runtime import check_distinct

        check_distinct("param", b.param_views)
        for name, views in zip(names, b.state_views):
            check_distinct(name, views)
        b.steps = None
        if self._counts_steps and entries:
            first = entries[0].state["step"]
            dtype = first.dtype if isinstance(first, torch.Tensor) else _scalar_dtype()
            block = torch.tensor([float(e.state["step"]) for e in entries], dtype=dtype)
            for i, e in enumerate(entries):
                e.state["step"] = block[i]
            b.steps = block.numpy()
        for e in entries:
            e.tensors = tuple(e.state[k] for k in e.keys)
        b.ptrs = [e.ptr for e in entries]
        b.states = [e.state for e in entries]
        keys = entries[0].keys if entries else ()
        b.checks = [(itemgetter(key), [e.state[key] for e in entries]) for key in keys]
        b.all_plain = all(e.plain for e in entries)
        return b


def _scalar_dtype():
    """The dtype ``torch.optim`` gives ``state["step"]`` (non-fused groups)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def init_like(torch_class):
    """An ``__init__`` with ``torch_class``'s signature and defaults, which then
    checks the options and parameters fastdescent cannot run."""
    @functools.wraps(torch_class.__init__)
    def __init__(self, *args, **kwargs):
        torch_class.__init__(self, *args, **kwargs)
        self._after_init()
        self.__dict__["_fd_plans"] = []
    return __init__


def new_step_tensor(group):
    """``state["step"]`` as ``torch.optim`` creates it on a CPU parameter."""
    return torch.tensor(0.0, dtype=torch.float32 if group.get("fused") else _scalar_dtype())


def kernel_doc(torch_class):
    """The docstring of ``torch_class``, headed by what the fastdescent version changes."""
    name = torch_class.__name__
    return (f"``torch.optim.{name}`` stepped by fastdescent's fused multi-tensor kernel.\n\n"
            f"Same arguments, defaults, state and results (to float rounding) as\n"
            f"``torch.optim.{name}``; see :mod:`fastdescent.torch` for what runs and what raises.\n"
            f"PyTorch's documentation follows.\n\n{torch_class.__doc__}")
