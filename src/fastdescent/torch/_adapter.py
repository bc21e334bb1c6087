"""The machinery shared by the ``torch.optim`` subclasses: NumPy views of tensors,
their cache, and one multi-tensor kernel call per parameter group and dtype.

Each optimizer keeps, per parameter group, a *plan*: NumPy views (sharing memory,
never copies) of every parameter and state buffer, sorted into one bucket per
parameter dtype. A plan is rebuilt when anything it caches may have moved:
another ``state`` mapping (``load_state_dict``), another group dict or parameter
list, a parameter whose storage moved (``param.data = ...``), a state tensor that
was replaced, or a parameter that gets its first gradient (its state is created
then, as ``torch.optim`` does).

A step runs in two phases. The first reads and checks everything: the plans, every
gradient (``_tensorviews.BucketViews`` views them in one C loop), every
hyperparameter. A gradient may share no byte with anything the step writes, for
its own parameter or any other: the byte spans of every parameter, state buffer,
step count and scratch block of every group are recorded when a plan changes
(``_written``: a ``_tensorviews.WrittenSpans``, sorted), and each gradient is
looked up there in that loop. The second only writes: it gathers the gapped
parameters into their scratch blocks, runs the kernels, scatters back and counts
the steps. So a step that raises has written nothing; the state it created for
parameters with a first gradient is removed again.

A group's hyperparameters and options are validated when one of its values is not
the very object validated last time (an identity check of every value in the
group's dict; a key added or removed counts too), and at every step if a value is
mutable (a tensor ``lr`` that a scheduler fills in place, a list): a write into
``param_groups`` between steps is seen before the next write to any tensor. The
kernel's scalars then come from the rule's validated configuration (computed once
per change of the values; a rule whose scalars change with the step computes only
those, ``spec.step_scalars``, at each step).

While nothing but the gradients changes, a step is one C call: after a step that
went the general way, the rule class builds a ``_tensorviews.StepPlan`` (per group:
the dict, its parameters and the values validated; per bucket: the views, the
buffers as the kernel takes them and the step counts), which does the same checks
and the same kernel calls and hands anything else back to the general way.

``state["step"]`` stays what ``torch.optim`` stores (a scalar float tensor per
parameter), but the scalars of one bucket are views into one small tensor, so a
step sets them all with one NumPy operation instead of one torch call each.
"""

import functools
from operator import is_

import numpy as np
import torch
from torch.optim import optimizer as _torch_optimizer

from .. import _tensorviews, precision
from .._checks import check_disjoint
from .._config import effective_n_threads, resolve_backend
from .._runtime import check_buffers, check_distinct, immutable, same_values
from . import _layout, _lowprec

_COMPLETE = _tensorviews.COMPLETE
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128, torch.bfloat16, torch.float16)
_TENSOR_METHODS = (torch.Tensor.data_ptr, torch.Tensor.is_contiguous, torch.Tensor.stride,
                   torch.Tensor.is_neg, torch.Tensor.is_conj, torch._C.TensorBase.__dict__["grad"],
                   getattr(torch.Tensor, "__dlpack_c_exchange_api__", None), (torch.Tensor, torch.nn.Parameter))
# torch.autograd.graph.increment_version without its argument handling (a list here).
_increment_version = torch._C._increment_version
_profiler_enabled = torch._C._autograd._profiler_enabled
# Step hooks registered for every optimizer (torch.optim.optimizer.register_optimizer_step_*_hook).
_GLOBAL_PRE_HOOKS = _torch_optimizer._global_optimizer_pre_hooks
_GLOBAL_POST_HOOKS = _torch_optimizer._global_optimizer_post_hooks


def _where(group_index, index, group, param):
    """How an error message names parameter ``index`` of group ``group_index``."""
    names = group.get("param_names")
    name = f"{names[index]!r} " if names and index < len(names) else ""
    return (f"parameter {name}(param_groups[{group_index}]['params'][{index}], "
            f"shape {tuple(param.shape)}, dtype {param.dtype}, device {param.device})")


class _Entry:
    """One parameter that has state: its tensors and the layout the kernel sees.

    ``ref`` is the tensor whose layout the gradient and state must share: the
    parameter itself if it is dense, else its block in the bucket's scratch arena
    (``scratch``); ``target`` is the parameter's detached alias, written back to."""

    __slots__ = ("param", "index", "ptr", "state", "keys", "tensors", "fresh", "ref", "scratch", "target",
                 "position", "global_index")


class _Bucket:
    """The parameters of one group and one dtype that have state: one kernel call per step.

    ``steps`` and ``scalars`` (one per scalar state of the rule) are NumPy views of
    ``step_block`` and ``scalar_blocks``, whose elements are the parameters'
    ``state["step"]`` and scalar states (``scalars`` None: those are not tensors
    that can be gathered so; see ``_scalar_blocks``)."""

    __slots__ = ("entries", "params", "param_views", "state_views", "names", "views", "step_block",
                 "steps", "scalar_blocks", "scalars", "n_fresh", "gapped", "ids", "stored")


class _Plan:
    """One group's views (``buckets``) and what they were built from; ``keys`` and
    ``values``: the group's other keys and the objects they held when validated
    (``config``: the validated configuration), ``trusted`` if those are all
    immutable; ``calls``: kernel calls by (step, fresh, scalar state), while trusted."""

    __slots__ = ("group", "state_map", "param_list", "params", "buffer_names", "buckets", "pending",
                 "keys", "values", "trusted", "config", "calls")


class _Work:
    """One bucket's share of a step, checked and ready to write.

    ``taken``: the positions updated (None: all); ``grads``: their gradient views;
    ``keep``: tensors those views point into; ``calls``: (run, positions or None,
    step) per kernel call; ``next_steps``: the new step counts."""

    __slots__ = ("bucket", "taken", "grads", "keep", "calls", "next_steps")


def _run(call, bucket, kernels, params, grads, states, n_threads, ids=None):
    """Run a call from ``_kernel_call`` on the arrays of ``bucket`` (``states``
    aligned with ``bucket.names``) with the backend module ``kernels``; ``ids``: the
    parameters' indices in the optimizer (their stochastic rounding keys)."""
    call(kernels, params, grads, dict(zip(bucket.names, states)), n_threads, ids)


class _Written:
    """What a step writes, for every group: ``table``, a ``_tensorviews.WrittenSpans``
    of their byte spans (the per-step lookup), and ``items``, ``(lo, hi, tensor,
    where)`` per array: its span, the tensor if it may have gaps (a gapped
    parameter: a hit on its span is an overlap only if an element is shared), and
    ``where``, arguments of ``_written_label`` (the error's words, made when raising)."""

    __slots__ = ("table", "items", "plans")


def _written_label(group_index, group, e, name):
    """How an error names written array ``name`` (None: the parameter) of entry ``e``."""
    where = _where(group_index, e.index, group, e.param)
    return where if name is None else f"state[{name!r}] of {where}"


class _Stale(Exception):
    """A cached view may no longer show the tensor's memory: rebuild the plan."""


class KernelOptimizer:
    """Mixin placed before a ``torch.optim`` class: replaces its ``step``.

    A rule class sets ``_counts_steps`` (it keeps ``state["step"]``),
    ``_step_in_math`` (the update depends on that count, so parameters at
    different counts need separate calls) and ``_scalar_names`` (the scalar
    states it keeps per parameter besides the count: NAdam's ``mu_product``) and
    defines:

    * ``_buffer_names(group)``: the state buffers the face takes, in its order;
    * ``_kept_names(param, names)``, ``_buffer_shape(param, name)``: the buffers of
      ``names`` a parameter keeps, and a buffer's shape (by default: all of them,
      shaped like the parameter); ``_shaped``: the names of the buffers shaped
      otherwise (held and viewed in their own shape, contiguous); buckets then
      group the parameters that keep the same buffers;
    * ``_whole_tensors``: the rule must see each parameter whole, contiguous in
      its logical order (a parameter laid out otherwise is stepped in a scratch
      copy, as a gapped one is);
    * ``_init_state(param, group, state)``: fill ``state`` as ``torch.optim``
      does when the parameter first has a gradient (by default: ``step`` and
      zeros); returns True if the new buffers must be initialised by the next
      update (SGD's momentum buffer);
    * ``_configure(group)``: validate the group's hyperparameters (raise for a bad
      one) and return the validated configuration;
    * ``_kernel_call(config, step, fresh, scalars)``: return ``run(kernels, params,
      grads, buffers, n_threads, ids)``, which calls the kernel for that
      configuration (``buffers``: name -> list of views) and only writes. ``step``
      is the number of the step being taken (a float, as ``state["step"]`` holds
      it) for a rule with ``_step_in_math``, else None; ``fresh`` is True for the
      parameters whose ``_init_state`` returned True and that take their first
      update; ``scalars``: the rule's scalar state (``_scalar_key``);
    * optionally ``_step_plan()``: a ``_tensorviews.StepPlan`` that repeats the
      step just taken while only the gradients change (None: always the general way).
    """

    _counts_steps = False
    _step_in_math = False
    _scalar_names = ()
    _shaped = frozenset()
    _whole_tensors = False
    _fd_storage = precision.Storage()

    def _set_storage(self, state_dtype, rounding, seed, master_weights):
        """The storage options (:class:`fastdescent.precision.Storage`), validated;
        with stochastic rounding every rule counts steps (its random bits' key)."""
        storage = precision.Storage.of(state_dtype, rounding, seed, master_weights)
        self.__dict__["_fd_storage"] = storage
        if storage.stochastic:
            self.__dict__["_counts_steps"] = self.__dict__["_step_in_math"] = True

    def __getstate__(self):
        state = super().__getstate__()
        state.update((k, self.__dict__[k]) for k in ("_fd_storage", "_counts_steps", "_step_in_math")
                     if k in self.__dict__)
        return state

    # -- construction ---------------------------------------------------------

    def _after_init(self):
        # GradScaler may then pass ``grad_scale``/``found_inf`` attributes to ``step``
        # (the fused torch path); we let it unscale and skip steps itself instead.
        self._step_supports_amp_scaling = False
        for group_index, group in enumerate(self.param_groups):
            self._check_group(group_index, group)
            for index, p in enumerate(group["params"]):
                self._check_param(group_index, index, group, p)
        self._check_overlaps()

    def __setstate__(self, state):
        # load_state_dict and unpickling come here: the cached views show old tensors.
        super().__setstate__(state)
        self._forget_plans()

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if "_fd_plans" in self.__dict__:  # not while torch's __init__ adds the first groups
            group_index = len(self.param_groups) - 1
            group = self.param_groups[group_index]
            try:
                self._check_group(group_index, group)
                for index, p in enumerate(group["params"]):
                    self._check_param(group_index, index, group, p)
                self._check_overlaps()
            except BaseException:
                self.param_groups.pop()
                raise

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
                f"{where()}: fastdescent kernels take float32, float64, bfloat16, float16 (and "
                f"complex64/128 as real pairs) parameters; cast the parameter or use torch.optim")
        if p.is_conj() or p.is_neg():
            raise TypeError(f"{where()} is a conjugate or negative view; resolve it first "
                            "(param.resolve_conj(), param.resolve_neg())")
        if _layout.overlaps_itself(p):
            raise ValueError(
                f"{where()} has elements that share memory (strides {p.stride()}): an "
                "in-place update is undefined for it, as in torch")

    def _check_overlaps(self):
        """Raise naming both if two parameters of any groups share an element."""
        found = [(group_index, index, group, p) for group_index, group in enumerate(self.param_groups)
                 for index, p in enumerate(group["params"])]
        key = tuple((p.data_ptr(), p.shape, p.stride()) for *_, p in found)
        if self.__dict__.get("_fd_checked") == key:
            return
        pair = _layout.first_overlap([p for *_, p in found])
        if pair is not None:
            first, second = (_where(*found[i]) for i in pair)
            raise ValueError(f"{first} and {second} share memory: each element may belong "
                             "to one parameter only")
        self.__dict__["_fd_checked"] = key

    def _init_state(self, param, group, state):
        if self._counts_steps:
            state["step"] = new_step_tensor(group)
        for name in self._buffer_names(group):
            state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return False

    def _kept_names(self, param, names):
        return names

    def _buffer_shape(self, param, name):
        return param.shape

    def _scalar_key(self, entry):
        """The rule's scalar state of ``entry`` (NAdam's ``mu_product``...) as a tuple:
        parameters are stepped together only if theirs are equal. None here."""
        return ()

    def _step_plan(self):
        return None

    def _refresh_group(self, group_index, group_step):
        return False

    # -- step -----------------------------------------------------------------

    def step(self, closure=None):
        """Perform a single optimization step (see the ``torch.optim`` class).

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss; it runs with gradients enabled.
        """
        # torch.optim wraps every step in a profiler range and its hook loops;
        # that costs microseconds, so take the wrapped path only when it matters.
        if (_GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or _profiler_enabled()):
            # The hooks see the arguments as given, as torch's wrapper shows them.
            return self._hooked_step() if closure is None else self._hooked_step(closure)
        return self._step(closure)

    step.hooked = True  # torch.optim.Optimizer must not wrap it again

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self.__dict__.get("_fd_step_plan")
        if plan is None or not plan.run(self.param_groups, self.state, resolve_backend(None),
                                        effective_n_threads(None), self._refresh_group):
            self.__dict__["_fd_step_plan"] = None
            self._apply_all(self._check_all())
            self.__dict__["_fd_step_plan"] = self._step_plan()
        return loss

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def _check_all(self):
        """Phase one of a step: every read and check, for every group; no write
        (state created for first gradients is removed again if anything fails).
        The gradients are read once every group's plan is current, against what
        they all write; if a stale view made a plan be built again meanwhile, they
        are all read again against the new spans."""
        created = []
        work = []
        try:
            groups = list(enumerate(self.param_groups))
            for group_index, group in groups:
                self._plan(group_index, group, created)
            for _ in range(2):
                written = self._written()
                for group_index, group in groups:
                    self._prepare(group_index, group, work, created, written)
                if self.__dict__.get("_fd_written") is written:
                    return work
                self._release(work)
                del work[:]
            raise RuntimeError("fastdescent.torch: a tensor moved while its views were built")
        except BaseException:
            self._remove_created(created)
            for plan in self._plans():
                for bucket in plan.buckets if plan is not None else ():
                    bucket.views.release()
            self._forget_plans()
            raise

    def _apply_all(self, work):
        """Phase two: the writes."""
        try:
            n_threads = effective_n_threads(None)
            kernels = resolve_backend(None)
            for item in work:
                self._apply(item, kernels, n_threads)
        finally:
            self._release(work)

    @staticmethod
    def _release(work):
        for item in work:
            item.bucket.views.release()
            item.keep = item.grads = None

    def _plans(self):
        plans = self.__dict__.get("_fd_plans")
        if plans is None:
            plans = self.__dict__["_fd_plans"] = []
        return plans

    def _plan(self, group_index, group, created):
        """The group's plan, rebuilt if anything it caches changed; its
        hyperparameters validated if they changed since the last step."""
        plans = self._plans()
        while len(plans) <= group_index:
            plans.append(None)
        plan = plans[group_index]
        if (plan is None or plan.group is not group or plan.state_map is not self.state
                or plan.param_list is not group["params"] or len(plan.params) != len(group["params"])
                or not all(map(is_, plan.params, group["params"]))):
            plan = plans[group_index] = self._build(group_index, group, created)
        for p in plan.pending:
            if p.grad is not None:  # its first gradient: create its state
                plan = plans[group_index] = self._build(group_index, group, created)
                break
        if not (plan.trusted and same_values(group, plan.keys, plan.values) and len(group) == len(plan.keys) + 1):
            plan = self._validate(group_index, group, plan, created)
        return plan

    def _validate(self, group_index, group, plan, created):
        """Validate the group's hyperparameters and options (raising for a bad one)
        and record them in ``plan`` (see ``_record``); rebuild the plan if they need
        other buffers. Returns the plan."""
        validated = self._validated(group_index, group)
        if self._buffer_names(group) != plan.buffer_names:
            plan = self._plans()[group_index] = self._build(group_index, group, created)
        self._record(plan, validated)
        return plan

    def _validated(self, group_index, group):
        """``(keys, values, config)``: the group's keys besides ``params``, the objects
        they hold, and its configuration, validated (raises for a bad value)."""
        keys = tuple([k for k in group if k != "params"])
        values = tuple([group[k] for k in keys])
        self._check_group(group_index, group)
        return keys, values, self._configure(group)

    @staticmethod
    def _record(plan, validated):
        """Keep in ``plan`` what was validated; its kernel calls are made again."""
        plan.keys, plan.values, plan.config = validated
        plan.calls = {}
        # A mutable value (a tensor lr that a scheduler fills in place) may change
        # without being replaced: such a group is validated at every step.
        plan.trusted = immutable(tuple([v for k, v in zip(plan.keys, plan.values) if k != "param_names"]))

    def _prepare(self, group_index, group, work, created, written):
        """Append the group's share of the step to ``work``, everything checked
        (its plan is current: ``_plan``; ``written``: ``_written()``)."""
        plan = self._plans()[group_index]
        start = len(work)
        try:
            self._prepare_buckets(plan, group_index, group, work, written)
        except _Stale:  # rebuild once: a new plan's views are current
            self._release(work[start:])
            del work[start:]
            plan = self._plans()[group_index] = self._build(group_index, group, created)
            plan = self._validate(group_index, group, plan, created)
            try:
                self._prepare_buckets(plan, group_index, group, work, written)
            except _Stale:
                raise RuntimeError("fastdescent.torch: a tensor moved while its views were built") from None

    def _prepare_buckets(self, plan, group_index, group, work, written):
        for bucket in plan.buckets:
            views = bucket.views
            status = views.collect(written.table)
            count = None if bucket.steps is None else _uniform_count(bucket.steps)
            if (status == _COMPLETE and not bucket.n_fresh and (count is not None or bucket.steps is None)
                    and self._same_scalars(bucket, bucket.entries)):
                # The usual step: every gradient there, one step count and scalar state, one kernel call.
                item = _Work()
                item.bucket, item.taken, item.grads, item.keep = bucket, None, views.views, views.grads
                step = item.next_steps = None if count is None else _next_count(bucket.steps, count)
                if not self._step_in_math:
                    step = None
                scalars = self._scalar_key(bucket.entries[0]) if bucket.entries else ()
                item.calls = ((self._cached_call(plan, step, False, scalars), None, step),)
            else:
                item = self._gather(group_index, group, bucket, status, written)
                if item is None:
                    continue
                item.calls = self._calls(plan, bucket, item, count)
            work.append(item)

    def _gather(self, group_index, group, bucket, status, written):
        """The bucket's work (gradient views, all checked), or None without
        gradients; ``status``: what ``bucket.views.collect(written.table)`` returned."""
        views = bucket.views
        if status == _COMPLETE:
            item = _Work()
            item.bucket, item.taken, item.grads, item.keep = bucket, None, views.views, views.grads
            return item
        if status == _tensorviews.STALE:
            raise _Stale
        missing = set(views.missing)
        taken = [k for k in range(len(bucket.entries)) if k not in missing]
        if not taken:
            return None
        grads = list(views.views)
        keep = list(views.grads)
        for k in views.odd:
            e = bucket.entries[k]
            view, copy = self._odd_grad_view(group_index, group, e, views.grads[k])
            grads[k] = view
            keep.append(copy)
            try:
                self._check_update(bucket, k, view)
                _check_written(written, copy)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{_where(group_index, e.index, group, e.param)}: {error}") from None
        item = _Work()
        item.bucket, item.keep = bucket, keep
        if len(taken) == len(bucket.entries):
            item.taken, item.grads = None, grads
        else:
            item.taken, item.grads = taken, [grads[k] for k in taken]
        return item

    def _odd_grad_view(self, group_index, group, e, g):
        """(view, tensor it shows) of a gradient the fast path did not take, or a
        clear error. A gradient laid out unlike its parameter is copied into the
        parameter's layout (it is only read); else it is viewed where it is, so
        that the aliasing check sees its real memory."""
        p = e.param
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
        g = g.detach()
        if (g.is_conj() or g.is_neg() or not _layout.same_layout(g, e.ref)
                or g.data_ptr() % g.element_size()):  # the kernels need aligned elements
            g = _layout.in_layout_of(e.ref, g.resolve_conj().resolve_neg())
            if g.data_ptr() % g.element_size():  # still: a view that was already in layout
                g = _layout.in_layout_of(e.ref, g.clone())
        return _layout.flat_view(g), g

    def _calls(self, plan, bucket, item, count):
        """The kernel calls of ``item``, hyperparameters validated: one, or one per
        step count (and per fresh/old SGD buffer, and per scalar state) if they
        differ; ``count``: the bucket's common step count, or None."""
        taken = item.taken
        entries = bucket.entries if taken is None else [bucket.entries[k] for k in taken]
        same_scalars = self._same_scalars(bucket, entries)
        if bucket.steps is None:
            item.next_steps = None
            if not bucket.n_fresh and same_scalars:
                return [(self._cached_call(plan, None, False, self._scalar_key(entries[0])), None, None)]
            keys = [(None, e.fresh, self._scalar_key(e)) for e in entries]
        elif count is not None and not bucket.n_fresh and same_scalars:
            step = _next_count(bucket.steps, count)
            item.next_steps = step
            if not self._step_in_math:
                step = None
            return [(self._cached_call(plan, step, False, self._scalar_key(entries[0])), None, step)]
        else:
            steps = bucket.steps if taken is None else bucket.steps[taken]
            next_steps = steps + 1  # in the step dtype, as torch counts
            item.next_steps = next_steps
            counts = next_steps.tolist() if self._step_in_math else [None] * len(entries)
            keys = list(zip(counts, (e.fresh for e in entries), map(self._scalar_key, entries)))
        calls = []
        for key in sorted(set(keys), key=lambda k: (k[0] or 0, k[1], k[2])):
            pick = [i for i, k in enumerate(keys) if k == key]
            calls.append((self._cached_call(plan, *key),
                          None if len(pick) == len(keys) else pick, key[0]))
        return calls

    def _cached_call(self, plan, step, fresh, scalars=()):
        """``_kernel_call`` for this step and the group's validated configuration,
        reused while that is unchanged and trusted (and, if the rule counts, for
        the same step and scalar state)."""
        key = (step, fresh, scalars)
        call = plan.calls.get(key) if plan.trusted else None
        if call is None:
            if len(plan.calls) > 4:
                plan.calls.clear()
            call = plan.calls[key] = self._kernel_call(plan.config, step, fresh, scalars)
        return call

    def _apply(self, item, kernels, n_threads):
        """Write ``item``: gather gapped parameters, run the kernels, scatter, count."""
        bucket, taken = item.bucket, item.taken
        if taken is None:
            params, states, torch_params = bucket.param_views, bucket.state_views, bucket.params
            gapped = bucket.gapped
        else:
            params = [bucket.param_views[k] for k in taken]
            states = [[views[k] for k in taken] for views in bucket.state_views]
            torch_params = [bucket.params[k] for k in taken]
            chosen = set(taken)
            gapped = [e for e in bucket.gapped if e.position in chosen]
        for e in gapped:
            e.scratch.copy_(e.target)
        grads = item.grads
        ids = bucket.ids if taken is None else [bucket.ids[k] for k in taken]
        for run, pick, _ in item.calls:
            if pick is None:
                _run(run, bucket, kernels, params, grads, states, n_threads, ids)
            else:
                _run(run, bucket, kernels, [params[i] for i in pick], [grads[i] for i in pick],
                     [[views[i] for i in pick] for views in states], n_threads, [ids[i] for i in pick])
            advanced = getattr(run, "advanced", None)
            if advanced:  # the rule's scalar state after the step, in each parameter's state
                entries = bucket.entries if taken is None else [bucket.entries[k] for k in taken]
                for e in entries if pick is None else [entries[i] for i in pick]:
                    for name, value in advanced.items():
                        _set_scalar_state(e.state, name, value)
        for e in gapped:
            e.target.copy_(e.scratch)
        if bucket.n_fresh:
            for e in (bucket.entries if taken is None else [bucket.entries[k] for k in taken]):
                if e.fresh:
                    e.fresh = False
                    bucket.n_fresh -= 1
        following = item.next_steps
        if following is not None:
            bucket.steps[... if taken is None else taken] = following
        # NumPy writes bypass autograd's version counters: bump them as torch's
        # in-place updates would, so a stale saved tensor is still detected.
        _increment_version(torch_params)

    # -- one parameter at a time (step_in_backward) ------------------------------

    def _locate(self):
        """{id(param): (group index, plan, bucket, position)} for the parameters
        with state; the plans checked as at the start of a step."""
        created = []
        try:
            located = {}
            for group_index, group in enumerate(self.param_groups):
                plan = self._plan(group_index, group, created)
                for bucket in plan.buckets:
                    for k, e in enumerate(bucket.entries):
                        located[id(e.param)] = (group_index, plan, bucket, k)
        except BaseException:
            self._remove_created(created)
            self._forget_plans()
            raise
        return located

    def _parameter_update(self, located, p, before_rebuild=None):
        """Check the update of parameter ``p`` from its ``.grad`` (everything a step
        checks for it) and return ``write(kernels, n_threads)``, which only
        writes, and the tensors it reads. ``located`` is from ``_locate``; it is
        refreshed here (after ``before_rebuild()``) if ``p`` has no state yet or
        its views are stale."""
        found = located.get(id(p))
        if found is not None:
            group_index, plan, bucket, k = found
            e = bucket.entries[k]
            if p.data_ptr() != e.ptr or not all(e.state.get(key) is t for key, t in zip(e.keys, e.tensors)):
                found = None
        if found is None:  # a first gradient, or moved tensors: rebuild the plans
            if before_rebuild is not None:
                before_rebuild()
            self._forget_plans()
            located.clear()
            located.update(self._locate())
            found = located.get(id(p))
            if found is None:
                raise ValueError("step_in_backward: a parameter whose gradient hook fired "
                                 "is in none of the optimizer's groups")
            group_index, plan, bucket, k = found
            e = bucket.entries[k]
        group = self.param_groups[group_index]
        grad = p.grad
        view, copy = self._odd_grad_view(group_index, group, e, grad)
        try:
            self._check_update(bucket, k, view)
            _check_written(self._written(), copy)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{_where(group_index, e.index, group, p)}: {error}") from None
        steps, following = bucket.steps, None
        if steps is not None:
            following = steps[k] + 1  # a NumPy scalar: torch's count in the step dtype
        run = self._cached_call(plan, float(following) if self._step_in_math else None, e.fresh,
                                self._scalar_key(e))
        # Bookkeeping of the hook's thread, before the write is handed over.
        if e.fresh:
            e.fresh = False
            bucket.n_fresh -= 1
        params, grads = [bucket.param_views[k]], [view]
        buffers = [[views[k]] for views in bucket.state_views]
        ids = [bucket.ids[k]]

        def write(kernels, n_threads):
            if e.scratch is not None:
                e.scratch.copy_(e.target)
            _run(run, bucket, kernels, params, grads, buffers, n_threads, ids)
            if e.scratch is not None:
                e.target.copy_(e.scratch)
            for name, value in (getattr(run, "advanced", None) or {}).items():
                _set_scalar_state(e.state, name, value)
            if following is not None:
                steps[k] = following
            _increment_version([p])
        return write, (grad, copy)

    @staticmethod
    def _remove_created(created):
        """After a failed step: remove the state created for it, so that the
        optimizer is as before the call."""
        for state, keys in reversed(created):
            for key in keys:
                state.pop(key, None)

    def _forget_plans(self):
        self.__dict__["_fd_plans"] = []
        self.__dict__["_fd_step_plan"] = None
        self.__dict__["_fd_written"] = None

    def _written(self):
        """A ``_Written`` of every array a step of the current plans writes (built
        again after a plan is built): each parameter with state (a gapped one by
        its extent, and its scratch block), its state buffers, step count and
        scalar states."""
        written = self.__dict__.get("_fd_written")
        if written is not None:
            return written
        items = []
        plans = self._plans()
        counted = (("step",) if self._counts_steps else ()) + tuple(self._scalar_names)
        for group_index, plan in enumerate(plans):
            for b in plan.buckets if plan is not None else ():
                for e in b.entries:
                    where = (group_index, plan.group, e)
                    items.append((e.target, e.scratch is not None, where + (None,)))
                    if e.scratch is not None:
                        items.append((e.scratch, False, where + (None,)))
                    items.extend((e.state[name], False, where + (name,)) for name in b.names + counted
                                 if isinstance(e.state.get(name), torch.Tensor))
        written = _Written()
        written.items = [(*span, t if gapped else None, where) for t, gapped, where in items
                         for span in (_layout.byte_span(t),) if span is not None]
        written.table = _tensorviews.WrittenSpans([item[:2] for item in written.items])
        written.plans = list(plans)  # the spans' memory stays theirs while the table lives
        self.__dict__["_fd_written"] = written
        return written

    # -- plans ----------------------------------------------------------------

    def _build(self, group_index, group, created):
        """Views of every parameter with state (creating the state of those that
        now have a first gradient), one bucket per dtype (and set of buffers kept).
        Appends what it creates to ``created`` as (mapping, keys) pairs."""
        self._check_group(group_index, group)
        self.__dict__["_fd_written"] = None  # the spans a step writes change with the plan
        names = self._buffer_names(group)
        step = ("step",) if self._counts_steps else ()
        plans = self._plans()
        old = plans[group_index] if group_index < len(plans) else None
        old_ptrs = {id(e.param): e.ptr for b in old.buckets for e in b.entries} if old is not None else {}
        moved = old is not None and (old.param_list is not group["params"] or len(old.params) != len(group["params"]))
        by_dtype = {}
        pending = []
        first = sum(len(g["params"]) for g in self.param_groups[:group_index])  # state_dict's numbering
        for index, p in enumerate(group["params"]):
            self._check_param(group_index, index, group, p)
            state = self.state[p] if p in self.state else None
            fresh = False
            kept = self._kept_names(p, names)
            if not self._has_state(state, kept):
                if p.grad is None:
                    pending.append(p)
                    continue
                if state is None:
                    created.append((self.state, [p]))
                    state = self.state[p]
                before = set(state)
                created.append((state, []))
                fresh = self._init_state(p, group, state)
                created[-1][1].extend(k for k in state if k not in before)
            e = _Entry()
            e.param, e.index, e.keys, e.fresh, e.ptr = p, index, kept + step, fresh, p.data_ptr()
            e.global_index = first + index
            moved = moved or old_ptrs.get(id(p), e.ptr) != e.ptr
            e.state = {} if state is None else state  # stateless rule (plain SGD)
            by_dtype.setdefault((p.dtype, kept), []).append(e)
        if moved:
            self._check_overlaps()
        plan = _Plan()
        plan.group, plan.state_map = group, self.state
        plan.param_list, plan.params = group["params"], tuple(group["params"])
        plan.buffer_names, plan.pending = names, pending
        plan.buckets = [self._bucket(group_index, group, entries, kept) for (_, kept), entries in by_dtype.items()]
        plan.keys = plan.values = plan.config = None
        plan.trusted, plan.calls = False, {}
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

    def _in_scratch(self, e):
        """True if the kernel steps ``e``'s parameter in a scratch copy: gapped or
        misaligned (from a byte buffer), or not in logical order for a rule that
        sees whole tensors."""
        in_place = torch.Tensor.is_contiguous if self._whole_tensors else _layout.is_dense
        return not in_place(e.param) or e.ptr % e.param.element_size()

    def _bucket(self, group_index, group, entries, names):
        b = _Bucket()
        b.entries, b.names = entries, names
        b.params = [e.param for e in entries]
        b.gapped = [e for e in entries if self._in_scratch(e)]
        scratch = _scratch_blocks(b.gapped)
        for position, e in enumerate(entries):
            e.position = position
            e.target = e.param.detach()
            e.scratch = scratch.get(id(e))
            e.ref = e.target if e.scratch is None else e.scratch
            self._conform_state(group_index, group, e, names)
        b.param_views = [_layout.flat_view(e.ref) for e in entries]
        b.state_views = [[e.state[name].detach().numpy() if name in self._shaped else _layout.flat_view(e.state[name])
                          for e in entries] for name in names]
        b.ids = [e.global_index for e in entries]
        b.stored = bool(entries) and self._stored_dtype(entries[0].param.dtype)
        self._check_distinct(group_index, group, b)
        b.n_fresh = sum(e.fresh for e in entries)
        b.steps, b.step_block = None, None
        if self._counts_steps and entries:
            first = entries[0].state["step"]
            b.step_block = _block(entries, "step", first.dtype if isinstance(first, torch.Tensor) else _scalar_dtype())
            b.steps = b.step_block.numpy()
        b.scalar_blocks = self._scalar_blocks(entries)
        b.scalars = None if b.scalar_blocks is None else tuple([block.numpy() for block in b.scalar_blocks])
        for e in entries:
            e.tensors = tuple(e.state[k] for k in e.keys)
        b.views = _tensorviews.BucketViews(
            b.params, [e.ptr for e in entries], [e.state for e in entries], entries[0].keys if entries else (),
            [e.tensors for e in entries], [v.size for v in b.param_views],
            _layout.real_dtype(entries[0].param.dtype) if entries else np.float32,
            bool(entries) and entries[0].param.is_complex(),
            [None if e.ref.is_contiguous() else tuple(e.ref.stride()) for e in entries],
            [[b.param_views[k], *(views[k] for views in b.state_views)] for k in range(len(entries))],
            _TENSOR_METHODS)
        return b

    def _scalar_blocks(self, entries):
        """The rule's scalar states of ``entries`` gathered as their step counts are:
        one tensor per name (``_scalar_names``), each parameter's ``state[name]`` a
        view into it, and the names added to the keys whose tensors a step checks.
        None (all left as they are) unless every one is a scalar float tensor and
        those of one name have one dtype: a rule without a ``torch.optim`` peer keeps
        Python floats."""
        names = self._scalar_names
        if not names or not entries:
            return ()
        dtypes = []
        for name in names:
            values = [e.state[name] for e in entries]
            if not all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == values[0].dtype
                       and v.dtype.is_floating_point and v.device.type == "cpu" for v in values):
                return None
            dtypes.append(values[0].dtype)
        for e in entries:
            e.keys = e.keys + names
        return tuple([_block(entries, name, dtype) for name, dtype in zip(names, dtypes)])

    def _same_scalars(self, bucket, entries):
        """True if ``entries`` of ``bucket`` all have the scalar state of the first
        (then one kernel call takes them all)."""
        if not self._scalar_names or len(entries) < 2:
            return True
        if bucket.scalars is not None and len(entries) == len(bucket.entries):
            return all([bool((values == values[0]).all()) for values in bucket.scalars])
        first = self._scalar_key(entries[0])
        return all([self._scalar_key(e) == first for e in entries])

    def _stored_dtype(self, dtype):
        """True if parameters of ``dtype`` are stepped through stored formats
        (low-precision storage: see ``SpecOptimizer``)."""
        return False

    def _expected_state(self, name, p):
        """``(dtype, shape)`` of state tensor ``name`` of ``p``: shape None: ``p``'s, in
        its layout; else that shape, contiguous (a buffer shaped otherwise)."""
        return p.dtype, (self._buffer_shape(p, name) if name in self._shaped else None)

    def _relayout(self, name, t, ref, state):
        """State tensor ``t`` in the layout of ``ref``."""
        return _layout.in_layout_of(ref, t)

    def _conform_state(self, group_index, group, e, names):
        """Check each state buffer against its parameter; give it the layout the
        kernel sees the parameter in if it has another (e.g. loaded from a
        contiguous checkpoint), or make it contiguous (a buffer of another shape)."""
        p = e.param
        for name in names:
            t = e.state[name]
            dtype, shape = self._expected_state(name, p)
            if (not isinstance(t, torch.Tensor) or t.device != p.device or t.dtype != dtype
                    or t.shape != (p.shape if shape is None else shape)):
                desc = (f"{type(t).__name__}" if not isinstance(t, torch.Tensor)
                        else f"{t.dtype} {tuple(t.shape)} on {t.device}")
                raise ValueError(f"{_where(group_index, e.index, group, p)}: state[{name!r}] is {desc}")
            if shape is not None:  # its own shape (Adafactor's factors, int8 scales): contiguous
                if not t.is_contiguous() or t.is_conj() or t.is_neg():
                    e.state[name] = t.resolve_conj().resolve_neg().contiguous()
            elif not _layout.same_layout(t, e.ref) or t.is_conj() or t.is_neg():
                e.state[name] = self._relayout(name, t.resolve_conj().resolve_neg(), e.ref, e.state)

    def _check_update(self, bucket, k, grad_view=None):
        """Check the arrays of entry ``k``'s update (and ``grad_view``, its gradient,
        if given): types, layouts (stored formats: their own dtypes and lengths),
        and no memory shared between them."""
        like = [(n, views[k]) for n, views in zip(bucket.names, bucket.state_views) if n not in self._shaped]
        roles = [("param", bucket.param_views[k])] + ([("grad", grad_view)] if grad_view is not None else []) + like
        names, arrays, writable = (tuple(n for n, _ in roles), tuple([v] for _, v in roles),
                                   tuple(n != "grad" for n, _ in roles))
        if bucket.stored:
            _lowprec.check_views(names, arrays, writable, "buffers")
        else:
            check_buffers(names, arrays, writable, False)
        if len(like) < len(bucket.names):
            written = {n: [views[k]] for n, views in zip(bucket.names, bucket.state_views)}
            written["param"] = [bucket.param_views[k]]
            check_disjoint(written, {"grad": [grad_view]}, False)

    def _check_distinct(self, group_index, group, bucket):
        """No two parameters share a state buffer, and no buffer of a parameter shares
        memory with another of its buffers (checked when a plan is built)."""
        for name, views in zip(bucket.names, bucket.state_views):
            try:
                check_distinct(name, views)
            except ValueError as error:
                raise ValueError(f"param_groups[{group_index}]: state buffers {error}") from None
        if not bucket.names:
            return
        for k, e in enumerate(bucket.entries):
            try:
                self._check_update(bucket, k)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{_where(group_index, e.index, group, e.param)}: {error}") from None


def _check_written(written, grad):
    """ValueError if gradient ``grad`` (the tensor the kernel reads) shares a byte with
    an array in ``written`` (a ``_Written``), naming that array."""
    span = _layout.byte_span(grad)
    if span is None or not written.table.hits(*span):
        return
    lo, hi = span
    for start, end, gapped, where in written.items:
        if start < hi and lo < end and (gapped is None or _layout.share_elements(gapped, grad)):
            raise ValueError(f"its gradient shares memory with {_written_label(*where)}, which the step writes")


def _scratch_blocks(entries):
    """{id(entry): a contiguous block of one arena shaped like the entry's parameter}
    for the gapped parameters of a bucket: each is gathered there, stepped and
    scattered back. Contiguous, because that is the layout autograd gives the
    gradient of a parameter that is not dense."""
    if not entries:
        return {}
    align = 16  # elements: each block starts on a 64-byte line (float32) or better
    offsets, total = [], 0
    for e in entries:
        offsets.append(total)
        total += -(-e.param.numel() // align) * align
    arena = torch.empty(total, dtype=entries[0].param.dtype)
    return {id(e): arena[offset:offset + e.param.numel()].view(e.param.shape)
            for e, offset in zip(entries, offsets)}


def _block(entries, key, dtype):
    """One tensor of ``dtype`` holding the scalar ``state[key]`` of every entry, each
    ``state[key]`` replaced by a view into it (a step then sets them all at once)."""
    block = torch.tensor([float(e.state[key]) for e in entries], dtype=dtype)
    for i, e in enumerate(entries):
        e.state[key] = block[i]
    return block


def _set_scalar_state(state, name, value):
    """Write a rule's scalar state after a step: fill a tensor (torch.optim's layout)
    in place, replace a Python float (a rule torch.optim lacks keeps floats)."""
    if isinstance(state[name], torch.Tensor):
        state[name].fill_(value)
    else:
        state[name] = value


_uniform_count = _tensorviews.uniform_count
_next_count = _tensorviews.next_count


def _scalar_dtype():
    """The dtype ``torch.optim`` gives ``state["step"]`` (non-fused groups)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def init_like(torch_class):
    """An ``__init__`` with ``torch_class``'s signature and defaults, plus the storage
    options (keyword only: ``state_dtype``, ``rounding``, ``seed``,
    ``master_weights``), which then checks the options and parameters
    fastdescent cannot run."""
    @functools.wraps(torch_class.__init__)
    def __init__(self, *args, state_dtype=None, rounding=None, seed=None, master_weights=False, **kwargs):
        self._set_storage(state_dtype, rounding, seed, master_weights)
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
