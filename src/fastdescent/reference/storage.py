"""Reference low-precision storage: the NumPy twin of ``stored`` in src/kernels/_storage.pxi.

The kernel decodes each block of a stored role into float32, runs the rule's
float32 element loop and encodes the block back. Every rule is elementwise, so
decoding whole tensors, running the rule's reference twin once and encoding
whole tensors gives the same bits: that is what this function does, with the
formats of :mod:`fastdescent.precision` (integer operations on uint16/uint32
views).
"""

from .. import precision


def _decode(kind, array, scales):
    if kind == precision.BF16:
        return precision.bf16_decode(array)
    if kind == precision.F16:
        return array.astype("float32")
    return precision.int8_decode(array, scales, precision.code_of(kind))


def _encode_into(kind, values, array, scales, random):
    """Write float32 ``values`` into ``array`` (and ``scales``) in format ``kind``."""
    if kind == precision.BF16:
        array[...] = precision.bf16_encode(values, random).reshape(array.shape)
    elif kind == precision.F16:
        array[...] = values.astype("float16").reshape(array.shape)
    else:
        codes, new_scales = precision.int8_encode(values, precision.code_of(kind), random)
        array[...] = codes.reshape(array.shape)
        scales[...] = new_scales


def stored(kernel, args, kwargs, formats, tensor_ids=None):
    """Call ``kernel(*args, **kwargs)`` (a reference twin) with some of its buffer
    lists in low-precision storage; same contract as the kernel's ``stored``."""
    decoded = {}
    for arrays, kind, scales, copies, copy_kind, written, key in formats:
        if kind != precision.NATIVE:
            decoded[id(arrays)] = [_decode(kind, a, None if scales is None else scales[t])
                                   for t, a in enumerate(arrays)]

    def swap(value):
        return decoded.get(id(value), value) if isinstance(value, list) else value

    kernel(*map(swap, args), **{name: swap(value) for name, value in kwargs.items()})
    ids = range(len(args[0])) if tensor_ids is None else tensor_ids
    for arrays, kind, scales, copies, copy_kind, written, key in formats:
        values = decoded.get(id(arrays), arrays)
        for t, array in enumerate(arrays):
            if written and kind != precision.NATIVE:
                random = None if key is None else precision.random_bits(precision.tensor_key(key, ids[t]), 0, array.size)
                _encode_into(kind, values[t], array, None if scales is None else scales[t], random)
            if copies is not None:
                _encode_into(copy_kind, values[t], copies[t], None, None)
