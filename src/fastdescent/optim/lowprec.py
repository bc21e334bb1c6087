"""Low-precision storage in the optimizer objects: bfloat16 and int8 state,
bfloat16 and float16 parameters, with or without a float32 master copy.

:class:`LowPrecision` is the part of :class:`~fastdescent.optim.Optimizer` that
decides how each bucket's arrays are stored (:class:`fastdescent.precision.Storage`)
and hands the kernel their formats, so that the step itself stays one call of the
rule's kernel per bucket: a :class:`~fastdescent._runtime.StoredCall`, made once per
state and taken by the general step and the C step plan alike, whose gradients
``WrittenBuffers.check_stored_grads`` checks.

State layout per parameter (PyTorch's names for the rule's buffers):

* ``state[name]``: the buffer, as a float32, ``ml_dtypes.bfloat16`` or int8/uint8
  (codes) array shaped like the parameter;
* ``state[name + "_scales"]``: for int8/uint8 buffers, the float32 scale of each
  block of :data:`~fastdescent.precision.BLOCK` elements (in the parameter's flat order);
* ``state["master_param"]``: with ``master_weights=True``, the float32 master copy.
"""

import numpy as np

from .. import _runtime, precision
from ..precision import NATIVE
from ..rules._spec import FIRST_GRADIENT, PARAMETER

MASTER = "master_param"
_LOW_PARAM_DTYPES = ("bfloat16", "float16")


def scales_name(name):
    """The state key of the block scales of int8 buffer ``name``."""
    return f"{name}_scales"


class StoredBucket:
    """How one bucket's arrays are stored, and the arrays the kernel takes."""

    __slots__ = ("param_kind", "copy_kind", "kinds", "kernel_params", "copies", "scales", "ids", "where", "call")

    def __init__(self, storage, spec, dtype, ids, where):
        self.param_kind, self.copy_kind = storage.param_kind(dtype)
        self.kinds = {b.name: storage.buffer_kind(b, dtype) for b in spec.buffers}
        self.kernel_params = None  # masters, or uint16 views of bfloat16 parameters
        self.copies = None         # the parameters a master's rounding is written to
        self.scales = {}           # int8 buffer name -> its scales, one array per parameter
        self.ids = ids             # the parameters' indices: their stochastic rounding keys
        self.where = where         # the bucket, as errors about its gradients name it
        # (flat, config.present, the _runtime.StoredCall for them), made when the state changes.
        self.call = None


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
        """True if any bucket keeps low-precision parameters or state."""
        return any(b.stored is not None for layout in self._layouts for b in layout.buckets)

    def _new_stored_bucket(self, bucket, g, first):
        """The StoredBucket of ``bucket`` of group ``g`` (whose first parameter is the
        optimizer's ``first``), or None if its arrays are all float32/float64."""
        dtype = bucket.dtype
        if self._storage.is_default and precision.dtype_name(dtype) in ("float32", "float64"):
            return None
        ids = tuple(first + k for k in bucket.positions)
        stored = StoredBucket(self._storage, self.spec, dtype, ids, f"param_groups[{g}] ({dtype})")
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

    def _stored_grads(self, written, bucket, grads, offset, only):
        """The gradients of low-precision ``bucket``, ``grads[offset + position]``,
        checked in C (:meth:`~fastdescent._runtime.WrittenBuffers.check_stored_grads`:
        float32 or the parameters' dtype, one dtype per call, shape, layout, and no
        byte shared with any array the step writes, of group ``only``; -1: of
        every group), as the kernel takes them."""
        stored = bucket.stored
        kernel_grads = written.check_stored_grads(bucket.params, grads, bucket.positions, offset, only, stored.where)
        if ((self._clip_grad_norm is not None or self._clip_grad_value is not None or self._skip_nonfinite)
                and kernel_grads and kernel_grads[0].dtype != np.float32):
            name = precision.dtype_name(bucket.dtype)
            raise TypeError(f"{stored.where}: grads[{offset + bucket.positions[0]}] is {name}: clip_grad_norm, "
                            "clip_grad_value and skip_nonfinite read float32 gradients; pass float32 gradients or "
                            "clip them yourself")
        return kernel_grads

    def _stored_call(self, bucket, flat, config):
        """The :class:`~fastdescent._runtime.StoredCall` of low-precision ``bucket``
        (``flat``: of its arenas) for the buffers ``config`` needs, made again only
        after the state changed: the arrays as the kernel takes them, and the
        stored formats of every role but the gradients."""
        stored = bucket.stored
        kept = stored.call
        if kept is not None and kept[0] == flat and kept[1] == config.present:
            return kept[2]
        buffers = self._kernel_buffers(bucket, flat, config)
        grads = None
        if flat:  # one tensor: the arenas
            params = [precision.kernel_view(bucket.arenas["param"])]
            masters = [bucket.arenas[MASTER]] if MASTER in bucket.arenas else None
            buffers = tuple([None if arrays is None else [precision.kernel_view(a) for a in arrays]
                             for arrays in buffers])
            grads = [precision.kernel_view(bucket.arenas["grad"])]
        else:
            params = stored.copies if stored.copy_kind != NATIVE else stored.kernel_params or bucket.params
            masters = stored.kernel_params if stored.copy_kind != NATIVE else None
        call = stored_call(self._storage, self.spec, params, buffers, masters, stored.scales,
                           stored.ids[:1] if flat else stored.ids, precision.dtype_name(bucket.dtype), stored.where,
                           grads)
        stored.call = (flat, config.present, call)
        return call


def stored_call(storage, spec, params, buffers, masters, scales, ids, dtype_name, where="", grads=None):
    """The :class:`~fastdescent._runtime.StoredCall` of one low-precision bucket of
    ``dtype_name`` parameters (the optimizers' and the torch adapter's): ``params``
    (the parameters or their bits), ``buffers`` (one list or None per declared
    buffer, as the kernel takes them), ``masters`` (their float32 master copies, or
    None), ``scales`` (buffer name -> an int8 buffer's block scales), ``ids`` (the
    tensors' rounding keys), ``where`` (the bucket, as gradient errors name it),
    ``grads`` (a flat arena's own gradients, or None)."""
    params, roles = precision.stored_roles(spec, params, dict(zip(spec.buffer_names, buffers)), masters, scales)
    return _runtime.StoredCall(params, buffers, roles, ids, precision.GRAD_KINDS.get(dtype_name, NATIVE), storage,
                               precision.formats, where, grads)


def views(arena, shapes):
    """Consecutive views of ``arena`` with ``shapes``."""
    views, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        views.append(arena[offset:offset + n].reshape(shape))
        offset += n
    return views
