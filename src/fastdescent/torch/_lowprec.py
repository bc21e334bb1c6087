"""Low-precision storage in ``fastdescent.torch``: the state tensors of each storage
(:class:`fastdescent.precision.Storage`), their checks, and the state dict a
``torch.optim`` optimizer can load.

State per parameter, as in the NumPy optimizers (:mod:`fastdescent.optim.lowprec`):
the rule's buffers as float32, ``torch.bfloat16`` or ``torch.int8``/``torch.uint8``
codes shaped and laid out like the parameter, ``<name>_scales`` (float32, one per
block of 256 elements of the parameter's memory order) for the codes, and
``master_param`` (float32, laid out like the parameter) with master weights.
"""

import warnings

import numpy as np
import torch

from .. import precision
from ..optim.lowprec import MASTER, scales_name
from ..rules._spec import FIRST_GRADIENT, PARAMETER

#: The constructor options of every fastdescent.torch class besides torch.optim's.
STORAGE_OPTIONS = ("state_dtype", "rounding", "seed", "master_weights")
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "int8": torch.int8, "uint8": torch.uint8}
_LOW_PARAM_DTYPES = (torch.bfloat16, torch.float16)


def numpy_dtype_name(dtype):
    """``"bfloat16"``... of a torch dtype."""
    return str(dtype).removeprefix("torch.")


def is_stored(storage, param_dtype):
    """True if parameters of ``param_dtype`` are stepped through stored formats."""
    return not storage.is_default or param_dtype in _LOW_PARAM_DTYPES


def check(storage, spec, hyper, param, where):
    """The storage options' checks for one parameter (``storage.check``)."""
    if not is_stored(storage, param.dtype):
        return
    if param.is_complex():
        raise TypeError(f"{where}: low-precision storage is for real parameters, not {param.dtype}")
    storage.check(spec, hyper, numpy_dtype_name(param.dtype), where)


def extra_names(storage, spec, hyper, param_dtype):
    """The state keys besides the rule's buffers: the master copy, the scales of
    the int8 buffers the configuration needs."""
    if not is_stored(storage, param_dtype):
        return ()
    name = numpy_dtype_name(param_dtype)
    names = (MASTER,) if storage.master_weights else ()
    return names + tuple(scales_name(b.name) for b in spec.needed(hyper)
                         if storage.buffer_kind(b, name) in (precision.INT8, precision.UINT8))


def expected(storage, spec, name, param):
    """``(dtype, shape)`` of state tensor ``name`` of ``param`` (shape None: the
    parameter's, in its layout)."""
    dtype_name = numpy_dtype_name(param.dtype)
    if name == MASTER:
        return torch.float32, None
    buffers = {b.name: b for b in spec.buffers}
    if name in buffers:
        kind = storage.buffer_kind(buffers[name], dtype_name) if is_stored(storage, param.dtype) else None
        if kind is None:
            return param.dtype, None
        if kind == precision.NATIVE:
            return (torch.float64 if param.dtype == torch.float64 else torch.float32), None
        if kind == precision.BF16:
            return torch.bfloat16, None
        return _TORCH_DTYPES[precision.code_of(kind).dtype.name], None
    return torch.float32, (precision.n_blocks(param.numel()),)  # scales


def new_state(storage, spec, hyper, param, state):
    """Fill ``state`` with the buffers, scales and master of ``param``; returns True
    if a buffer starts as the first gradient (the kernel writes it)."""
    fresh = False
    stored = is_stored(storage, param.dtype)
    if stored and storage.master_weights:
        state[MASTER] = param.detach().to(torch.float32, memory_format=torch.preserve_format).clone()
    for b in spec.needed(hyper):
        fill = b.initial(hyper)
        if fill is FIRST_GRADIENT:
            fresh, fill = True, 0.0
        if not stored:
            if fill is PARAMETER:
                state[b.name] = param.detach().clone(memory_format=torch.preserve_format)
            else:
                if param.is_complex():
                    fill = complex(fill, fill)
                state[b.name] = torch.full_like(param, fill, memory_format=torch.preserve_format)
            continue
        dtype, _ = expected(storage, spec, b.name, param)
        tensor = torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if fill is PARAMETER:  # the values the rule updates, in the new tensor's memory order
            values = torch.empty_like(tensor, dtype=torch.float32).copy_(state.get(MASTER, param))
            values = _flat(values)
        else:
            values = np.full(param.numel(), fill, np.float32)
        encoded, scales = storage.encoded(storage.buffer_kind(b, numpy_dtype_name(param.dtype)), values)
        _flat(tensor)[...] = precision.kernel_view(encoded).reshape(-1)
        state[b.name] = tensor
        if scales is not None:
            state[scales_name(b.name)] = torch.from_numpy(scales.copy())
    return fresh


def _flat(tensor):
    from ._layout import flat_view

    return flat_view(tensor)


def relayout(storage, spec, name, t, ref, scales):
    """State tensor ``name`` (``t``; ``scales`` if it is int8 codes) in the layout of
    ``ref``: codes are decoded in their own memory order and encoded again in
    ``ref``'s (their blocks follow the memory order); returns ``(tensor, scales)``."""
    from ._layout import in_layout_of

    if t.dtype not in (torch.int8, torch.uint8):
        return in_layout_of(ref, t), scales
    kind = precision.INT8 if t.dtype == torch.int8 else precision.UINT8
    values = precision.int8_decode(_flat(t), scales.numpy(), precision.code_of(kind))
    logical = torch.empty_strided(t.shape, t.stride(), dtype=torch.float32)
    _flat(logical)[...] = values
    moved = in_layout_of(ref, logical)
    codes, new_scales = precision.int8_encode(_flat(moved), precision.code_of(kind))
    out = torch.empty_like(ref, dtype=t.dtype)
    _flat(out)[...] = codes
    return out, torch.from_numpy(new_scales.copy())


def check_views(names, arrays, writable, where):
    """What ``check_buffers`` checks of an update's flat views, for stored ones
    (other dtypes, scales of another length): ndarrays, C-contiguous, aligned,
    writable where written, and no written one sharing memory with another."""
    spans = []
    for name, role, write in zip(names, arrays, writable):
        for a in role:
            if not isinstance(a, np.ndarray) or not a.flags.c_contiguous or not a.flags.aligned:
                raise ValueError(f"{where}: {name} must be a C-contiguous, aligned array")
            if write and not a.flags.writeable:
                raise ValueError(f"{where}: {name} is read-only; it is updated in place")
            start = a.__array_interface__["data"][0]
            spans.append((start, start + a.nbytes, name, write))
    for i, (lo, hi, name, write) in enumerate(spans):
        for lo2, hi2, name2, write2 in spans[i + 1:]:
            if (write or write2) and lo < hi2 and lo2 < hi and hi > lo and hi2 > lo2:
                raise ValueError(f"{where}: {name2} shares memory with {name}; every buffer of an update "
                                 "must be distinct")


def upcast_state_dict(state_dict):
    """A copy of a ``fastdescent.torch`` state dict that ``torch.optim`` loads: every
    bfloat16 and int8 buffer as float32 (torch.optim then casts it to the
    parameter's dtype), without the block scales, the master copies and the
    storage record. A :class:`fastdescent.precision.StateConversion` warning says
    what was converted and dropped. The float32 master copies are the precise
    parameters: load them into float32 parameters to continue in float32."""
    out = {k: v for k, v in state_dict.items() if k != "storage"}
    done = set()
    state = {}
    for index, entry in state_dict["state"].items():
        entry = dict(entry)
        for key in [k for k in entry if k.endswith("_scales")]:
            codes_key = key[: -len("_scales")]
            codes = entry[codes_key]
            kind = precision.INT8 if codes.dtype == torch.int8 else precision.UINT8
            values = torch.empty_strided(codes.shape, codes.stride(), dtype=torch.float32)
            _flat(values)[...] = precision.int8_decode(_flat(codes), entry[key].numpy(), precision.code_of(kind))
            entry[codes_key] = values
            del entry[key]
            done.add(f"{codes_key!r} {codes.dtype} codes decoded")
        for key, value in list(entry.items()):
            if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 and key != "step":
                entry[key] = value.float()
                done.add(f"{key!r} bfloat16 -> float32")
        if MASTER in entry:
            del entry[MASTER]
            done.add("float32 master copies dropped")
        state[index] = entry
    out["state"] = state
    if done:
        warnings.warn("state dict upcast for torch.optim: " + "; ".join(sorted(done)), precision.StateConversion,
                      stacklevel=2)
    return out


def saved_storage(state_dict, storage, convert):
    """The storage a state dict was saved with (its ``"storage"`` record, else the
    defaults); ValueError if it differs from ``storage`` and ``convert`` is false."""
    saved = state_dict.get("storage")
    saved = precision.Storage() if saved is None else precision.Storage.of(**saved)
    if saved != storage and not convert:
        differ = [f"{k}={v!r} (here {storage.as_dict()[k]!r})" for k, v in saved.as_dict().items()
                  if storage.as_dict()[k] != v]
        raise ValueError(f"the state dict was saved with {', '.join(differ)}: load it with convert=True to "
                         "convert it")
    return saved


def _values(entry, name):
    """float32 values (logical order, the tensor's layout) of saved buffer ``name``."""
    t = entry[name]
    if t.dtype in (torch.int8, torch.uint8):
        kind = precision.INT8 if t.dtype == torch.int8 else precision.UINT8
        values = torch.empty_strided(t.shape, t.stride(), dtype=torch.float32)
        _flat(values)[...] = precision.int8_decode(_flat(t), entry[scales_name(name)].numpy(),
                                                   precision.code_of(kind))
        return values
    return t.float()


def convert_state(state_dict, saved, storage, spec, params, hypers):
    """``state_dict`` (saved with ``saved``) with its state converted to ``storage``
    for ``params`` (saved index -> parameter) and ``hypers`` (saved index -> the
    validated hyperparameters of its group); returns (state dict, what was done)."""
    done = set()
    state = {}
    buffers = set(spec.buffer_names)
    for index, entry in state_dict["state"].items():
        param = params[index]
        if not is_stored(storage, param.dtype) and not is_stored(saved, param.dtype):
            state[index] = entry
            continue
        targets = {}
        if is_stored(storage, param.dtype):
            new_state(storage, spec, hypers[index], param, targets)
        else:
            targets = {b.name: torch.empty_like(param, memory_format=torch.preserve_format)
                       for b in spec.needed(hypers[index])}
        out = {k: v for k, v in entry.items() if k not in buffers and k != MASTER and not k.endswith("_scales")}
        for name, target in targets.items():
            if name == MASTER:
                out[MASTER] = entry.get(MASTER, target)
                if MASTER not in entry:
                    done.add("master copies made from the parameters")
            elif name in buffers and entry.get(name) is not None:
                values = _values(entry, name)
                if target.dtype in (torch.int8, torch.uint8):
                    kind = precision.INT8 if target.dtype == torch.int8 else precision.UINT8
                    laid = torch.empty_like(target, dtype=torch.float32).copy_(values)
                    codes, scales = precision.int8_encode(_flat(laid), precision.code_of(kind))
                    _flat(target)[...] = codes
                    out[scales_name(name)] = torch.from_numpy(scales.copy())
                else:
                    target.copy_(values)
                out[name] = target
                if entry[name].dtype != target.dtype:
                    done.add(f"{name!r} {numpy_dtype_name(entry[name].dtype)} -> {numpy_dtype_name(target.dtype)}")
        if MASTER in entry and MASTER not in targets:
            done.add("the saved float32 master copies were dropped")
        if storage.stochastic and "step" not in entry:
            from ._adapter import _scalar_dtype

            out["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            done.add("no saved step count: stochastic rounding counts from 0")
        state[index] = out
    if (saved.rounding, saved.seed) != (storage.rounding, storage.seed):
        done.add(f"rounding {saved.rounding!r} (seed {saved.seed}) -> {storage.rounding!r} (seed {storage.seed}) "
                 "from now on")
    return {**state_dict, "state": state}, sorted(done)
