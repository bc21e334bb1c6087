"""Drop-in ``torch.optim`` optimizers that step with fastdescent's fused kernels.

One class per rule spec, derived from the spec by :func:`torch_class`. A rule
with a ``torch.optim`` peer (``SGD``, ``Adam``...) subclasses its ``torch.optim``
namesake (so it takes the same arguments with the same defaults, keeps the same
``param_groups`` keys and the same ``state`` layout, and
``isinstance(opt, torch.optim.Adam)`` holds) and replaces only ``step``: the
parameters of a group that have a gradient are updated in place, on the tensors'
own memory, by one multi-tensor kernel call per dtype, through the rule's one
path to the kernel (``spec.run``). The equations are those of the functional
faces (``fastdescent.adam_step``...), which follow ``torch.optim``'s for-loop
implementation operation by operation. A rule ``torch.optim`` lacks (``Lion``...)
subclasses ``torch.optim.Optimizer`` with the constructor of the fastdescent
class (the rule's hyperparameters, without the NumPy-side options).

What runs: CPU parameters of dtype float32 or float64 (complex64/complex128 as
(real, imaginary) pairs, as ``torch.optim`` does), in any layout: dense ones
(contiguous, channels_last or any other order without gaps) are stepped in place;
gapped views (a slice with a step, a column) are gathered into a scratch block,
stepped and scattered back. A gradient laid out differently from its parameter
is copied first. What raises (naming the parameters): two parameters sharing an
element, a parameter overlapping itself, a gradient sharing memory with anything
the step writes (any parameter, state buffer, int8 scales or master copy of any
group: it would read what it writes), other devices, half/bfloat16/integer
parameters, sparse gradients, ``differentiable=True``, ``capturable=True``.
``foreach`` and ``fused`` are accepted and kept in the groups (for
``state_dict`` compatibility) but change nothing: the kernel is always the fused
one. With ``torch.amp.GradScaler`` the scaler unscales the gradients itself, as
for any optimizer without native AMP support. A step checks everything before
it writes anything (see :mod:`fastdescent.torch._adapter`).

A rule whose update sees each parameter whole (``spec.tensorwise``: Adafactor's
norms, rows and columns) gets each parameter contiguous in its logical order (one
laid out otherwise, channels_last or transposed, goes through the scratch block)
and refuses complex parameters, as its ``torch.optim`` peer does; its state
buffers of other shapes (``row_var``, ``col_var``) are kept contiguous, as
``torch.optim`` creates them.
"""

import warnings

import numpy as np
import torch
from torch.autograd.graph import increment_version

from .. import _tensorviews, precision
from .._config import effective_n_threads, resolve_backend
from ..optim.classes import class_doc, generated_init
from ..optim.lowprec import MASTER, scales_name, stored_call
from ..rules import SPECS
from ..rules._spec import FIRST_GRADIENT, NOTHING_FRESH, PARAMETER
from . import _layout, _lowprec
from ._adapter import (KernelOptimizer, _increment_version, _scalar_dtype, _where, init_like, kernel_doc,
                       new_step_tensor)

#: The parameter dtypes the kernels step natively (complex as real pairs); others go
#: through the stored formats of low-precision storage.
_NATIVE = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def _plain(value):
    """A hyperparameter as ``torch.optim`` may hold it (a tensor, a tuple of
    tensors) as the Python value the spec validates."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return tuple(map(_plain, value))
    return value


def _scalar_state_value(value):
    """A scalar state (NAdam's ``mu_product``) as the rule takes it: a float, or a
    ``numpy.float64`` (a float too) if torch keeps it in a float64 tensor, so that a
    rule that rounds it as torch does (NAdam) keeps torch's precision."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
        return np.float64(value.item())
    return float(value)


class SpecOptimizer(KernelOptimizer):
    """The rule-specific hooks of :class:`KernelOptimizer`, read off ``spec``."""

    spec = None

    def _hyper(self, group):
        """The group's hyperparameters, validated by the rule (the options
        ``torch.optim`` lacks take their defaults)."""
        return self._configure(group).hyper

    def _configure(self, group):
        """The group's validated configuration (a ``rules._spec.Config``: from the
        rule's cache if these very values were validated before)."""
        spec = self.spec
        values = {**spec.defaults, **{k: _plain(v) for k, v in group.items() if k != "params"}}
        return spec.configure(spec.values_of(values))

    def _check_param(self, group_index, index, group, p):
        super()._check_param(group_index, index, group, p)
        if self.spec.tensorwise and p.is_complex():  # its norms and factors are of real tensors
            raise TypeError(f"{_where(group_index, index, group, p)}: fastdescent.torch.{self.spec.title} does not "
                            f"support complex parameters (nor does torch.optim.{self.spec.torch})")
        self.spec.check_shape(p.shape, _where(group_index, index, group, p))  # param_ndim

    def _bucket(self, group_index, group, entries, names):
        b = super()._bucket(group_index, group, entries, names)
        if self._whole_tensors:  # the rule sees each parameter (and its buffers) in its shape
            b.param_views = [v.reshape(e.param.shape) for v, e in zip(b.param_views, entries)]
            b.state_views = [views if name in self._shaped else [v.reshape(e.param.shape) for v, e in zip(views, entries)]
                             for name, views in zip(names, b.state_views)]
        return b

    def _odd_grad_view(self, group_index, group, e, g):
        view, kept = super()._odd_grad_view(group_index, group, e, g)
        if self._whole_tensors:  # in the (row-major) layout of the parameter's view
            view = view.reshape(e.param.shape)
        return view, kept

    def _check_group(self, group_index, group):
        super()._check_group(group_index, group)
        first = {}
        for index, p in enumerate(group["params"]):
            if isinstance(p, torch.Tensor):
                first.setdefault(p.dtype, (index, p))
        if any(_lowprec.is_stored(self._fd_storage, d) for d in first):
            h = self._hyper(group)
            for index, p in first.values():
                _lowprec.check(self._fd_storage, self.spec, h, p, _where(group_index, index, group, p))

    def _after_init(self):
        super()._after_init()
        for group in self.param_groups:  # state torch.optim made in __init__ (Adagrad's), in our storage
            for p in group["params"]:
                state = self.state.get(p)
                if state and self._stored_dtype(p.dtype):
                    state.clear()
                    self._init_state(p, group, state)

    def _buffer_names(self, group):
        """The kernel's buffers, then the master copy and the int8 scales."""
        names = tuple(b.name for b in self.spec.needed(self._hyper(group)))
        storage = self._fd_storage
        extra = (MASTER,) if storage.master_weights else ()
        if storage.state_dtype == "int8":
            extra += tuple(scales_name(name) for name in names)
        return names + extra

    def _stored_dtype(self, dtype):
        return _lowprec.is_stored(self._fd_storage, dtype)

    def _expected_state(self, name, p):
        if not self._stored_dtype(p.dtype):  # (a rule with shaped buffers refuses stored formats)
            return super()._expected_state(name, p)
        return _lowprec.expected(self._fd_storage, self.spec, name, p)

    def _relayout(self, name, t, ref, state):
        t, scales = _lowprec.relayout(self._fd_storage, self.spec, name, t, ref, state.get(scales_name(name)))
        if scales is not None:
            state[scales_name(name)] = scales
        return t

    def _kept_names(self, param, names):
        if not self._shaped:
            return names
        return tuple(n for n in names if n not in self._shaped or self._buffer_shape(param, n) is not None)

    def _buffer_shape(self, param, name):
        if name not in self._shaped:
            return param.shape
        return next(b for b in self.spec.buffers if b.name == name).shape_for(param.shape)

    def _init_state(self, param, group, state):
        h = self._hyper(group)
        if self._counts_steps:
            state["step"] = new_step_tensor(group)
        # A scalar state is a tensor of torch.optim's dtype where torch.optim has the rule,
        # else a Python float: load_state_dict keeps floats, but casts tensors to the
        # parameter's dtype, which would round a float64 sum to float32.
        for s in self.spec.scalar_state:
            value = s.initial_value(h)
            state[s.name] = torch.tensor(value, dtype=_scalar_dtype()) if self.spec.torch else value
        if self._stored_dtype(param.dtype):
            return _lowprec.new_state(self._fd_storage, self.spec, h, param, state)
        fresh = False
        for b in self.spec.kept(h, param.shape):
            fill = b.initial(h)
            if fill is PARAMETER:
                state[b.name] = param.detach().clone(memory_format=torch.preserve_format)
                continue
            if fill is FIRST_GRADIENT:  # the kernel writes it in its first update
                fresh, fill = True, 0.0
            if param.is_complex():
                fill = complex(fill, fill)
            if b.shape is None:
                state[b.name] = torch.full_like(param, fill, memory_format=torch.preserve_format)
            else:  # as torch.optim.Adafactor's new_zeros: contiguous
                state[b.name] = torch.full(b.shape_for(param.shape), fill, dtype=param.dtype, device=param.device)
        return fresh

    def state_dict(self):
        """``torch.optim``'s state dict, plus ``"storage"`` (the storage options) unless
        they are the defaults. Load it into a ``torch.optim`` optimizer after
        :func:`fastdescent.torch.upcast_state_dict` when the state is bfloat16 or int8."""
        sd = super().state_dict()
        if not self._fd_storage.is_default:
            sd["storage"] = self._fd_storage.as_dict()
        return sd

    def load_state_dict(self, state_dict, convert=False):
        """``torch.optim``'s ``load_state_dict``, keeping stored state in its dtype
        (torch.optim casts floating state to the parameter's). A state dict saved with
        other storage options loads only with ``convert=True``, which converts it
        (to nearest) and says so with a :class:`fastdescent.precision.StateConversion`
        warning."""
        storage = self._fd_storage
        saved = _lowprec.saved_storage(state_dict, storage, convert)
        state_dict = {k: v for k, v in state_dict.items() if k != "storage"}
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        groups = [(p, g) for g, group in enumerate(self.param_groups) for p in group["params"]]
        if len(ids) != len(groups):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        params = dict(zip(ids, (p for p, _ in groups)))
        if saved != storage:
            saved_groups = [g for g in state_dict["param_groups"] for _ in g["params"]]
            hypers = {i: self._hyper(group) for i, group in zip(ids, saved_groups)}
            state_dict, done = _lowprec.convert_state(state_dict, saved, storage, self.spec, params, hypers)
            if done:
                warnings.warn("loaded state converted: " + "; ".join(done), precision.StateConversion, stacklevel=2)
        kept = {(i, k): v for i, entry in state_dict["state"].items() for k, v in entry.items()
                if isinstance(v, torch.Tensor) and k != "step" and i in params and v.dtype != params[i].dtype}
        super().load_state_dict(state_dict)
        for (i, key), value in kept.items():  # torch.optim cast every one to the parameter's dtype
            self.state[params[i]][key] = value.to(device=params[i].device)

    def _scalar_key(self, entry):
        return tuple(_scalar_state_value(entry.state[s.name]) for s in self.spec.scalar_state)

    def _kernel_call(self, config, step, fresh, scalars=()):
        """For the validated configuration ``config`` and step number ``step``, return
        ``run(kernels, params, grads, buffers, n_threads, ids)``, which only writes,
        through the rule's one path to the kernel (``config.kernel_arguments``: the
        scalars the optimizers and faces use; low-precision storage: ``spec.call``
        with the stored formats). ``run.advanced`` holds the scalar state after the
        step."""
        spec, h, storage = self.spec, config.hyper, self._fd_storage
        names = tuple(config.needed)
        fresh_names = config.fresh_first if fresh else NOTHING_FRESH
        counted = None if step is None else int(step)  # the step number, also for random keys
        step = None if step is None or not spec.uses_step else int(step)
        scalar_state = dict(zip((s.name for s in spec.scalar_state), scalars))
        invoke, constants, varying = config.kernel_arguments(step, 1.0, fresh_names, scalar_state)

        def run(kernels, params, grads, buffers, n_threads, ids=None):
            if spec.tensorwise:  # the gradients' views are flat (see _bucket)
                grads = [g.reshape(p.shape) for p, g in zip(params, grads)]
            if params and (not storage.is_default or precision.kind_of(params[0]) != precision.NATIVE):
                kernel_buffers = {name: buffers.get(name) for name in names}
                scales = {name: buffers[scales_name(name)] for name in names if scales_name(name) in buffers}
                kwargs = spec.kernel_arguments(h, step=step, grad_scale=1.0, fresh=fresh_names,
                                               scalar_state=scalar_state)
                params, grads, formats = precision.kernel_call(storage, spec, counted, params, grads, kernel_buffers,
                                                               buffers.get(MASTER), scales)
                spec.call(kernels, params, grads, kernel_buffers, kwargs, n_threads, formats, ids)
            else:
                invoke(kernels, params, grads, tuple([buffers.get(name) if name in names else None
                                                      for name in spec.buffer_names]),
                       constants, varying, n_threads)

        run.advanced = spec.advanced(h, step, scalar_state)
        return run

    def _step_plan(self):
        """The ``_tensorviews.StepPlan`` that repeats the step just taken while nothing
        but the gradients and the hyperparameter values changes, or None where the
        general way must run: a rule that sees whole tensors, mutable
        hyperparameters, a buffer still to initialise from the first gradient, scalar
        states that are not tensors (see ``_scalar_blocks``). A bucket in
        low-precision storage (or of bfloat16/float16 parameters) is stepped through
        its :class:`~fastdescent._runtime.StoredCall`."""
        spec = self.spec
        if self._whole_tensors:
            return None
        groups = []
        for group, plan in zip(self.param_groups, self._plans()):
            if plan is None or plan.group is not group or not plan.trusted:
                return None
            buckets = []
            for b in plan.buckets:
                if b.n_fresh or (not b.stored and b.entries[0].param.dtype not in _NATIVE) or b.scalars is None:
                    return None
                views = dict(zip(b.names, b.state_views))
                buffers = tuple([views.get(name) if needed else None
                                 for name, needed in zip(spec.buffer_names, plan.config.present)])
                scratch = tuple([(e.position, e.scratch, e.target) for e in b.gapped])
                stored = self._stored_call(b, plan.config, views, buffers) if b.stored else None
                buckets.append(_tensorviews.BucketStep(b.views, b.param_views, buffers, b.params, b.steps, b.scalars,
                                                       scratch, stored))
            groups.append(_tensorviews.GroupStep(group, plan.param_list, plan.params, plan.keys, plan.values,
                                                 tuple(plan.pending), plan.config.arguments, self._stateful(plan.config),
                                                 self._direct_kernel(plan.config), self._step_in_math, buckets))
        return _tensorviews.StepPlan(self.param_groups, self.state, groups, _increment_version, NOTHING_FRESH,
                                     self._written().table)

    def _stored_call(self, bucket, config, views, buffers):
        """The :class:`~fastdescent._runtime.StoredCall` of a low-precision bucket for a
        step plan (``views``: its state views by name; ``buffers``: those the kernel
        takes), as ``_kernel_call``'s ``run`` would call ``spec.call``."""
        scales = {name: views[scales_name(name)] for name in config.needed if scales_name(name) in views}
        return stored_call(self._fd_storage, self.spec, bucket.param_views, buffers, views.get(MASTER), scales,
                           bucket.ids, _lowprec.numpy_dtype_name(bucket.entries[0].param.dtype))

    def _stateful(self, config):
        """What a step plan calls for the kernel call and the scalar states after it,
        from the scalar states before (``Config.stateful_arguments``); None for a
        rule that keeps none."""
        return config.stateful_arguments if self.spec.scalar_state else None

    def _refresh_group(self, group_index, group_step):
        """A value in ``param_groups[group_index]`` was replaced since it was
        validated (a scheduler wrote ``lr``): validate the group again, raising for a
        bad value, and update the step plan's ``group_step``; False if the general
        way must run (mutable values, or other buffers needed)."""
        group, plan = self.param_groups[group_index], self._plans()[group_index]
        validated = self._validated(group_index, group)
        if self._buffer_names(group) != plan.buffer_names:
            return False
        self._record(plan, validated)
        if not plan.trusted:
            return False
        group_step.keys, group_step.values, group_step.arguments = plan.keys, plan.values, plan.config.arguments
        group_step.stateful, group_step.direct = self._stateful(plan.config), self._direct_kernel(plan.config)
        return True

    def _direct_kernel(self, config):
        """A ``_tensorviews.DirectKernel`` for the kernel calls of ``config``: the
        scalars' names in the order of the ``constants`` and ``varying`` of its
        ``KernelCall`` (which ``spec.prepared`` makes per tuple of names, so the
        same call means the same names); None for a rule with a runner."""
        spec = self.spec
        if spec.runner is not None:
            return None
        step = 1 if spec.uses_step else None
        state = {s.name: s.initial_value(config.hyper) for s in spec.scalar_state}
        invoke = config.kernel_arguments(step, 1.0, NOTHING_FRESH, state)[0]
        scalars = spec.kernel_arguments(config.hyper, step=step, grad_scale=1.0, fresh=NOTHING_FRESH, scalar_state=state)
        if spec.prepared(scalars)[0] is not invoke:
            return None
        constants = tuple([name for name in scalars if name not in spec.step_scalar_names])
        return _tensorviews.DirectKernel(invoke, spec.kernel, ("params", "grads", *spec.buffer_names),
                                         constants + tuple(spec.step_scalar_names))

    def _update_state(self, g, names, update):
        """For a rule's own methods (``spec.mixin``): call ``update(hyper, params,
        buffers, backend, n_threads)`` once per dtype of group ``g``, with the
        group's validated hyperparameters and NumPy views of its parameters that
        have the buffers ``names`` and of those buffers (name -> arrays). Every
        buffer is checked against its parameter before anything is written; a
        gapped parameter is stepped in a scratch copy and written back, as in a step."""
        group = self.param_groups[g]
        h = self._hyper(group)
        by_dtype, touched, scattered = {}, [], []
        for index, p in enumerate(group["params"]):
            state = self.state[p] if p in self.state else {}
            if not all(name in state for name in names):
                continue
            ref = p.detach()
            if not _layout.is_dense(p) or p.data_ptr() % p.element_size():
                ref = torch.empty(p.shape, dtype=p.dtype).copy_(ref)
                scattered.append((p, ref))
            params, buffers = by_dtype.setdefault(p.dtype, ([], {name: [] for name in names}))
            for name in names:
                t = state[name]
                if (not isinstance(t, torch.Tensor) or t.dtype != p.dtype or t.shape != p.shape
                        or t.device != p.device):
                    raise ValueError(f"{_where(g, index, group, p)}: state[{name!r}] does not match it")
                state[name] = _layout.in_layout_of(ref, t)
                buffers[name].append(_layout.flat_view(state[name]))
            params.append(_layout.flat_view(ref))
            touched.append(p)
        for params, buffers in by_dtype.values():
            update(h, params, buffers, resolve_backend(None), effective_n_threads(None))
        with torch.no_grad():
            for p, ref in scattered:
                p.copy_(ref)
        increment_version(touched)  # as torch's in-place writes would


def torch_class(spec):
    """The ``fastdescent.torch`` class of ``spec``, stepped by the rule's kernel: a
    subclass of ``torch.optim.<spec.torch>``, or of ``torch.optim.Optimizer`` with
    the spec's constructor if the rule has no ``torch.optim`` peer."""
    if spec.torch is not None:
        peer = getattr(torch.optim, spec.torch)
        bases, init, doc = (SpecOptimizer, peer), init_like(peer), kernel_doc(peer)
    else:
        body = ("    self._set_storage(state_dtype, rounding, seed, master_weights)\n"
                "    torch.optim.Optimizer.__init__(self, params, defaults)\n"
                "    self._after_init()\n"
                "    self.__dict__['_fd_plans'] = []\n")
        init = generated_init(spec, __name__, spec.title, body, {"torch": torch},
                              ("state_dtype=None", "rounding=None", "seed=None", "master_weights=False"))
        bases, doc = (SpecOptimizer, torch.optim.Optimizer), class_doc(spec, torch=True)
    if spec.mixin is not None:
        bases = (spec.mixin, *bases)
    return type(spec.title, bases, {
        "__doc__": doc, "__init__": init, "__module__": __name__,
        "spec": spec, "_counts_steps": spec.counts_steps, "_step_in_math": spec.uses_step,
        "_scalar_names": spec.scalar_state_names,
        "_shaped": frozenset(b.name for b in spec.buffers if b.shape is not None),
        "_whole_tensors": spec.tensorwise,
    })


#: Every rule whose ``torch.optim`` peer (if it has one) this PyTorch has: class name -> class.
CLASSES = {spec.title: torch_class(spec) for spec in SPECS.values()
           if spec.torch is None or hasattr(torch.optim, spec.torch)}
globals().update(CLASSES)

__all__ = list(CLASSES)
