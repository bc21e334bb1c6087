"""Low-precision storage in the optimizer objects: bfloat16 and int8 state,
bfloat16 and float16 parameters, with or without a float32 master copy.

:class:`LowPrecision` is the part of :class:`~fastdescent.optim.Optimizer` that
decides how each bucket's arrays are stored (:class:`fastdescent.precision.Storage`)
and hands the kernel their formats, so that the step itself stays one call of the
rule's kernel per bucket (``RuleSpec.run``).

State layout per parameter (PyTorch's names for the rule's buffers):

* ``state[name]``: the buffer, as a float32, ``ml_dtypes.bfloat16`` or int8/uint8
  (codes) array shaped like the parameter;
* ``state[name + "_scales"]``: for int8/uint8 buffers, the float32 scale of each
  block of :data:`~fastdescent.precision.BLOCK` elements (in the parameter's flat order);
* ``state["master_param"]``: with ``master_weights=True``, the float32 master copy.
"""

import numpy as np

from .. import precision
from ..precision import NATIVE
from ..rules._spec import FIRST_GRADIENT, PARAMETER

MASTER = "master_param"
_LOW_PARAM_DTYPES = ("bfloat16", "float16")


def scales_name(name):
    """The state key of the block scales of int8 buffer ``name``."""
    return f"{name}_scales"


class StoredBucket:
    """How one bucket's arrays are stored, and the arrays the kernel takes."""

    __slots__ = ("param_kind", "copy_kind", "kinds", "kernel_params", "copies", "scales", "ids")

    def __init__(self, storage, spec, dtype, ids):
        self.param_kind, self.copy_kind = storage.param_kind(dtype)
        self.kinds = {b.name: storage.buffer_kind(b, dtype) for b in spec.buffers}
        self.kernel_params = None  # masters, or uint16 views of bfloat16 parameters
        self.copies = None         # the parameters a master's rounding is written to
        self.scales = {}           # int8 buffer name -> its scales, one array per parameter
        self.ids = ids             # the parameters' indices: their stochastic rounding keys


def is_low_precision_param(p):
    return isinstance(p, np.ndarray) and precision.dtype_name(p.dtype) in _LOW_PARAM_DTYPES


def check_low_precision_param(p, where):
    """The checks ``check_buffers`` makes on a float parameter, for bfloat16/float16 ones."""
    if not p.flags.c_contiguous:
        raise ValueError(f"{where} must be C-contiguous")
    if not p.flags.aligned:
        raise ValueError(f"{where} is not aligned to its dtype")
    if not p.flags.writeable:
        raise ValueError(f"{where} is read-only; it is updated in place")


def _span(a):
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


class LowPrecision:
    """Mixin of :class:`~fastdescent.optim.Optimizer`: the ``state_dtype``,
    ``rounding``, ``seed`` and ``master_weights`` options."""

    def _init_storage(self, state_dtype, rounding, seed, master_weights):
        self._storage = precision.Storage.of(state_dtype, rounding, seed, master_weights)

    @property
    def storage(self):
        """The storage options (:class:`fastdescent.precision.Storage`), fixed at construction."""
        return self._storage

    @property
    def _counts_steps(self):
        """The state keeps ``step``: the rule counts, or stochastic rounding needs
        the step in its random bits' key."""
        return self.spec.counts_steps or self._storage.stochastic

    def _check_storage(self, g, hyper, dtypes):
        """Raise if the storage options do not fit group ``g`` (validated ``hyper``,
        parameter ``dtypes``)."""
        for dtype in dtypes:
            self._storage.check(self.spec, hyper, dtype, where=f"param_groups[{g}]")
            if self.flat and self._storage.resolved_state_dtype(dtype) == "int8":
                raise ValueError(f"param_groups[{g}]: state_dtype='int8' with flat=True: int8 blocks are per "
                                 "parameter, so the state cannot be an arena; use flat=False")

    def _low_precision(self):
        """True if any bucket keeps low-precision parameters or state (its steps
        take the Python path)."""
        return any(b.stored is not None for layout in self._layouts for b in layout.buckets)

    def _new_stored_bucket(self, bucket, first):
        dtype = bucket.dtype
        if self._storage.is_default and precision.dtype_name(dtype) in ("float32", "float64"):
            return None
        ids = tuple(first + k for k in bucket.positions)
        stored = StoredBucket(self._storage, self.spec, dtype, ids)
        if stored.param_kind != NATIVE and stored.copy_kind == NATIVE:
            stored.kernel_params = [precision.kernel_view(p) for p in bucket.params]
        return stored

    # ------------------------------------------------------------ state
    def _stored_state_keys(self):
        """State keys besides ``step``, the scalar states and the buffers."""
        keys = (MASTER,) if self._storage.master_weights else ()
        return keys + tuple(scales_name(b.name) for b in self.spec.buffers)

    def _new_state_buffer(self, bucket, name, fill):
        """Create buffer ``name`` of low-precision ``bucket`` (filled with ``fill`` or, for a buffer
        the kernel initializes, zeros); returns (per-parameter state arrays, the
        kernel's arrays, their scales or None)."""
        stored = bucket.stored
        copies_parameter = fill is PARAMETER
        fill = 0.0 if fill is FIRST_GRADIENT or copies_parameter else fill
        shapes = [p.shape for p in bucket.params]
        kind = stored.kinds[name]
        dtype = np.float64 if precision.dtype_name(bucket.dtype) == "float64" else np.float32
        if copies_parameter:  # the values the rule updates: the masters if there are
            values = ([bucket.arenas.get(MASTER, bucket.arenas["param"])] if self.flat
                      else stored.kernel_params if stored.copy_kind != NATIVE
                      else bucket.params)
            values = [np.asarray(v, np.float64 if kind == NATIVE and dtype == np.float64 else np.float32)
                      for v in values]
        if self.flat:
            n = bucket.arenas["param"].size
            if copies_parameter:
                arena = values[0].copy() if kind == NATIVE else self._storage.encoded(kind, values[0])[0]
            elif kind == NATIVE:
                arena = np.full(n, fill, dtype)
            else:
                arena, _ = self._storage.new_buffer(kind, (n,), fill)
            bucket.arenas[name] = arena
            arrays = views(arena, shapes)
            return arrays, [precision.kernel_view(a) for a in arrays], None
        if kind == NATIVE:
            arrays = [v.copy() for v in values] if copies_parameter else [np.full(shape, fill, dtype) for shape in shapes]
            return arrays, arrays, None
        if copies_parameter:
            made = [self._storage.encoded(kind, v) for v in values]
        else:
            made = [self._storage.new_buffer(kind, shape, fill) for shape in shapes]
        arrays = [a for a, _ in made]
        scales = None if made and made[0][1] is None else [s for _, s in made]
        return arrays, [precision.kernel_view(a) for a in arrays], scales

    def _allocate_masters(self, g):
        """The float32 master copies of group ``g``'s parameters (master_weights)."""
        layout = self._layouts[g]
        for bucket in layout.buckets:
            stored = bucket.stored
            if stored is None or stored.copy_kind == NATIVE:
                continue
            if self.flat:
                arena = bucket.arenas["param"].astype(np.float32)
                bucket.arenas[MASTER] = arena
                masters = views(arena, [p.shape for p in bucket.params])
            else:
                masters = [p.astype(np.float32) for p in bucket.params]
            stored.kernel_params = masters
            stored.copies = [precision.kernel_view(p) for p in bucket.params]
            for k, master in zip(bucket.positions, masters):
                layout.states[k][MASTER] = master

    # ------------------------------------------------------------ a step
    def _stored_roles(self, bucket):
        """What a step writes in a low-precision bucket besides its parameters and
        state buffers: ``(label, arrays)`` of the int8 scales and the master copies."""
        stored = bucket.stored
        roles = [(f"state[{{}}][{scales_name(name)!r}]", scales) for name, scales in stored.scales.items()]
        if stored.copy_kind != NATIVE and stored.kernel_params is not None:
            roles.append((f"state[{{}}][{MASTER!r}]", stored.kernel_params))
        return roles

    def _check_stored_grads(self, layout, bucket, grads, offset, only):
        """Validate the gradients of a bucket with low-precision parameters or
        gradients (the C table takes gradients of the parameters' dtype only):
        ndarrays shaped like their parameters, C-contiguous and aligned, float32 or
        the parameters' dtype, one dtype per call, sharing no memory with any
        array the step writes (of group ``only``; -1: of every group)."""
        where = f"param_groups[{layout.index}] ({bucket.dtype})"
        allowed = {"float32", precision.dtype_name(bucket.dtype)}
        first = None
        for k, p, grad in zip(bucket.positions, bucket.params, grads):
            label = f"grads[{offset + k}]"
            if not isinstance(grad, np.ndarray):
                raise TypeError(f"{where}: {label} must be a numpy.ndarray, got {type(grad).__name__}")
            name = precision.dtype_name(grad.dtype)
            if name not in allowed:
                raise TypeError(f"{where}: {label} has dtype {name}; with {precision.dtype_name(p.dtype)} "
                                f"parameters gradients are {' or '.join(sorted(allowed))}")
            if first is None:
                first = name
                if name != "float32" and (self._clip_grad_norm is not None or self._clip_grad_value is not None
                                          or self._skip_nonfinite):
                    raise TypeError(f"{where}: {label} is {name}: clip_grad_norm, clip_grad_value and "
                                    "skip_nonfinite read float32 gradients; pass float32 gradients or clip "
                                    "them yourself")
            elif name != first:
                raise TypeError(f"{where}: {label} has dtype {name} but the bucket's first gradient has {first}: "
                                "one dtype per call")
            if grad.shape != p.shape:
                raise ValueError(f"{where}: {label} has shape {grad.shape}, but its parameter has {p.shape}")
            if not grad.flags.c_contiguous or not grad.flags.aligned:
                raise ValueError(f"{where}: {label} must be C-contiguous and aligned")
            lo, hi = _span(grad)
            for start, end, written_label, group in self._written_spans:
                if start < hi and lo < end and grad.nbytes and (only < 0 or group == only):
                    raise ValueError(f"{label} shares memory with {written_label}, which the step writes")

    def _stored_call(self, kernels, bucket, params, grads, flat, buffers, group, scale, n_threads):
        """The kernel call of a low-precision bucket (``buffers``: one list or None
        per declared buffer; ``group``: the step's ``(layout, config, step,
        scalar_state, fresh)``): the rule's float32 kernel through the backend's
        ``stored``, on the Python path (the StepPlan takes float buckets only)."""
        layout, config, step, scalar_state, fresh = group
        buffers = dict(zip(self.spec.buffer_names, buffers))
        params, grads, buffers, formats, ids = self._kernel_arrays(bucket, flat, params, grads, buffers, step)
        self.spec.run(kernels, params, grads, buffers, config.hyper, step=step, grad_scale=scale, fresh=fresh,
                      scalar_state=scalar_state, n_threads=n_threads, formats=formats, tensor_ids=ids)

    def _kernel_arrays(self, bucket, flat, params, grads, buffers, step):
        """``(params, grads, buffers, formats, tensor_ids)`` for the kernel call of a
        low-precision bucket (``buffers``: name -> the bucket's arrays or None)."""
        stored = bucket.stored
        if flat:  # one tensor: the arenas
            params = [precision.kernel_view(bucket.arenas["param"])]
            masters = [bucket.arenas[MASTER]] if MASTER in bucket.arenas else None
            buffers = {name: None if arrays is None else [precision.kernel_view(bucket.arenas[name])]
                       for name, arrays in buffers.items()}
        else:
            params = stored.copies if stored.copy_kind != NATIVE else stored.kernel_params or params
            masters = stored.kernel_params if stored.copy_kind != NATIVE else None
        params, grads, formats = precision.kernel_call(self._storage, self.spec, step, params, grads, buffers,
                                                       masters, stored.scales)
        return params, grads, buffers, formats, (stored.ids[:1] if flat else stored.ids)


def record_spans(arrays, labels, groups):
    """The byte ranges of ``arrays``: ``(start, end, label, group)``, for the
    gradient checks of low-precision buckets."""
    return [(*_span(a), label, g) for a, label, g in zip(arrays, labels, groups) if a.nbytes]


def views(arena, shapes):
    """Consecutive views of ``arena`` with ``shapes``."""
    views, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        views.append(arena[offset:offset + n].reshape(shape))
        offset += n
    return views
