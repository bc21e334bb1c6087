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

import math
import operator
import threading
from collections.abc import Mapping
from numbers import Integral

import numpy as np

from .. import _checks, _runtime
from .._config import BACKENDS, effective_n_threads, resolve_backend
from ..rules._spec import CALL_DEFAULTS, FIRST_GRADIENT, NOTHING_FRESH, PARAMETER
from .accumulate import Accumulation
from .clipping import bucket_norm
from .lowprec import LowPrecision, check_low_precision_param, is_low_precision_param, scales_name, views as _views
from .state import Checkpointing, _step_count

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

    __slots__ = ("dtype", "positions", "span", "params", "arenas", "buffers", "kernel_buffers", "stored")

    def __init__(self, dtype, positions, params):
        self.dtype = dtype
        self.positions = positions  # indices into the group's parameter list
        self.params = params        # the parameters at those positions
        contiguous = positions == list(range(positions[0], positions[0] + len(positions)))
        self.span = slice(positions[0], positions[-1] + 1) if contiguous else None
        self.arenas = {}  # flat layout: role -> one 1-D array for every parameter
        self.buffers = {}  # state buffer name -> the kernel's arrays (one per parameter, or views if flat)
        # The buffers as the kernel takes them (one list or None per declared buffer):
        # (per array, flat arena), built when the state changes.
        self.kernel_buffers = None
        self.stored = None  # low-precision storage: a lowprec.StoredBucket


class _Layout:
    """How one group's parameters are stored and bucketed."""

    __slots__ = ("index", "first", "params", "param_list", "buckets", "grad_views", "states", "config", "values",
                 "complete")

    def __init__(self, index, first, params, buckets, grad_views):
        self.index = index            # the group's index in param_groups
        self.first = first            # index of the group's first parameter
        self.params = params          # tuple: the arrays the group was built with
        self.param_list = None        # the ParamList in param_groups[index]["params"]
        self.buckets = buckets
        self.grad_views = grad_views  # flat layout: views into the gradient arenas
        self.states = None            # the parameters' state dicts, once they exist
        self.config = None            # the hyperparameters as last validated (a rule Config)
        self.values = None            # the group's objects that config is for (a cached config may hold equal others)
        self.complete = None          # a config whose buffers all exist (none need creating)


class Optimizer(LowPrecision, Checkpointing):
    """Base class: parameter groups, state, steps, clipping, checkpoints.

    A rule's class sets ``spec`` (its :class:`~fastdescent.rules._spec.RuleSpec`);
    :func:`fastdescent.optim.optimizer_class` derives the whole class from it.

    A step keeps a plan: each group's validated hyperparameters (a rule
    :class:`~fastdescent.rules._spec.Config`) and kernel scalars, and a table of
    every array the optimizer writes (:class:`~fastdescent._runtime.WrittenBuffers`:
    parameters and state buffers, checked for overlap once). A hyperparameter is
    validated again, with the rule's own validation (as the face does), only when
    its value in ``param_groups`` is no longer the very object validated last time
    (or is mutable, such as a list), so a write is always seen before the next
    step writes anything. Per step, in C and without Python work per array, the
    table confirms that no array changed in place and each gradient is checked
    (dtype, shape, layout, and no byte shared with any array the step writes).
    Everything that can fail is checked for every group before the first write,
    so a step that raises leaves every parameter, state buffer and step count as
    it was. It then reaches the kernel by the rule's one path, once per bucket.

    Steps are thread-safe: one optimizer's steps are serialized (a thread that
    calls ``step`` while another thread's step runs waits for it, so each step is
    whole and counted once); so are ``state_dict``, ``load_state_dict``, ``save``,
    ``load``, ``add_param_group`` and ``zero_grad``. Different optimizers step in
    parallel.

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
    accumulate_steps : int
        Gradient accumulation over ``k`` micro-batches (default 1: none). Calls
        1 .. k-1 of :meth:`step` in each window are micro-steps: they add
        ``grad_scale * grads`` into an accumulator per parameter (the
        parameter's dtype, created at the first micro-step) and return False,
        leaving the parameters and the state (step counts too) untouched. Call
        k takes one step on the mean of the k scaled gradients: the rule's step
        on their sum :math:`S` with ``grad_scale = 1/k``, bit-identical to
        ``step(S, grad_scale=1/k)`` without accumulation, with :math:`S` summed
        in call order; it returns True. Only that call counts as a step (bias
        corrections, ``state[i]["step"]``): step a scheduler when ``step``
        returns True (``if opt.step(grads): sched.step()``), or read
        the property ``pending_micro_steps``. For an elementwise rule that call is one
        fused pass (the accumulators are read once, then zeroed, in the pass
        that updates the parameters); clipping and the non-finite guard apply
        to the accumulated gradient (:math:`S` first, then the norm of
        :math:`S/k`; a skipped step discards the window). The open window
        (its count and accumulators) is part of ``state_dict`` and of
        checkpoints, so a resumed run continues it exactly. With ``k > 1``,
        ``step(group=...)`` is refused, and neither ``accumulate_steps`` nor the
        groups (``add_param_group``) may change inside a window.
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
                 skip_nonfinite=False, backend=None, n_threads=None, accumulate_steps=1, state_dtype=None,
                 rounding=None, seed=None, master_weights=False):
        self._accumulation = Accumulation(accumulate_steps)  # gradient accumulation (accumulate.py)
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
        self._lock = threading.RLock()
        self._written = None  # WrittenBuffers of every parameter and state buffer, built when needed
        self._plan = None     # the StepPlan of the steady state, built after a step that went the general way
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
        self._plan = None

    @property
    def clip_grad_value(self):
        return self._clip_grad_value

    @clip_grad_value.setter
    def clip_grad_value(self, value):
        self._clip_grad_value = None if value is None else _checks.positive("clip_grad_value", value)
        self._plan = None

    @property
    def skip_nonfinite(self):
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"skip_nonfinite must be a bool, got {value!r}")
        self._skip_nonfinite = bool(value)
        self._plan = None

    @property
    def accumulate_steps(self):
        """Gradient accumulation over this many micro-steps (see the class docstring);
        may change only between windows."""
        return self._accumulation.steps

    @accumulate_steps.setter
    def accumulate_steps(self, value):
        with self._lock:
            self._accumulation.steps = value
            self._written = self._plan = None  # the accumulators may have gone

    @property
    def pending_micro_steps(self):
        """Micro-steps taken in the current accumulation window (0 .. k-1)."""
        return self._accumulation.pending

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
        with self._lock:
            for layout in self._layouts:
                for bucket in layout.buckets:
                    bucket.arenas["grad"].fill(0)

    def add_param_group(self, param_group):
        """Add a group: a dict with ``"params"`` and any hyperparameters (the rest
        from the constructor's defaults), validated before anything changes."""
        with self._lock:
            self._add_param_group(param_group)

    def _add_param_group(self, param_group):
        if not isinstance(param_group, Mapping):
            raise TypeError(f"a parameter group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("a parameter group needs a 'params' entry")
        self._accumulation.check_unchanged("add_param_group()")
        g = len(self.param_groups)
        params = param_group["params"]
        params = [params] if isinstance(params, np.ndarray) else list(params)
        for k, p in enumerate(params):
            _check_param(p, f"param_groups[{g}]['params'][{k}]")
            self.spec.check_shape(p.shape, f"param_groups[{g}]['params'][{k}]")
        _runtime.check_distinct("params", self.params + params)
        group = {"params": params, **self.defaults}
        group.update((k, v) for k, v in param_group.items() if k != "params")
        hyper = self.spec.validate(group, f"param_groups[{g}]")
        self._check_storage(g, hyper, {p.dtype for p in params})
        layout = self._layout(group, first=len(self._index_by_id))
        group["params"] = layout.param_list = ParamList(layout.params)
        self.param_groups.append(group)
        self._layouts.append(layout)
        self._written = self._plan = None
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
            buckets[-1].stored = self._new_stored_bucket(buckets[-1], len(self._layouts), first)
        return _Layout(len(self._layouts), first, tuple(params), buckets, grad_views)

    # ------------------------------------------------------------ rule hooks
    @property
    def _scalar_state_names(self):
        return tuple(state.name for state in self.spec.scalar_state)

    def _wanted(self, hyper):
        """The state buffers the validated hyperparameters ``hyper`` need: name ->
        initial value (a float, FIRST_GRADIENT or PARAMETER)."""
        return {b.name: b.initial(hyper) for b in self.spec.needed(hyper)}

    def _config(self, layout):
        """The group's validated hyperparameters (a rule Config). They are
        validated again only when a value in the group is not the very object
        validated last time, or the last values were mutable (a list, an array):
        then only the values that changed (see ``RuleSpec.configure``)."""
        group, config = self.param_groups[layout.index], layout.config
        if config is None or not config.trusted or not _runtime.same_values(group, self.spec.hyper_names,
                                                                            layout.values):
            where = f"param_groups[{layout.index}]"
            values = self.spec.values_of(group, where)
            config = self.spec.configure(values, where, previous=config)
            self._check_storage(layout.index, config.hyper, {b.dtype for b in layout.buckets})
            layout.config, layout.values = config, values
        return config

    # ------------------------------------------------------------------ step
    def step(self, grads=None, group=None, *, grad_scale=1.0):
        """Take one step; return True if it updated the parameters: False if the
        non-finite guard skipped it, or for a micro-step of gradient accumulation
        (``accumulate_steps``, see the class docstring).

        A step checks everything before it writes anything: if it raises, every
        parameter, state buffer and step count is as it was. Steps of one
        optimizer from several threads are serialized (see the class docstring).

        Parameters
        ----------
        grads : list of ndarray, or None
            One gradient per parameter, aligned with the parameters of all groups
            in order (or of group ``group`` only). None with ``flat=True``: the
            gradient views ``opt.grads``. A gradient may share no memory with a
            parameter or state buffer that the step writes.
        group : int or None
            Step only this group (its own steps, norm and clipping).
        grad_scale : float
            Multiplies every gradient as it is read (``1 / loss_scale`` removes a
            loss scale); composes with norm clipping.
        """
        lock = self._lock
        lock.acquire()
        try:
            # (A plan exists only while accumulate_steps is 1.)
            plan = self._plan
            if plan is not None and group is None and plan.run(self.param_groups, grads, grad_scale, self._backend,
                                                               self._n_threads, self):
                return True
            if self._accumulation.steps != 1:
                return self._accumulation.step(self, grads, group, grad_scale)
            return self._step(grads, group, grad_scale)
        finally:
            lock.release()

    def _step(self, grads, group, grad_scale, finish=None):
        """The general way of a step (the plan's way is the same, in C, while
        nothing but the gradients changes). ``finish``: the last micro-step of a
        gradient accumulation (an :class:`~fastdescent.optim.accumulate.Accumulation`),
        whose sum the rule steps on."""
        if type(grad_scale) is not float or not 0.0 < grad_scale < math.inf:
            grad_scale = _checks.positive("grad_scale", grad_scale)
        layouts = self._layouts if group is None else self._selected(group)
        # Everything that can fail, for every group, before the first write: the
        # hyperparameters, the arrays, the step counts and scalar states, the
        # clipping norm and the kernel scalars.
        groups = []
        for layout in layouts:
            config = self._config(layout)
            groups.append((layout, config, self._next_step(layout), self._scalar_state(layout, config),
                           NOTHING_FRESH if layout.complete is config else self._missing(layout, config)))
        work = self._work(layouts, grads, group)
        if finish is not None:
            work = finish.gradients(self, work)
        scale = grad_scale
        if self._skip_nonfinite or self._clip_grad_norm is not None or self._clip_grad_value is not None:
            scale = self._clip(work, grad_scale)
            if scale is None:
                self.skipped_steps += 1
                return False
        else:
            self.last_grad_norm = None
        calls = []
        for layout, config, step, scalar_state, fresh in groups:
            calls.append(config.kernel_arguments(step, scale, fresh, scalar_state))
        n_threads = effective_n_threads(self._n_threads)
        kernels = resolve_backend(self._backend)
        self._allocate_state(groups)
        # The writes.
        for position, bucket, params, bucket_grads, flat in work:
            invoke, constants, varying = calls[position]
            if bucket.stored is not None:  # low precision: through the backend's stored()
                # (with accumulation, on the sum completed in the accumulators: finish is never fused then)
                layout, config, step = groups[position][:3]
                self._stored_call(bucket, flat, config).call(kernels, invoke, None if flat else bucket_grads,
                                                             constants, varying, n_threads, step)
                continue
            buffers = self._kernel_buffers(bucket, flat, groups[position][1])
            if finish is None:
                invoke(kernels, params, bucket_grads, buffers, constants, varying, n_threads)
            else:
                finish.run(kernels, bucket, flat, params, bucket_grads, n_threads,
                           lambda p, g: invoke(kernels, p, g, buffers, constants, varying, n_threads))
        for layout, config, step, scalar_state, fresh in groups:
            if layout.states:
                update = self.spec.advanced(config.hyper, step, scalar_state)
                if self._counts_steps:
                    update["step"] = step
                _runtime.update_each(layout.states, update)
        if group is None and scale is grad_scale and finish is None and self._accumulation.steps == 1:
            self._plan = self._steady_plan(grads is None, calls)
        return True

    def _steady_plan(self, flat, calls):
        """The StepPlan that repeats this step while nothing but the gradients
        changes, or None where the general way must run every time: a rule with
        scalar state, a runner, or scalars that change with the step but no
        ``step_scalars``; clipping or the guard; mutable hyperparameters; a
        parameter list that is not the group's own; state still to create."""
        spec = self.spec
        if (spec.scalar_state or spec.runner is not None or (spec.uses_step and spec.step_scalars is None)
                or self._skip_nonfinite or self._clip_grad_norm is not None or self._clip_grad_value is not None):
            return None
        counts_steps = self._counts_steps  # (stochastic rounding counts steps for its keys)
        groups = []
        for layout, (invoke, constants, varying) in zip(self._layouts, calls):
            config, group = layout.config, self.param_groups[layout.index]
            if (not config.trusted or layout.complete is not config or group["params"] is not layout.param_list
                    or (counts_steps and layout.params and not layout.states)
                    or type(invoke) is not _runtime.KernelCall):
                return None
            groups.append(_runtime.GroupPlan(group, spec.hyper_names, layout.values, layout.param_list,
                                             layout.states or [], [self._bucket_plan(b, flat, config)
                                                                   for b in layout.buckets],
                                             config.arguments, layout.first, len(layout.params),
                                             counts_steps and bool(layout.states), config.present))
        return _runtime.StepPlan(self.param_groups, groups, self._written_table(), flat, NOTHING_FRESH, CALL_DEFAULTS)

    def _refresh_plan(self, position, plan, step, flat):
        """A schedule wrote a hyperparameter of group ``position``: validate the
        group again (only the values that changed) and update its part of the
        StepPlan; False if the general path must run (a buffer to create, mutable
        values). Raises, before any write, for a value validation refuses."""
        layout = self._layouts[position]
        config = self._config(layout)
        if not config.trusted or self._missing(layout, config) is not NOTHING_FRESH:
            return False
        if config.present != plan.present:  # other buffers for the kernel
            plan.buckets = [self._bucket_plan(b, flat, config) for b in layout.buckets]
            plan.present = config.present
        plan.values, plan.arguments = layout.values, config.arguments
        layout.complete = config
        return True

    def _bucket_plan(self, bucket, flat, config):
        """The :class:`~fastdescent._runtime.BucketPlan` of ``bucket`` (``flat``: of its
        arenas) for the buffers ``config`` needs."""
        stored = None if bucket.stored is None else self._stored_call(bucket, flat, config)
        if flat:
            return _runtime.BucketPlan([bucket.arenas["param"]], self._kernel_buffers(bucket, True, config),
                                       bucket.positions, bucket.span, [bucket.arenas["grad"]], stored)
        return _runtime.BucketPlan(bucket.params, self._kernel_buffers(bucket, False, config), bucket.positions,
                                   bucket.span, None, stored)

    def _kernel_buffers(self, bucket, flat, config):
        """A bucket's state buffers as its kernel call takes them: one list (or None)
        per declared buffer, of the per-parameter arrays or (``flat``) of the arena;
        only those ``config`` needs (a buffer kept from an earlier configuration,
        such as AMSGrad's maximum after ``amsgrad`` was switched off, stays out)."""
        kept = bucket.kernel_buffers
        if kept is None or kept[0] != config.present:
            names = [n if needed else None for n, needed in zip(self.spec.buffer_names, config.present)]
            arenas = tuple([None if bucket.arenas.get(n) is None else [bucket.arenas[n]] for n in names])
            kept = bucket.kernel_buffers = (config.present, tuple([bucket.buffers.get(n) for n in names]), arenas)
        return kept[1 + flat]

    def _scalar_state(self, layout, config):
        """The group's scalar states before this step (their initial values first),
        checked to be finite; None for a rule that keeps none."""
        if not self.spec.scalar_state:
            return None
        states = layout.states
        values = {}
        for s in self.spec.scalar_state:
            if states and s.name in states[0]:
                values[s.name] = _checks.finite(f"state[{layout.first}][{s.name!r}]", states[0][s.name])
            else:
                values[s.name] = s.initial_value(config.hyper)
        return values

    def _update_state(self, g, names, update):
        """For a rule's own methods (``spec.mixin``): if group ``g`` has the buffers
        ``names``, call ``update(hyper, params, buffers, backend, n_threads)`` once
        per dtype, with the group's validated hyperparameters, its parameters and
        their buffers (name -> arrays), the backend module and thread count a step
        would use."""
        with self._lock:
            layout = self._layouts[g]
            hyper = self._config(layout).hyper
            if layout.states is None or any(name not in layout.states[0] for name in names):
                return
            backend, n_threads = resolve_backend(self._backend), effective_n_threads(self._n_threads)
            for bucket in layout.buckets:
                if self.flat:
                    update(hyper, [bucket.arenas["param"]], {n: [bucket.arenas[n]] for n in names}, backend,
                           n_threads)
                else:
                    update(hyper, bucket.params, {n: bucket.buffers[n] for n in names}, backend, n_threads)

    def _selected(self, group):
        """The layout of group ``group`` (an index), in a list."""
        if isinstance(group, bool) or not isinstance(group, Integral):
            raise TypeError(f"group must be a group index or None, got {group!r}")
        if not 0 <= group < len(self.param_groups):
            raise ValueError(f"group {group} does not exist ({len(self.param_groups)} groups)")
        return [self._layouts[int(group)]]

    def _work(self, layouts, grads, group):
        """The kernel calls of a step, ``(position, bucket, params, grads, flat)``
        with ``position`` the group's place in ``layouts``, every gradient checked
        in C (dtype, shape, layout, and no memory shared with any array the step
        writes), and every parameter and state buffer still as it was."""
        for layout in layouts:
            current = self.param_groups[layout.index]["params"]
            if current is layout.param_list:  # a ParamList: its elements cannot have changed
                continue
            if len(current) != len(layout.params) or not all(map(operator.is_, current, layout.params)):
                raise ValueError(
                    f"param_groups[{layout.index}]['params'] changed since the group was added; "
                    "parameters are fixed (build a new optimizer or use add_param_group)"
                )
        written = self._written_table()
        written.verify()
        if grads is None:
            if not self.flat:
                raise TypeError("step() needs grads, one per parameter, unless the optimizer is flat=True")
            return [self._flat_work(i, layout, b) for i, layout in enumerate(layouts) for b in layout.buckets]
        if type(grads) is not list and not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list of arrays, got {type(grads).__name__}")
        n = len(layouts[0].params) if len(layouts) == 1 else sum(len(layout.params) for layout in layouts)
        if len(grads) != n:
            raise ValueError(f"{len(grads)} gradients for {n} parameters")
        only = -1 if group is None else layouts[0].index
        work, offset = [], 0
        for position, layout in enumerate(layouts):
            n = len(layout.params)
            group_grads = grads if n == len(grads) else grads[offset:offset + n]
            flat = self.flat and all(map(operator.is_, group_grads, layout.grad_views))
            for b in layout.buckets:
                if flat:
                    work.append(self._flat_work(position, layout, b))
                    continue
                if b.span is None:
                    bucket_grads = list(map(group_grads.__getitem__, b.positions))
                elif b.span.stop - b.span.start == n and type(group_grads) is list:
                    bucket_grads = group_grads
                else:
                    bucket_grads = list(group_grads[b.span])
                if b.stored is not None:  # bfloat16/float16 parameters or gradients, or low-precision state
                    bucket_grads = self._stored_grads(written, b, grads, offset, only)
                else:
                    written.check_grads(b.params, bucket_grads, b.positions, offset, layout.first, only)
                work.append((position, b, b.params, bucket_grads, False))
            offset += n
        return work

    def _flat_work(self, position, layout, bucket):
        """The kernel call of a flat bucket: its whole arena at once, or for a
        tensorwise rule (which must see each parameter whole) each parameter's
        view (the optimizer's own arrays: nothing to check)."""
        if not self.spec.tensorwise:
            return (position, bucket, [bucket.arenas["param"]], [bucket.arenas["grad"]], True)
        return (position, bucket, bucket.params, [layout.grad_views[k] for k in bucket.positions], False)

    def _written_table(self):
        """The table of every array a step may write (the kernels' own lists of
        parameters and state buffers), built again after a change. It records the
        arrays as they are, so it first checks that each still has its bucket's
        dtype (the rest of its layout the table checks itself)."""
        if self._written is None:
            arrays, labels, groups = [], [], []
            for g, layout in enumerate(self._layouts):
                for bucket in layout.buckets:
                    indices = [layout.first + k for k in bucket.positions]
                    roles = [("params[{}]", bucket.params)]
                    roles += [(f"state[{{}}][{name!r}]", buffers) for name, buffers in bucket.buffers.items()]
                    roles += self._accumulation.roles(bucket)
                    if bucket.stored is not None:  # state in its own dtypes, scales, master copies
                        roles += self._stored_roles(bucket)
                    for label, role in roles:
                        for i, array in zip(indices, role):
                            if array is None:  # a buffer this parameter's shape keeps none of
                                continue
                            if array.dtype != bucket.dtype and (bucket.stored is None or role is bucket.params):
                                raise ValueError(f"{label.format(i)} was changed in place: its dtype is "
                                                 f"{array.dtype}, not {bucket.dtype}")
                            arrays.append(array)
                            labels.append(label.format(i))
                            groups.append(g)
            self._written = _runtime.WrittenBuffers(arrays, labels, groups)
        return self._written

    def _next_step(self, layout):
        """The 1-based index of the group's next step (1 for a rule that does not
        count steps); a count written into the state that no step could follow
        raises here, before anything is written."""
        states = layout.states
        if not states or "step" not in states[0]:
            return 1
        count = states[0]["step"]
        if type(count) is not int or not 0 <= count < _checks.MAX_STEP - 1:
            count = _step_count(count, f"state[{layout.first}]['step']")
            if count >= _checks.MAX_STEP - 1:
                raise ValueError(f"state[{layout.first}]['step'] is {count}: no step can follow it")
        return count + 1

    def _clip(self, work, grad_scale):
        """The gradient scale the rule should apply, or None to skip the step
        (clipping or the non-finite guard is on: the gradients are read first)."""
        buckets = [item[3] for item in work]
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

    def _missing(self, layout, config):
        """The state buffers the group needs and lacks: those this step creates."""
        if not layout.params or not config.needed:
            return NOTHING_FRESH
        if layout.states is None:
            return frozenset(config.needed)
        # Created once the buckets hold it: a parameter may keep none (Buffer.shape).
        missing = [name for name in config.needed if name not in layout.buckets[0].buffers]
        return frozenset(missing) if missing else NOTHING_FRESH

    def _allocate_state(self, groups):
        """Create the state the groups lack (their state dicts, the buffers this
        step creates); on an error (memory) remove what was created."""
        created = []
        try:
            for layout, config, step, scalar_state, fresh in groups:
                masters = self._storage.master_weights
                if (layout.states is None and layout.params
                        and (fresh or self._counts_steps or self.spec.scalar_state or masters)):
                    initial = {"step": 0} if self._counts_steps else {}  # PyTorch's order: step first
                    initial.update((s.name, s.initial_value(config.hyper)) for s in self.spec.scalar_state)
                    layout.states = [dict(initial) for _ in layout.params]
                    self.state.update(enumerate(layout.states, start=layout.first))
                    created.append((layout, None))
                    if masters:
                        self._allocate_masters(layout.index)
                for name in [name for name in config.needed if name in fresh]:  # declared (PyTorch's) order
                    self._allocate_buffer(layout.index, name, config.needed[name])
                    created.append((layout, name))
                layout.complete = config
        except BaseException:
            for layout, name in reversed(created):
                self._remove_state(layout, name)
            raise
        finally:
            if created:
                self._state_changed()

    def _remove_state(self, layout, name):
        """Undo one allocation: buffer ``name`` of the group, or (None) its state dicts."""
        if name is None:
            for i in range(layout.first, layout.first + len(layout.params)):
                self.state.pop(i, None)
            layout.states = None
            return
        for bucket in layout.buckets:
            bucket.buffers.pop(name, None)
            bucket.arenas.pop(name, None)
            if bucket.stored is not None:
                bucket.stored.scales.pop(name, None)
        for state in layout.states or ():
            state.pop(name, None)
            state.pop(scales_name(name), None)

    def _state_changed(self):
        """The state buffers were created, removed or replaced: the table of written
        arrays and the kernels' buffer lists are built again at the next step."""
        self._written = self._plan = None
        for layout in self._layouts:
            layout.complete = None
            for bucket in layout.buckets:
                bucket.kernel_buffers = None
                if bucket.stored is not None:
                    bucket.stored.call = None

    def _allocate_buffer(self, g, name, fill):
        """Create buffer ``name`` for every parameter of group ``g`` that keeps one
        (``bucket.buffers[name]`` holds None for those whose shape keeps none)."""
        layout = self._layouts[g]
        buffer = self._buffer_specs[name]
        for bucket in layout.buckets:
            if bucket.stored is not None:  # low precision: its own dtypes, int8 scales (shaped like the params:
                # the rules with buffers of other shapes have runners, which refuse low precision)
                arrays, buffers, scales = self._new_state_buffer(bucket, name, fill)
                if scales is not None:
                    bucket.stored.scales[name] = scales
                    for k, scale in zip(bucket.positions, scales):
                        layout.states[k][scales_name(name)] = scale
            else:
                shapes = [buffer.shape_for(p.shape) for p in bucket.params]
                if self.flat:
                    size = sum(math.prod(s) for s in shapes if s is not None)
                    arena = _new_buffer(bucket.arenas["param"], fill, None if buffer.shape is None else size)
                    bucket.arenas[name] = arena
                    kept = iter(_views(arena, [s for s in shapes if s is not None]))
                    buffers = [None if s is None else next(kept) for s in shapes]
                elif buffer.shape is None:
                    buffers = [_new_buffer(p, fill) for p in bucket.params]
                else:
                    buffers = [None if s is None else _new_buffer(p, fill, s) for p, s in zip(bucket.params, shapes)]
                arrays = buffers
            bucket.buffers[name] = buffers
            for k, array in zip(bucket.positions, arrays):
                if array is not None:
                    layout.states[k][name] = array

    @property
    def _buffer_specs(self):
        return {b.name: b for b in self.spec.buffers}

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for g, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {g}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines + [")"])


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


def _new_buffer(like, fill, shape=None):
    """A buffer holding ``fill``, of ``like``'s dtype and shape, or of ``shape`` (an
    int or a tuple: a buffer shaped otherwise than its parameter)."""
    if fill is FIRST_GRADIENT:
        return np.empty_like(like, shape=shape)
    if fill is PARAMETER:
        return like.copy()
    if fill == 0.0:
        return np.zeros_like(like, shape=shape)
    return np.full_like(like, fill, shape=shape)
