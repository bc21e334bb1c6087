"""The optimizer object shared by every update rule.

An :class:`Optimizer` holds parameter groups and per-parameter state the way
``torch.optim`` does, and takes a whole step with one kernel call per (group,
dtype) bucket: all arrays of a bucket go to the kernel together, which splits
their concatenated elements evenly among threads. Options add a flat arena (each
role of a bucket in one contiguous block), clipping by global norm or by value,
a non-finite gradient guard, and checkpoints. A rule subclass (``sgd.py``,
``adam.py``...) only says which state buffers it needs and calls its face.
"""

import copy
import math
import operator
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np

from .. import _checks, _runtime
from .._config import BACKENDS, effective_n_threads, resolve_backend
from . import checkpoint
from .clipping import bucket_norm

#: Fill value of a state buffer that the rule itself initializes on its first step
#: (PyTorch's SGD momentum buffer starts as the first gradient).
FIRST_GRADIENT = None

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

    __slots__ = ("dtype", "positions", "span", "params", "arenas", "buffers")

    def __init__(self, dtype, positions, params):
        self.dtype = dtype
        self.positions = positions  # indices into the group's parameter list
        self.params = params        # the parameters at those positions
        contiguous = positions == list(range(positions[0], positions[0] + len(positions)))
        self.span = slice(positions[0], positions[-1] + 1) if contiguous else None
        self.arenas = {}  # flat layout: role -> one 1-D array for every parameter
        self.buffers = {}  # state buffer name -> its arrays, one per parameter (views if flat)


class _Layout:
    """How one group's parameters are stored and bucketed."""

    __slots__ = ("first", "params", "buckets", "grad_views", "states", "checked")

    def __init__(self, first, params, buckets, grad_views):
        self.first = first            # index of the group's first parameter
        self.params = params          # tuple: the arrays the group was built with
        self.buckets = buckets
        self.grad_views = grad_views  # flat layout: views into the gradient arenas
        self.states = None            # the parameters' state dicts, once they exist
        self.checked = None           # copies of the hyperparameters as last validated


class _Work:
    """One kernel call of a step."""

    __slots__ = ("group", "bucket", "params", "grads", "flat")

    def __init__(self, group, bucket, params, grads, flat):
        self.group, self.bucket, self.params, self.grads, self.flat = group, bucket, params, grads, flat


class Optimizer:
    """Base class: parameter groups, state, steps, clipping, checkpoints.

    Subclasses define ``buffer_names`` (every state buffer the rule may keep, in
    PyTorch's names), ``counts_steps`` (whether ``state["step"]`` exists),
    ``kernel`` (the name of the rule's kernel), ``_buffers(group)`` and
    ``_arguments(...)``; see :class:`fastdescent.optim.SGD`.

    A step validates every group's hyperparameters with the same function the
    rule's face uses (``rules.<rule>.<rule>_arguments``, which also computes the
    step's scalars), and each gradient against its parameter (``check_buffers``,
    in C); the state buffers are the optimizer's own, checked when created or
    loaded. It then calls the kernel directly, once per bucket, so the per-array
    cost of a step is one gradient check and one pointer gather.

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

    kernel = None        # the rule's kernel (and reference twin) function name
    buffer_names = ()    # every state buffer the rule may keep, in the kernel's argument order
    counts_steps = True

    def __init__(self, params, defaults, *, flat=False, clip_grad_norm=None, clip_grad_value=None,
                 skip_nonfinite=False, backend=None, n_threads=None):
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
        self._check_group(group, 1, f"param_groups[{g}]")
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
        return _Layout(first, tuple(params), buckets, grad_views)

    # ------------------------------------------------------------ rule hooks
    def _buffers(self, group):
        """State buffers this group's configuration needs: name -> fill value
        (a float, or FIRST_GRADIENT)."""
        raise NotImplementedError

    def _arguments(self, group, *, step, fresh, grad_scale):
        """Validate ``group``'s hyperparameters and return the kernel's keyword
        arguments for this step (``step``: its 1-based index; ``fresh``: names of
        the buffers created for it), through the rule's ``*_arguments`` function."""
        raise NotImplementedError

    def _check_extra(self, group):
        """Validate hyperparameters the face does not see (e.g. initial values)."""

    def _check_group(self, group, step, where):
        """Raise if a hyperparameter of ``group`` is invalid, with the checks of the
        rule's face."""
        try:
            self._check_extra(group)
            self._arguments(group, step=step, fresh=frozenset(self._buffers(group)), grad_scale=1.0)
        except KeyError as error:
            raise ValueError(f"{where} lacks the hyperparameter {error}") from None
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None

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
        steps = {g: self._next_step(g) for g in selected}
        for g in selected:
            hyper, layout = self.param_groups[g], self._layouts[g]
            if not _unchanged(layout.checked, hyper):  # hyperparameters written since the last check
                self._check_group(hyper, steps[g], f"param_groups[{g}]")
                layout.checked = {k: copy.copy(v) for k, v in hyper.items() if k != "params"}
        scale = self._clip(work, grad_scale)
        if scale is None:
            self.skipped_steps += 1
            return False
        n_threads = effective_n_threads(self._n_threads)
        kernels = resolve_backend(self._backend)
        fresh = {g: self._allocate_state(g) for g in selected}
        for item in work:
            self._run(kernels, item, steps[item.group], fresh[item.group], scale, n_threads)
        if self.counts_steps:
            for g in selected:
                for state in self._layouts[g].states or ():
                    state["step"] = steps[g]
        return True

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
            if not item.flat:
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

    def _allocate_state(self, g):
        """Create the state buffers group ``g`` needs and lacks; return their names."""
        layout = self._layouts[g]
        wanted = self._buffers(self.param_groups[g])
        if not layout.params or not (wanted or self.counts_steps):
            return frozenset()
        if layout.states is None:
            layout.states = [{"step": 0} if self.counts_steps else {} for _ in layout.params]
            self.state.update(enumerate(layout.states, start=layout.first))
        missing = [name for name in wanted if name not in layout.states[0]]
        for name in missing:
            self._allocate_buffer(g, name, wanted[name])
        return frozenset(missing)

    def _allocate_buffer(self, g, name, fill):
        layout = self._layouts[g]
        for bucket in layout.buckets:
            if self.flat:
                arena = _new_buffer(bucket.arenas["param"], fill)
                bucket.arenas[name] = arena
                buffers = _views(arena, [p.shape for p in bucket.params])
            else:
                buffers = [_new_buffer(p, fill) for p in bucket.params]
            bucket.buffers[name] = buffers
            for k, buffer in zip(bucket.positions, buffers):
                layout.states[k][name] = buffer

    def _run(self, kernels, item, step, fresh, grad_scale, n_threads):
        group = self.param_groups[item.group]
        names = self._buffers(group)
        if item.flat:
            buffers = {name: [item.bucket.arenas[name]] for name in names}
        else:
            buffers = {name: item.bucket.buffers[name] for name in names}
        arguments = self._arguments(group, step=step, fresh=fresh, grad_scale=grad_scale)
        getattr(kernels, self.kernel)(item.params, item.grads, *(buffers.get(name) for name in self.buffer_names),
                                      **arguments, n_threads=n_threads)

    # ----------------------------------------------------------------- state
    def register_state(self, name, obj):
        """Save and restore ``obj`` (anything with ``state_dict()`` and
        ``load_state_dict(sd)``, e.g. a schedule or a weight average) with the
        optimizer: its state goes to ``state_dict()["extra"][name]`` and into
        checkpoint files, so a resumed run continues it exactly."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"the name must be a non-empty str, got {name!r}")
        if name in self._registered:
            raise ValueError(f"a state named {name!r} is already registered")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(obj, method, None)):
                raise TypeError(f"{type(obj).__name__} has no {method}() method")
        self._registered[name] = obj

    def state_dict(self):
        """PyTorch's layout: ``{"state": {index: {...}}, "param_groups": [{..., "params":
        [indices]}]}`` plus ``"extra"`` if objects are registered. Arrays are copies."""
        return self._state_dict(copy_arrays=True)

    def _state_dict(self, copy_arrays):
        state = {
            i: {k: v.copy() if copy_arrays and isinstance(v, np.ndarray) else v for k, v in self.state[i].items()}
            for i in sorted(self.state)
        }
        groups = []
        for group, layout in zip(self.param_groups, self._layouts):
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = list(range(layout.first, layout.first + len(layout.params)))
            groups.append(saved)
        sd = {"state": state, "param_groups": groups}
        if self._registered:
            sd["extra"] = {name: obj.state_dict() for name, obj in self._registered.items()}
        return sd

    def load_state_dict(self, state_dict, strict=True):
        """Load a :meth:`state_dict` (hyperparameters, state, registered objects).

        Everything is validated first (group sizes, every buffer's shape and
        dtype, step counts, hyperparameters, the registered objects' states); on
        any error nothing changes. ``strict``: the registered names must match
        the saved ones exactly (else only the common ones load).
        """
        self._load(state_dict, strict, None)

    def _load(self, sd, strict, param_values):
        groups, state = self._validated(sd)
        if param_values is not None:
            params = self.params
            if len(param_values) != len(params):
                raise ValueError(f"{len(param_values)} parameter arrays for {len(params)} parameters")
            for i, (p, value) in enumerate(zip(params, param_values)):
                _check_like(value, p, f"parameter {i}")
        self._load_extras(sd.get("extra"), strict)
        for group, hyper in zip(self.param_groups, groups):
            group.update(hyper)
        self._replace_state(state)
        if param_values is not None:
            for p, value in zip(self.params, param_values):
                np.copyto(p, value)

    def _validated(self, sd):
        """The hyperparameters per group and the state per index that ``sd`` holds,
        checked against this optimizer; raises before anything changes."""
        if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
            raise ValueError("a state dict needs 'state' and 'param_groups'")
        saved_groups = sd["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            n = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else "no list of"
            raise ValueError(f"the state dict has {n} parameter groups; this optimizer has {len(self.param_groups)}")
        index_of_saved, groups = {}, []
        for g, (saved, layout) in enumerate(zip(saved_groups, self._layouts)):
            ids = saved.get("params") if isinstance(saved, Mapping) else None
            if not isinstance(ids, (list, tuple)) or len(ids) != len(layout.params):
                raise ValueError(f"saved param_groups[{g}] does not list {len(layout.params)} parameters like this group")
            for k, saved_id in enumerate(ids):
                if saved_id in index_of_saved:
                    raise ValueError(f"parameter {saved_id!r} appears twice in the saved groups")
                index_of_saved[saved_id] = layout.first + k
            groups.append({k: v for k, v in saved.items() if k != "params"})
        saved_state = sd["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError("the state dict's 'state' must be a dict")
        state = {}
        for saved_id, entry in saved_state.items():
            if saved_id not in index_of_saved:
                raise ValueError(f"the state dict has state for parameter {saved_id!r}, which no group lists")
            state[index_of_saved[saved_id]] = self._checked_entry(entry, index_of_saved[saved_id], saved_id)
        for g, layout in enumerate(self._layouts):
            step = self._checked_group_state(g, groups[g], state)
            self._check_group({**groups[g], "params": list(layout.params)}, step + 1, f"saved param_groups[{g}]")
        return groups, state

    def _checked_entry(self, entry, index, saved_id):
        if not isinstance(entry, Mapping):
            raise TypeError(f"state[{saved_id!r}] must be a dict, got {type(entry).__name__}")
        param = self._param_at(index)
        checked = {}
        for name, value in entry.items():
            if name == "step" and self.counts_steps:
                checked["step"] = _step_count(value, f"state[{saved_id!r}]['step']")
            elif name in self.buffer_names:
                if value is not None:  # PyTorch keeps momentum_buffer=None when unused
                    _check_like(value, param, f"state[{saved_id!r}][{name!r}]")
                    checked[name] = value
            else:
                known = (("step",) if self.counts_steps else ()) + self.buffer_names
                raise ValueError(
                    f"state[{saved_id!r}] has an entry {name!r}; a {type(self).__name__} keeps only {known}"
                )
        return checked

    def _checked_group_state(self, g, hyper, state):
        """Check that group ``g``'s saved state is whole and uniform; return its step."""
        layout = self._layouts[g]
        entries = [state.get(i) for i in range(layout.first, layout.first + len(layout.params))]
        present = [e for e in entries if e]
        if not present:
            return 0
        if len(present) != len(entries):
            raise ValueError(f"in group {g} some parameters have state and others none")
        names = set(present[0])
        if any(set(e) != names for e in present):
            raise ValueError(f"the parameters of group {g} hold different state entries")
        if self.counts_steps and "step" not in names:
            raise ValueError(f"the state of group {g} lacks 'step'")
        steps = {e.get("step", 0) for e in present}
        if len(steps) != 1:
            raise ValueError(f"the parameters of group {g} are at different steps {sorted(steps)}")
        try:
            wanted = self._buffers({**hyper, "params": list(layout.params)})
        except KeyError as error:
            raise ValueError(f"saved param_groups[{g}] lacks the hyperparameter {error}") from None
        missing = [n for n, fill in wanted.items() if n not in names and fill is not FIRST_GRADIENT]
        if missing:
            raise ValueError(f"the state of group {g} lacks {missing}, which its hyperparameters need")
        return steps.pop()

    def _param_at(self, index):
        for layout in reversed(self._layouts):
            if index >= layout.first:
                return layout.params[index - layout.first]
        raise IndexError(index)

    def _load_extras(self, extra, strict):
        """Load the registered objects' states; on an error restore those already loaded."""
        extra = {} if extra is None else extra
        if not isinstance(extra, Mapping):
            raise TypeError("the state dict's 'extra' must be a dict")
        if strict and set(extra) != set(self._registered):
            raise ValueError(
                f"the state dict holds state for {sorted(extra)} but {sorted(self._registered)} are "
                "registered; register_state() the same objects first (or load with strict=False)"
            )
        names = [name for name in self._registered if name in extra]
        backups = {name: copy.deepcopy(self._registered[name].state_dict()) for name in names}
        loaded = []
        try:
            for name in names:
                loaded.append(name)  # before: a failing load_state_dict may have changed part of its object
                self._registered[name].load_state_dict(extra[name])
        except BaseException:
            for name in loaded:
                self._registered[name].load_state_dict(backups[name])
            raise

    def _replace_state(self, state):
        for g, layout in enumerate(self._layouts):
            indices = range(layout.first, layout.first + len(layout.params))
            for i in indices:
                self.state.pop(i, None)
            layout.states = None
            for bucket in layout.buckets:
                bucket.buffers.clear()
                for role in [r for r in bucket.arenas if r not in ("param", "grad")]:
                    del bucket.arenas[role]
            if not any(state.get(i) for i in indices):
                continue
            first = state[layout.first]
            layout.states = [{"step": state[i]["step"]} if "step" in first else {} for i in indices]
            self.state.update(zip(indices, layout.states))
            for name in [n for n in self.buffer_names if n in first]:
                self._allocate_buffer(g, name, FIRST_GRADIENT)
                for i, own in zip(indices, layout.states):
                    np.copyto(own[name], state[i][name])

    # ----------------------------------------------------------- checkpoints
    def save(self, path, *, params=True):
        """Write a checkpoint: the state dict, registered objects and (``params``)
        the parameter values, to one ``.npz`` file, atomically (a failed save
        leaves any existing file untouched). No pickle."""
        checkpoint.save(path, type(self).__name__, self._state_dict(copy_arrays=False),
                        self.params if params else None)

    def load(self, path, *, params=True, strict=True):
        """Restore a checkpoint written by :meth:`save` of the same optimizer class
        (and, with ``params``, the parameter values it holds). Validates it all
        first; raises :class:`CheckpointError` and changes nothing if the file is
        unreadable, corrupted or does not fit."""
        sd, values = checkpoint.load(path, type(self).__name__)
        try:
            self._load(sd, strict, values if params else None)
        except checkpoint.CheckpointError:
            raise
        except (LookupError, AttributeError, TypeError, ValueError) as error:  # from registered objects too
            raise checkpoint.CheckpointError(f"{path} does not fit this optimizer: {error!r}") from error

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
    try:
        _runtime.check_buffers(("param",), ([p],), (True,), False)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None


def _check_like(value, param, where):
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype != param.dtype:
        raise TypeError(f"{where} has dtype {value.dtype}; the parameter has {param.dtype}")
    if value.shape != param.shape:
        raise ValueError(f"{where} has shape {value.shape}; the parameter has {param.shape}")


def _step_count(value, where):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, Real) or not 0 <= value < math.inf
            or value != math.floor(value)):
        raise ValueError(f"{where} must be a non-negative integer, got {value!r}")
    return int(value)


def _views(arena, shapes):
    """Consecutive views of ``arena`` with ``shapes``."""
    views, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(arena[offset:offset + n].reshape(shape))
        offset += n
    return views


def _new_buffer(like, fill):
    if fill is FIRST_GRADIENT:
        return np.empty_like(like)
    if fill == 0.0:
        return np.zeros_like(like)
    return np.full_like(like, fill)
