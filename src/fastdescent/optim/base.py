"""The optimizer object shared by every update rule.

An :class:`Optimizer` holds parameter groups and per-parameter state the way
``torch.optim`` does, and takes a whole step with one kernel call per (group,
dtype) bucket: all arrays of a bucket go to the kernel together, which splits
their concatenated elements evenly among threads. Options add a flat arena (each
role of a bucket in one contiguous block), clipping by global norm or by value,
a non-finite gradient guard, and checkpoints (``state.py``). The rule is the
class's ``spec`` (:class:`~fastdescent.rules._spec.RuleSpec`): a rule's class is
derived from it by :func:`fastdescent.optim.optimizer_class`.
"""

import copy
import math
import operator
from collections.abc import Mapping
from numbers import Integral

import numpy as np

from .. import _checks, _runtime
from .._config import BACKENDS, effective_n_threads, resolve_backend
from ..rules._spec import FIRST_GRADIENT, PARAMETER
from .clipping import bucket_norm
from .lowprec import LowPrecision, check_low_precision_param, is_low_precision_param, scales_name, views as _views
from .state import Checkpointing

# torch.nn.utils.clip_grad_norm_ divides by norm + 1e-6.
_CLIP_EPS = 1e-6


class ParamState(dict):
    """``opt.state``: parameter index -> that parameter's state dict.

    The index counts parameters across groups in order (the index of PyTorch's
    ``state_dict()``). A parameter array itself also works as a key, as in
    ``torch.optim`` (``opt.state[p]``).
    """

    def __init__(self, index_by_id):
        super().__init__()
        self._index_by_id = index_by_id  # the optimizer's dict, not the optimizer: no cycle to keep it alive

    def _key(self, key):
        if not isinstance(key, np.ndarray):
            return key
        try:
            return self._index_by_id[id(key)]
        except KeyError:
            raise KeyError("this array is not a parameter of the optimizer") from None

    def __getitem__(self, key):
        return super().__getitem__(self._key(key))

    def __contains__(self, key):
        try:
            return super().__contains__(self._key(key))
        except KeyError:  # an array that is not a parameter
            return False

    def get(self, key, default=None):
        return self[key] if key in self else default


class ParamList(list):
    """A group's ``"params"``: a list that refuses changes. The optimizer's buckets,
    state and arenas are built for these arrays; add more with ``add_param_group``."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a parameter group's 'params' cannot change; use add_param_group() or a new optimizer")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self):  # copies and pickles are plain lists
        return (list, (list(self),))


class _Bucket:
    """The parameters of one group with one dtype: what one kernel call updates."""

    __slots__ = ("dtype", "positions", "span", "params", "arenas", "buffers", "stored")

    def __init__(self, dtype, positions, params):
        self.dtype = dtype
        self.positions = positions  # indices into the group's parameter list
        self.params = params        # the parameters at those positions
        contiguous = positions == list(range(positions[0], positions[0] + len(positions)))
        self.span = slice(positions[0], positions[-1] + 1) if contiguous else None
        self.arenas = {}  # flat layout: role -> one 1-D array for every parameter
        self.buffers = {}  # state buffer name -> the kernel's arrays (one per parameter, or the arena)
        self.stored = None  # low-precision storage: a lowprec.StoredBucket


class _Layout:
    """How one group's parameters are stored and bucketed."""

    __slots__ = ("first", "params", "buckets", "grad_views", "states", "checked", "hyper")

    def __init__(self, first, params, buckets, grad_views):
        self.first = first            # index of the group's first parameter
        self.params = params          # tuple: the arrays the group was built with
        self.buckets = buckets
        self.grad_views = grad_views  # flat layout: views into the gradient arenas
        self.states = None            # the parameters' state dicts, once they exist
        self.checked = None           # copies of the hyperparameters as last validated
        self.hyper = None             # and their validated values


class _Work:
    """One kernel call of a step."""

    __slots__ = ("group", "bucket", "params", "grads", "flat")

    def __init__(self, group, bucket, params, grads, flat):
        self.group, self.bucket, self.params, self.grads, self.flat = group, bucket, params, grads, flat


class Optimizer(LowPrecision, Checkpointing):
    """Base class: parameter groups, state, steps, clipping, checkpoints.

    A rule's class sets ``spec`` (its :class:`~fastdescent.rules._spec.RuleSpec`);
    :func:`fastdescent.optim.optimizer_class` derives the whole class from it.

    A step validates a group's hyperparameters with the rule's own validation
    (``spec.validate``, as the face does) only when a value changed since the last
    check, and each gradient against its parameter (``check_buffers``, in C); the
    state buffers are the optimizer's own, checked when created or loaded. It then
    reaches the kernel by the rule's one path (``spec.run``), once per bucket, so
    the per-array cost of a step is one gradient check and one pointer gather.

    Parameters
    ----------
    params : list of ndarray, or list of dict
        The parameters (C-contiguous float32/float64 arrays, updated in place),
        or parameter groups: dicts with ``"params"`` and any hyperparameters that
        differ from the defaults. The rule's constructor arguments (PyTorch's names
        and defaults) are the defaults; the options below follow them, by keyword.
    flat : bool
        Flat arena: the parameters, gradients and each state buffer of a (group,
        dtype) bucket each live in one contiguous block. The parameters are
        *copied* into it at construction: use ``opt.params`` (views into the
        arena, in the order given) as the model's arrays from then on, and fill
        ``opt.grads`` (views too) with the gradients; ``opt.step()`` then updates
        each bucket in a single kernel pass. Results are bit-identical to the
        per-array layout.
    clip_grad_norm : float or None
        Clip by global norm: with :math:`n` the 2-norm of all gradients of the
        step taken together (after ``grad_scale``), the gradients are multiplied
        by :math:`\\min(1, c / (n + 10^{-6}))` as ``torch.nn.utils.clip_grad_norm_``
        does. The norm costs one extra read of the gradients (a thread-count
        independent kernel); the factor reaches the rule through its
        ``grad_scale``, so the gradients are not rewritten. A non-finite norm gives
        the factor 0 (as torch for an infinite norm).
    clip_grad_value : float or None
        Clip by value: every gradient element is clamped in place to
        :math:`[-v, v]` (after ``grad_scale``; NaN stays NaN), as
        ``torch.nn.utils.clip_grad_value_``, before the norm is taken.
    skip_nonfinite : bool
        Non-finite guard, default **False** (like ``torch.optim``: no check, no
        cost, and a NaN or Inf gradient reaches the parameters). When True, a step
        whose gradients hold any NaN or Inf is skipped: parameters, state and
        gradients are left byte for byte as they were, ``step`` returns False and
        ``opt.skipped_steps`` counts it. The check is the norm pass (fused with
        clipping when that is on).
    backend : {"kernel", "reference"} or None
        None follows :func:`fastdescent.get_backend` at each step.
    n_threads : int or None
        See :func:`fastdescent.get_num_threads`.
    state_dtype : {None, "float32", "float64", "bfloat16", "int8"}
        The dtype of the rule's state buffers (:mod:`fastdescent.precision`); None:
        the parameters' dtype (float32 for float16 parameters or a master copy).
        ``"bfloat16"`` keeps ``ml_dtypes.bfloat16`` arrays; ``"int8"`` keeps 8-bit
        codes (int8, or uint8 for non-negative buffers) and a float32 scale per
        block of 256 elements (``state[name + "_scales"]``). The arithmetic runs in
        float32 either way, in the same single pass.
    rounding : {None, "nearest", "stochastic"}
        How values are rounded to 16 or 8 bits: to nearest even (None), or
        stochastically (unbiased; needs ``seed``; every rule then keeps
        ``state["step"]``). bfloat16/float16 parameters without a master copy need
        it given explicitly: round to nearest loses every update smaller than half
        their spacing.
    seed : int or None
        Seed of stochastic rounding's counter-based random bits.
    master_weights : bool
        For bfloat16 or float16 parameters: keep a float32 master copy
        (``state["master_param"]``), step it, and write its rounding to nearest
        into the parameters. Without it, bfloat16 parameters are rounded
        (``rounding``) from the float32 result of each step.

    Attributes
    ----------
    param_groups : list of dict
        ``"params"`` (a :class:`ParamList`: the arrays are fixed) plus every
        hyperparameter; write hyperparameters between steps (schedules do); a
        changed value is validated at the next step before anything is written.
    state : ParamState
        Per-parameter dicts with PyTorch's names (``step`` an int), only the
        buffers the configuration needs, created at a group's first step. Buffers
        are updated in place: modify them in place, or use ``load_state_dict``.
    skipped_steps : int
        Steps skipped by the non-finite guard since construction.
    last_grad_norm : float or None
        The global norm of the last step's gradients if it was computed (clipping
        or the guard on), else None.
    """

    spec = None  # the rule: a RuleSpec

    def __init__(self, params, defaults, *, flat=False, clip_grad_norm=None, clip_grad_value=None,
                 skip_nonfinite=False, backend=None, n_threads=None, state_dtype=None, rounding=None,
                 seed=None, master_weights=False):
        self._init_storage(state_dtype, rounding, seed, master_weights)
        self.defaults = dict(defaults)
        self._flat = bool(flat)
        self.backend = backend
        self.n_threads = n_threads
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.last_grad_norm = None
        self.param_groups = []
        self._index_by_id = {}
        self.state = ParamState(self._index_by_id)
        self._layouts = []
        self._registered = {}
        for group in _as_groups(params):
            self.add_param_group(group)

    # ----------------------------------------------------------------- options
    @property
    def flat(self):
        """True if the optimizer keeps its arrays in flat arenas (fixed at construction)."""
        return self._flat

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        if value is not None and value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {value!r}")
        self._backend = value

    @property
    def n_threads(self):
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value):
        effective_n_threads(value)  # validates
        self._n_threads = value

    @property
    def clip_grad_norm(self):
        return self._clip_grad_norm

    @clip_grad_norm.setter
    def clip_grad_norm(self, value):
        self._clip_grad_norm = None if value is None else _checks.positive("clip_grad_norm", value)

    @property
    def clip_grad_value(self):
        return self._clip_grad_value

    @clip_grad_value.setter
    def clip_grad_value(self, value):
        self._clip_grad_value = None if value is None else _checks.positive("clip_grad_value", value)

    @property
    def skip_nonfinite(self):
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"skip_nonfinite must be a bool, got {value!r}")
        self._skip_nonfinite = bool(value)

    # ------------------------------------------------------------- parameters
    @property
    def params(self):
        """Every parameter, group after group (views into the arena if ``flat``)."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def grads(self):
        """``flat=True``: the gradient views to fill, aligned with ``params``; else None."""
        if not self.flat:
            return None
        return [g for layout in self._layouts for g in layout.grad_views]

    def zero_grad(self):
        """Set the flat gradient arena to zero (``flat=True`` only)."""
        if not self.flat:
            raise ValueError("zero_grad() needs flat=True; otherwise the gradients are your own arrays")
        for layout in self._layouts:
            for bucket in layout.buckets:
                bucket.arenas["grad"].fill(0)

    def add_param_group(self, param_group):
        """Add a group: a dict with ``"params"`` and any hyperparameters (the rest
        from the constructor's defaults), validated before anything changes."""
        if not isinstance(param_group, Mapping):
            raise TypeError(f"a parameter group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("a parameter group needs a 'params' entry")
        g = len(self.param_groups)
        params = param_group["params"]
        params = [params] if isinstance(params, np.ndarray) else list(params)
        for k, p in enumerate(params):
            _check_param(p, f"param_groups[{g}]['params'][{k}]")
        _runtime.check_distinct("params", self.params + params)
        group = {"params": params, **self.defaults}
        group.update((k, v) for k, v in param_group.items() if k != "params")
        hyper = self.spec.validate(group, f"param_groups[{g}]")
        self._check_storage(g, hyper, {p.dtype for p in params})
        layout = self._layout(group, first=len(self._index_by_id))
        group["params"] = ParamList(layout.params)
        self.param_groups.append(group)
        self._layouts.append(layout)
        for k, p in enumerate(group["params"]):
            self._index_by_id[id(p)] = layout.first + k

    def _layout(self, group, first):
        params = group["params"]
        by_dtype = {}
        for k, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(k)
        grad_views = [None] * len(params) if self.flat else None
        arenas = {}
        if self.flat:  # copy the parameters into one block per dtype; views replace them
            for dtype, positions in by_dtype.items():
                shapes = [params[k].shape for k in positions]
                arena = np.concatenate([params[k].reshape(-1) for k in positions])
                grads = np.zeros_like(arena)
                arenas[dtype] = {"param": arena, "grad": grads}
                for k, view, grad in zip(positions, _views(arena, shapes), _views(grads, shapes)):
                    params[k] = view
                    grad_views[k] = grad
        buckets = []
        for dtype, positions in by_dtype.items():
            buckets.append(_Bucket(dtype, positions, [params[k] for k in positions]))
            buckets[-1].arenas.update(arenas.get(dtype, {}))
            buckets[-1].stored = self._new_stored_bucket(buckets[-1], first)
        return _Layout(first, tuple(params), buckets, grad_views)

    # ------------------------------------------------------------ rule hooks
    @property
    def _scalar_state_names(self):
        return tuple(state.name for state in self.spec.scalar_state)

    def _wanted(self, hyper):
        """The state buffers the validated hyperparameters ``hyper`` need: name ->
        initial value (a float, FIRST_GRADIENT or PARAMETER)."""
        return {b.name: b.initial(hyper) for b in self.spec.needed(hyper)}

    def _group_hyper(self, g):
        """Group ``g``'s validated hyperparameters: checked again only if a value
        was written since the last check (a copy of each value is kept to tell)."""
        group, layout = self.param_groups[g], self._layouts[g]
        if not _unchanged(layout.checked, group):
            hyper = self.spec.validate(group, f"param_groups[{g}]")
            self._check_storage(g, hyper, {b.dtype for b in layout.buckets})
            layout.hyper = hyper
            layout.checked = {k: copy.copy(v) for k, v in group.items() if k != "params"}
        return layout.hyper

    # ------------------------------------------------------------------ step
    def step(self, grads=None, group=None, *, grad_scale=1.0):
        """Take one step; return True, or False if the non-finite guard skipped it.

        Parameters
        ----------
        grads : list of ndarray, or None
            One gradient per parameter, aligned with the parameters of all groups
            in order (or of group ``group`` only). None with ``flat=True``: the
            gradient views ``opt.grads``.
        group : int or None
            Step only this group (its own steps, norm and clipping).
        grad_scale : float
            Multiplies every gradient as it is read (``1 / loss_scale`` removes a
            loss scale); composes with norm clipping.
        """
        selected = self._selected(group)
        grad_scale = _checks.positive("grad_scale", grad_scale)
        work = self._work(selected, grads)
        hyper = {g: self._group_hyper(g) for g in selected}
        steps = {g: self._next_step(g) for g in selected}
        scale = self._clip(work, grad_scale)
        if scale is None:
            self.skipped_steps += 1
            return False
        n_threads = effective_n_threads(self._n_threads)
        kernels = resolve_backend(self._backend)
        fresh = {g: self._allocate_state(g, hyper[g]) for g in selected}
        scalar_state = {g: self._scalar_state(g, hyper[g]) for g in selected}
        for item in work:
            g = item.group
            buffers = {name: self._buffer_lists(item, name) for name in self.spec.buffer_names}
            params, grads, buffers, formats, ids = self._kernel_arrays(item, buffers, steps[g])
            self.spec.run(kernels, params, grads, buffers, hyper[g], step=steps[g], grad_scale=scale,
                          fresh=fresh[g], scalar_state=scalar_state[g], n_threads=n_threads, formats=formats,
                          tensor_ids=ids)
        for g in selected:
            update = self.spec.advanced(hyper[g], steps[g], scalar_state[g])
            if self._counts_steps:
                update["step"] = steps[g]
            for state in self._layouts[g].states or ():
                state.update(update)
        return True

    def _buffer_lists(self, item, name):
        """The arrays of buffer ``name`` for one kernel call (None if not kept)."""
        if item.flat:
            arena = item.bucket.arenas.get(name)
            return None if arena is None else [arena]
        return item.bucket.buffers.get(name)

    def _scalar_state(self, g, hyper):
        """Group ``g``'s scalar states before this step (their initial values first)."""
        states = self._layouts[g].states
        return {s.name: states[0][s.name] if states and s.name in states[0] else s.initial_value(hyper)
                for s in self.spec.scalar_state}

    def _update_state(self, g, names, update):
        """For a rule's own methods (``spec.mixin``): if group ``g`` has the buffers
        ``names``, call ``update(hyper, params, buffers, backend, n_threads)`` once
        per dtype, with the group's validated hyperparameters, its parameters and
        their buffers (name -> arrays), the backend module and thread count a step
        would use."""
        layout = self._layouts[g]
        hyper = self._group_hyper(g)
        if layout.states is None or any(name not in layout.states[0] for name in names):
            return
        backend, n_threads = resolve_backend(self._backend), effective_n_threads(self._n_threads)
        for bucket in layout.buckets:
            if self.flat:
                update(hyper, [bucket.arenas["param"]], {n: [bucket.arenas[n]] for n in names}, backend, n_threads)
            else:
                update(hyper, bucket.params, {n: bucket.buffers[n] for n in names}, backend, n_threads)

    def _selected(self, group):
        if group is None:
            return range(len(self.param_groups))
        if isinstance(group, bool) or not isinstance(group, Integral):
            raise TypeError(f"group must be a group index or None, got {group!r}")
        if not 0 <= group < len(self.param_groups):
            raise ValueError(f"group {group} does not exist ({len(self.param_groups)} groups)")
        return [int(group)]

    def _work(self, selected, grads):
        """The kernel calls of a step, with every gradient validated."""
        for g in selected:
            layout = self._layouts[g]
            current = self.param_groups[g]["params"]
            if type(current) is ParamList:  # its elements cannot have changed
                continue
            if len(current) != len(layout.params) or not all(map(operator.is_, current, layout.params)):
                raise ValueError(
                    f"param_groups[{g}]['params'] changed since the group was added; "
                    "parameters are fixed (build a new optimizer or use add_param_group)"
                )
        if grads is None:
            if not self.flat:
                raise TypeError("step() needs grads, one per parameter, unless the optimizer is flat=True")
            return [_Work(g, b, [b.arenas["param"]], [b.arenas["grad"]], True)
                    for g in selected for b in self._layouts[g].buckets]
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list of arrays, got {type(grads).__name__}")
        expected = sum(len(self._layouts[g].params) for g in selected)
        if len(grads) != expected:
            raise ValueError(f"{len(grads)} gradients for {expected} parameters")
        work, offset = [], 0
        for g in selected:
            layout = self._layouts[g]
            n = len(layout.params)
            group_grads = grads if n == len(grads) else grads[offset:offset + n]
            offset += n
            if self.flat and all(map(operator.is_, group_grads, layout.grad_views)):
                work += [_Work(g, b, [b.arenas["param"]], [b.arenas["grad"]], True) for b in layout.buckets]
                continue
            for b in layout.buckets:
                if b.span is None:
                    bucket_grads = [group_grads[k] for k in b.positions]
                elif b.span.stop - b.span.start == len(group_grads) and isinstance(group_grads, list):
                    bucket_grads = group_grads
                else:
                    bucket_grads = list(group_grads[b.span])
                work.append(_Work(g, b, b.params, bucket_grads, False))
        for item in work:
            if item.bucket.stored is not None and not item.flat:
                self._check_stored_grads(item)
            elif not item.flat:
                try:
                    _checks.check_buffers(("param", "grad"), (item.params, item.grads), (True, False))
                except (TypeError, ValueError) as error:
                    raise type(error)(f"param_groups[{item.group}] ({item.bucket.dtype}): {error}") from None
        return work

    def _reads_grads_first(self):
        return self._skip_nonfinite or self._clip_grad_norm is not None or self._clip_grad_value is not None

    def _next_step(self, g):
        states = self._layouts[g].states
        return (states[0].get("step", 0) if states else 0) + 1

    def _clip(self, work, grad_scale):
        """The gradient scale the rule should apply, or None to skip the step."""
        if not self._reads_grads_first():
            self.last_grad_norm = None
            return grad_scale
        buckets = [item.grads for item in work]
        n_threads = effective_n_threads(self._n_threads)
        clip_value = self._clip_grad_value
        if clip_value is not None and self._skip_nonfinite:
            # Check before clamping, so that a skipped step leaves the gradients as they were.
            if not math.isfinite(bucket_norm(buckets, n_threads=n_threads, backend=self._backend)):
                return None
        limit = math.inf if clip_value is None else clip_value / grad_scale
        norm = grad_scale * bucket_norm(buckets, clip_value=limit, n_threads=n_threads, backend=self._backend)
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            if self._skip_nonfinite:
                return None
            return 0.0 if self._clip_grad_norm is not None else grad_scale
        if self._clip_grad_norm is not None:
            factor = self._clip_grad_norm / (norm + _CLIP_EPS)
            if factor < 1.0:
                return grad_scale * factor
        return grad_scale

    def _allocate_state(self, g, hyper):
        """Create the state buffers group ``g`` needs and lacks; return their names."""
        layout = self._layouts[g]
        wanted = self._wanted(hyper)
        masters = self._storage.master_weights
        if not layout.params or not (wanted or self._counts_steps or self.spec.scalar_state or masters):
            return frozenset()
        if layout.states is None:
            initial = {s.name: s.initial_value(hyper) for s in self.spec.scalar_state}
            if self._counts_steps:
                initial["step"] = 0
            layout.states = [dict(initial) for _ in layout.params]
            self.state.update(enumerate(layout.states, start=layout.first))
            if masters:
                self._allocate_masters(g)
        missing = [name for name in wanted if name not in layout.states[0]]
        for name in missing:
            self._allocate_buffer(g, name, wanted[name])
        return frozenset(missing)

    def _allocate_buffer(self, g, name, fill):
        layout = self._layouts[g]
        for bucket in layout.buckets:
            arrays, kernel_arrays, scales = self._new_state_buffer(bucket, name, fill)
            bucket.buffers[name] = kernel_arrays
            for k, array in zip(bucket.positions, arrays):
                layout.states[k][name] = array
            if scales is not None:
                bucket.stored.scales[name] = scales
                for k, scale in zip(bucket.positions, scales):
                    layout.states[k][scales_name(name)] = scale

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for g, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {g}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines + [")"])


def _unchanged(checked, group):
    """True if ``group``'s hyperparameters equal the copies in ``checked``."""
    if checked is None or len(checked) != len(group) - 1:
        return False
    try:
        return all(k == "params" or (k in checked and checked[k] == v) for k, v in group.items())
    except ValueError:  # an array-valued hyperparameter: just check it again
        return False


def _as_groups(params):
    if isinstance(params, (np.ndarray, Mapping)) or not hasattr(params, "__iter__"):
        raise TypeError(
            "params must be a list of numpy arrays or of parameter-group dicts, "
            f"got {type(params).__name__}"
        )
    params = list(params)
    if not params:
        raise ValueError("the optimizer got an empty parameter list")
    if all(isinstance(p, Mapping) for p in params):
        return params
    if any(isinstance(p, Mapping) for p in params):
        raise TypeError("params must be all arrays or all parameter-group dicts")
    return [{"params": params}]


def _check_param(p, where):
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(p).__name__}")
    if is_low_precision_param(p):
        check_low_precision_param(p, where)
        return
    try:
        _runtime.check_buffers(("param",), ([p],), (True,), False)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
