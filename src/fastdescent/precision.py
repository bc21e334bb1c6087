r"""Low-precision storage: bfloat16 and 8-bit optimizer state, bfloat16 parameters.

An optimizer step is bound by the bytes it moves. Keeping a rule's state buffers
(Adam's :math:`m` and :math:`v`...) in 16 or 8 bits moves fewer of them; the
arithmetic still runs in float32. This module defines the formats, exactly: the
kernels (``src/kernels/_storage.pxi``) and the NumPy reference
(:mod:`fastdescent.reference.storage`) both follow it, bit for bit.

How a step runs on stored arrays
--------------------------------
Every rule's element loop is elementwise over float32 arrays. A step on stored
arrays cuts each tensor into blocks of :data:`BLOCK` elements (aligned to the
tensor's own element index, so blocks never depend on how the work is split
among threads) and, a few blocks at a time: decodes the stored roles into
float32, runs the rule's own float32 loop, and rounds the written roles back (or
requantizes them) in the same pass. So the update is the float32 rule applied to
the decoded values, and the only new arithmetic is the encoding below.

Formats
-------
``"bfloat16"``
    The upper 16 bits of a float32 (what ``ml_dtypes.bfloat16`` and
    ``torch.bfloat16`` hold). Decoding is exact. Encoding rounds to nearest even
    (as ``ml_dtypes`` and ``torch`` convert) or stochastically (below); NaN stays
    NaN, values past the largest bfloat16 become infinite.
``"float16"`` (parameters and gradients only)
    IEEE half precision, rounded to nearest even.
``"int8"``: block-wise 8-bit codes
    Each block of :data:`BLOCK` elements (aligned to the parameter's flat order)
    has its own *scale*, its largest finite magnitude, stored as a float32
    (``<name>_scales`` in the optimizer state). Each element is an 8-bit
    floating-point code of ``y = |x| * (1 / scale)`` (one float32 reciprocal per
    block): the "dynamic" idea of bitsandbytes' 8-bit optimizers, with a
    structured map so that encoding is a multiply and the same integer rounding
    as bfloat16. The code is the top 8 bits of the float32 ``y * 2**-bias``,
    whose exponents 1 .. top are the code's binades and whose subnormals are the
    code's subnormals:

    * buffers that may be negative (first moments, momentum): int8 with a sign
      bit, 4 exponent bits and 3 mantissa bits (bias 112): magnitudes
      :math:`2^{e-15}(1 + f/8)` for :math:`e = 1..14` (1.0 is ``e = 15, f = 0``)
      and subnormals :math:`f \cdot 2^{-17}`, times the scale; relative error at
      most 1/16 (round to nearest) down to :math:`2^{-14}` of the block's largest
      value;
    * non-negative buffers (second moments, sums of squares): uint8 with 5
      exponent bits and 3 mantissa bits (bias 96), normal down to
      :math:`2^{-30}` of the block's largest value;
    * encoding: ``y = |x| * inverse`` with ``inverse`` = 1 / scale rounded toward
      zero (so ``y <= 1``), then the top 8 bits of the float32 ``y * 2**-bias``
      rounded to nearest (ties away from zero) or stochastically; a
      non-negative buffer's code holds ``|x|`` (its values are never negative);
    * the magnitude code with every bit set is NaN: non-finite values (NaN and
      infinities) encode as NaN; decoding is
      ``float32(code bits << 20) * 2**bias * scale``.

    Why the block's maximum and not a power of two as the scale: with 3
    mantissa bits, an exponential average that moves by less than half a code
    step per update (RMSprop's ``alpha = 0.99``: 1 %) stalls under round to
    nearest on a fixed grid; with the maximum as the scale the grid moves with
    the block's largest value at every step. On the demo's MLP a power-of-two
    scale cost RMSprop 0.5 point of held-out accuracy, this scale nothing.

    Why not a linear code (absmax / 127, as the first 8-bit optimizers): an
    adaptive rule divides by the root of its second moment. A linear code keeps
    two or three significant digits only near the block's largest value and
    turns second moments 100 times smaller than it into 0 or one code step: the
    update of those elements is then :math:`m / \epsilon`. On the demo's MLP,
    linear codes for both Adam moments ended at 12 % held-out accuracy (float32
    state: 96.5 %), these codes at 97.0 % (a development experiment; the
    demo's ``precision`` section and ``tests/test_lowprec_quality.py`` check
    these codes against float32 state for every optimizer).

Stochastic rounding
-------------------
``rounding="stochastic"`` rounds up with probability equal to the distance to
the lower neighbour over the gap, so the rounded value is right on average and
small updates are not lost (round to nearest leaves a bfloat16 parameter
unchanged by any update below half its spacing). The random bits come from a
counter-based hash of (seed, step, buffer, parameter, element), so they do not
depend on the thread count, on how the work is split, on which parameters are
stepped together, or on the backend:

* per buffer and step, a 64-bit key
  ``key = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ stream)``, where
  ``step`` is the step number being taken (every rule counts steps with
  stochastic rounding) and ``stream`` is 0 for the parameters and 1 + the
  buffer's position in the rule's ``buffers``; per parameter,
  ``key_p = splitmix64(key ^ p)`` with ``p`` the parameter's index in the
  optimizer (the index of its ``state_dict`` entry);
* per element, with ``i`` its index in the parameter's flat order,
  ``bits(i) = lowbias32(lo32(i) ^ lowbias32(hi32(i) ^ hi32(key_p)) ^ lo32(key_p))``,
  where ``splitmix64`` is the finalizer of Steele, Lea & Flood's SplitMix64 and
  ``lowbias32`` is Chris Wellons' 32-bit integer hash
  (``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16``);
* bfloat16 adds the low 16 bits to the float32's bits and truncates; the int8
  codes add the low 20 bits to those of ``y * 2**-bias`` and truncate.

A flat arena (``flat=True``) is one tensor to the kernel: its elements are
numbered along the arena, under the key of its first parameter.
"""

from dataclasses import dataclass, field

import numpy as np

#: Elements per block of the int8 codes, and per chunk of the stored pass.
BLOCK = 256

#: The state dtypes a rule's buffers may be kept in (``None``: the parameters' dtype).
STATE_DTYPES = ("float32", "float64", "bfloat16", "int8")
ROUNDINGS = ("nearest", "stochastic")

# Storage kinds, as the kernels number them (src/kernels/_storage.pxi).
NATIVE, BF16, F16, INT8, UINT8 = 0, 1, 2, 3, 4
KIND_NAMES = {NATIVE: "float32", BF16: "bfloat16", F16: "float16", INT8: "int8", UINT8: "uint8"}

_M64 = (1 << 64) - 1
_MASK32 = np.uint32(0xFFFFFFFF)


def bfloat16_dtype():
    """``ml_dtypes.bfloat16`` as a NumPy dtype (imported when first needed)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------ the hash
def splitmix64(x):
    """One step of Steele, Lea & Flood's SplitMix64 finalizer on a Python int (64 bits)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_key(seed, step, stream):
    """The 64-bit key of one buffer (``stream``) at one step (see the module docstring)."""
    return splitmix64(splitmix64(splitmix64(seed & _M64) ^ (step & _M64)) ^ stream)


def tensor_key(key, tensor):
    """The key of one tensor (its ``tensor`` id) under a buffer's ``key``."""
    return splitmix64(key ^ (tensor & _M64))


def lowbias32(x):
    """Chris Wellons' ``lowbias32`` integer hash, on a uint32 array (wrapping)."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):  # NumPy scalars warn when a product wraps
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def random_bits(key, start, n):
    """The 32 random bits of elements ``start .. start + n - 1`` under ``key``."""
    index = np.arange(start, start + n, dtype=np.uint64)
    high = (index >> np.uint64(32)).astype(np.uint32)
    low = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    mixed = lowbias32(high ^ np.uint32(key >> 32)) ^ np.uint32(key & 0xFFFFFFFF)
    return lowbias32(low ^ mixed)


# ------------------------------------------------------------------ bfloat16
def _contiguous(x, dtype):
    """``x`` as a C-contiguous array of ``dtype``, keeping its shape (0-d too)."""
    a = np.asarray(x, dtype=dtype)
    return a if a.flags.c_contiguous else a.copy()


def bits_of(x):
    """The bits of a float32 array as uint32 (a view when it can)."""
    return _contiguous(x, np.float32).view(np.uint32)


def float_of(bits):
    return _contiguous(bits, np.uint32).view(np.float32)


def bf16_decode(half):
    """float32 values of bfloat16 bits (uint16, or an ``ml_dtypes.bfloat16`` array): exact."""
    return float_of(np.asarray(half).view(np.uint16).astype(np.uint32) << np.uint32(16))


def bf16_encode(x, random=None):
    """bfloat16 bits (uint16) of float32 ``x``: round to nearest even, or stochastically
    with ``random`` (uint32 bits, one per element). NaN stays a (quiet) NaN."""
    u = bits_of(x)
    if random is None:
        add = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    else:
        add = np.asarray(random, dtype=np.uint32).reshape(u.shape) & np.uint32(0xFFFF)
    rounded = ((u + add) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), rounded)


# ------------------------------------------------------------------ int8 codes
@dataclass(frozen=True)
class Code:
    """An 8-bit floating-point code of ``y = x / scale`` in [-1, 1] (or [0, 1]):
    ``exponent`` and ``mantissa`` bits, with or without a sign bit."""

    signed: bool
    exponent: int
    mantissa: int

    @property
    def top(self):
        """The exponent field of 1.0: binades [2**(e - top), 2**(e + 1 - top)) for e = 1 .. top - 1."""
        return (1 << self.exponent) - 1

    @property
    def bias(self):
        """float32 biased exponent = exponent field + bias."""
        return 127 - self.top

    @property
    def nan(self):
        """The magnitude code of NaN (all ones)."""
        return (1 << (self.exponent + self.mantissa)) - 1

    @property
    def dropped(self):
        """float32 mantissa bits below the code's."""
        return 23 - self.mantissa

    @property
    def smallest(self):
        """The smallest normal magnitude of ``y`` (subnormals reach down to 2**-mantissa of it)."""
        return 2.0 ** (1 - self.top)

    @property
    def dtype(self):
        return np.dtype(np.int8 if self.signed else np.uint8)


#: Buffers that may be negative: sign, 4 exponent bits, 3 mantissa bits (int8).
SIGNED_CODE = Code(True, 4, 3)
#: Non-negative buffers: 5 exponent bits, 3 mantissa bits (uint8).
UNSIGNED_CODE = Code(False, 5, 3)


def code_of(kind):
    return SIGNED_CODE if kind == INT8 else UNSIGNED_CODE


def n_blocks(n):
    """Blocks (and scales) of a tensor of ``n`` elements."""
    return -(-n // BLOCK)


def _blocks(a, fill=0):
    """``a`` (1-D) padded to whole blocks and shaped (blocks, BLOCK)."""
    pad = n_blocks(a.size) * BLOCK - a.size
    if pad:
        a = np.concatenate([a, np.full(pad, fill, a.dtype)])
    return a.reshape(-1, BLOCK)


def _per_element(per_block, n):
    return np.repeat(per_block, BLOCK)[:n]


def int8_decode(codes, scales, code):
    """float32 values of one tensor's codes (int8 or uint8, any shape) and its
    block ``scales`` (float32, one per block of the flat order)."""
    flat = np.ascontiguousarray(codes).reshape(-1).view(np.uint8).astype(np.uint32)
    magnitude = flat & np.uint32(0x7F) if code.signed else flat
    y = np.where(magnitude == code.nan, np.uint32(0x7FC00000), magnitude << np.uint32(code.dropped))
    if code.signed:
        y |= (flat & np.uint32(0x80)) << np.uint32(24)
    scale = _per_element(np.asarray(scales, np.float32), flat.size)
    return ((float_of(y) * np.float32(2.0**code.bias)) * scale).reshape(np.shape(codes))


def inverse_toward_zero(scales):
    """``1 / scales`` in float32, rounded toward zero (so that ``|x| * inverse <= 1``
    for every ``|x| <= scale``): the reciprocal to nearest, one ulp lower if it is
    above the exact value (decided exactly: a product of two float32 is exact in
    float64)."""
    scales = np.asarray(scales, np.float32)
    inverse = np.float32(1) / scales
    above = inverse.astype(np.float64) * scales.astype(np.float64) > 1.0
    return np.where(above, float_of(bits_of(inverse) - np.uint32(1)), inverse)


def int8_encode(x, code, random=None):
    """``(codes, scales)`` of float32 ``x`` (any shape, blocks along its flat
    order): round to nearest (ties away from zero) or, with ``random`` (uint32
    bits per element), stochastically."""
    u = bits_of(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    magnitude = u & np.uint32(0x7FFFFFFF)
    finite = magnitude < np.uint32(0x7F800000)
    largest = _blocks(np.where(finite, magnitude, np.uint32(0))).max(axis=1)
    scales = float_of(largest)
    inverse = np.where(largest != 0, inverse_toward_zero(np.where(largest != 0, scales, np.float32(1))),
                       np.float32(1))
    y = bits_of((float_of(magnitude) * _per_element(inverse.astype(np.float32), u.size))
                * np.float32(2.0**-code.bias))
    if random is None:
        add = np.uint32(1 << (code.dropped - 1))
    else:
        add = np.asarray(random, dtype=np.uint32).reshape(-1) & np.uint32((1 << code.dropped) - 1)
    c = np.minimum((y + add) >> np.uint32(code.dropped), np.uint32(code.nan))
    if code.signed:
        c |= (u >> np.uint32(24)) & np.uint32(0x80)
    return c.astype(np.uint8).view(code.dtype).reshape(np.shape(x)), scales


class StateConversion(UserWarning):
    """A state dict or checkpoint was loaded into other storage (``convert=True``)."""


# ------------------------------------------------------------------ options
def dtype_name(dtype):
    """``"float32"``, ``"bfloat16"``... for a NumPy dtype or its name (``ml_dtypes.bfloat16``
    too: NumPy knows the name "bfloat16" only once ml_dtypes is imported)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return dtype
    return np.dtype(dtype).name


def _state_dtype(value):
    if value is None:
        return None
    if isinstance(value, str):
        name = value
    else:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = repr(value)
    if name not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES} or None (the parameters' dtype), got {value!r}")
    return name


PARAM_KINDS = {"float32": NATIVE, "bfloat16": BF16, "float16": F16}
GRAD_KINDS = PARAM_KINDS


@dataclass(frozen=True)
class Storage:
    """How an optimizer keeps its state and parameters (validated options).

    ``state_dtype``: the dtype of the rule's state buffers, None for the
    parameters' (float32 with ``master_weights``, since the master copy is what
    the rule updates). ``rounding``: ``"nearest"`` or ``"stochastic"`` for every
    value written in 16 or 8 bits (state buffers, bfloat16 parameters without a
    master; a master's copy is always rounded to nearest); None is
    ``"nearest"``, except that bfloat16/float16 parameters without a master need
    the choice made explicitly (``rounding_chosen``). ``seed``: the stochastic
    rounding's seed (required with it). ``master_weights``: keep a float32 copy
    of bfloat16/float16 parameters in the state, step it, and write its rounding
    into the parameters.
    """

    state_dtype: str | None = None
    rounding: str = "nearest"
    seed: int | None = None
    master_weights: bool = False
    rounding_chosen: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def of(cls, state_dtype=None, rounding=None, seed=None, master_weights=False):
        """Validated options (TypeError/ValueError for a bad value or combination)."""
        state_dtype = _state_dtype(state_dtype)
        chosen = rounding is not None
        rounding = "nearest" if rounding is None else rounding
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS} or None, got {rounding!r}")
        if seed is not None:
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be an int or None, got {seed!r}")
            if not 0 <= int(seed) < 2**64:
                raise ValueError(f"seed must be in [0, 2**64), got {seed}")
            seed = int(seed)
        if not isinstance(master_weights, (bool, np.bool_)):
            raise TypeError(f"master_weights must be a bool, got {master_weights!r}")
        if rounding == "stochastic" and seed is None:
            raise ValueError("rounding='stochastic' needs a seed (an int): the random bits are a function of "
                             "(seed, step, buffer, parameter, element), so that a run can be repeated exactly")
        return cls(state_dtype, rounding, seed, bool(master_weights), chosen)

    @property
    def stochastic(self):
        return self.rounding == "stochastic"

    @property
    def is_default(self):
        return self == Storage()

    def as_dict(self):
        return {"state_dtype": self.state_dtype, "rounding": self.rounding, "seed": self.seed,
                "master_weights": self.master_weights}

    # ----------------------------------------------------- what goes where
    def param_kind(self, param_dtype):
        """How the kernel sees parameters of ``param_dtype``: (kind of the params
        role, kind of the copy written from a float32 master or NATIVE)."""
        name = dtype_name(param_dtype)
        if self.master_weights:
            return NATIVE, PARAM_KINDS[name]
        return PARAM_KINDS.get(name, NATIVE), NATIVE

    def resolved_state_dtype(self, param_dtype):
        """The state dtype for parameters of ``param_dtype`` (the default resolved)."""
        if self.state_dtype is not None:
            return self.state_dtype
        name = dtype_name(param_dtype)
        if self.master_weights or name == "float16":
            return "float32"
        return name

    def buffer_kind(self, buffer, param_dtype):
        """The storage kind of ``buffer`` (a rules._spec.Buffer)."""
        name = self.resolved_state_dtype(param_dtype)
        if name in ("float32", "float64"):
            return NATIVE
        if name == "bfloat16":
            return BF16
        return UINT8 if buffer.nonnegative else INT8

    def check(self, spec, hyper, param_dtype, where=""):
        """Raise ValueError/TypeError, naming the problem, if these options make no
        sense for rule ``spec`` (validated hyperparameters ``hyper``) on
        parameters of ``param_dtype``."""
        prefix = f"{where}: " if where else ""
        name = dtype_name(param_dtype)
        state = self.resolved_state_dtype(param_dtype)
        low_precision = name != "float64" and (name != "float32" or state != "float32")
        if name not in ("float32", "float64", "bfloat16", "float16"):
            raise TypeError(f"{prefix}parameters of dtype {name}: fastdescent steps float32, float64, "
                            "bfloat16 and float16 parameters")
        if self.master_weights and name not in ("bfloat16", "float16"):
            raise ValueError(f"{prefix}master_weights=True keeps a float32 master copy of bfloat16 or float16 "
                             f"parameters; {name} parameters are their own master")
        if name == "float64" and state != "float64":
            raise ValueError(f"{prefix}state_dtype={state!r} with float64 parameters: low-precision state "
                             "runs its arithmetic in float32, so it needs float32 (or bfloat16/float16) parameters")
        if name in ("float32", "bfloat16") and state == "float64":
            raise ValueError(f"{prefix}state_dtype='float64' needs float64 parameters")
        if name in ("bfloat16", "float16") and not self.master_weights and not self.rounding_chosen:
            raise TypeError(f"{prefix}{name} parameters: pass master_weights=True (a float32 master copy is "
                            "stepped and rounded into them) or choose how each update is rounded into them, "
                            f"rounding='stochastic' or 'nearest' (which loses updates below half a {name} spacing)")
        if name == "float16" and not self.master_weights and self.stochastic:
            raise ValueError(f"{prefix}stochastic rounding into float16 parameters is not supported: "
                             "use master_weights=True (or bfloat16 parameters)")
        if self.stochastic and not (low_precision or self.master_weights):
            raise ValueError(f"{prefix}rounding='stochastic' has nothing to round: state and parameters are "
                             f"{name}; ask for state_dtype='bfloat16' or 'int8', or bfloat16 parameters")
        if not low_precision:
            return
        if spec.runner is not None:
            raise ValueError(f"{prefix}{spec.title} runs more than one elementwise kernel per step: its state "
                             "and parameters must stay float32/float64 (no state_dtype, bfloat16 parameters "
                             "or master weights)")
        if spec.mixin is not None and name != "float32":
            raise ValueError(f"{prefix}{spec.title}'s own methods ({spec.mixin.__name__}) run kernels on the "
                             f"parameters themselves: they must be float32, not {name}")
        for buffer in spec.needed(hyper):
            if state in ("bfloat16", "int8") and state not in buffer.storage:
                allowed = ", ".join(repr(s) for s in buffer.storage) or "no low-precision dtype"
                raise ValueError(f"{prefix}state_dtype={state!r}: {spec.title}'s {buffer.name!r} may only be "
                                 f"kept in {allowed} (besides the parameters' dtype)")
        if spec.check_storage is not None and state in ("bfloat16", "int8"):
            try:
                spec.check_storage(hyper, state)
            except ValueError as error:
                raise ValueError(f"{prefix}{error}") from None

    # ----------------------------------------------------- arrays
    def encoded(self, kind, values):
        """``(stored, scales)`` of float32 ``values`` in ``kind`` (rounded to nearest)."""
        if kind == NATIVE:
            return np.array(values, np.float32), None
        if kind == BF16:
            return bf16_encode(values).view(bfloat16_dtype()).reshape(np.shape(values)), None
        codes, scales = int8_encode(values, code_of(kind))
        return codes.reshape(np.shape(values)), scales

    def new_buffer(self, kind, shape, fill):
        """``(values, scales)`` of a new state buffer of ``kind`` filled with
        ``fill`` (a float): the array the state shows (float32, bfloat16 or
        int8/uint8 codes) and its block scales (int8/uint8 only, else None).
        Every element encodes alike, so one is encoded and broadcast (no float32
        temporary of the buffer's size)."""
        if kind == NATIVE:
            return np.full(shape, fill, np.float32), None
        one = np.full(1, fill, np.float32)
        if kind == BF16:
            return np.full(shape, bf16_encode(one).view(bfloat16_dtype())[0]), None
        code, scale = int8_encode(one, code_of(kind))
        return np.full(shape, code[0]), np.full(n_blocks(int(np.prod(shape))), scale[0])


def kernel_view(array):
    """The array a kernel takes for stored values: bfloat16 as uint16 bits."""
    return array.view(np.uint16) if array.dtype == bfloat16_dtype() else array


def decoded(kind, array, scales=None):
    """float32 values of a stored array (NATIVE: ``array`` as float32)."""
    if kind == NATIVE:
        return np.asarray(array, np.float32)
    if kind == BF16:
        return bf16_decode(array).reshape(array.shape)
    if kind == F16:
        return array.astype(np.float32)
    return int8_decode(array, scales, code_of(kind))


_KIND_OF_DTYPE = {"float32": NATIVE, "float64": NATIVE, "uint16": BF16, "bfloat16": BF16, "float16": F16,
                  "int8": INT8, "uint8": UINT8}


def kind_of(array):
    """The storage kind of a kernel's array, from its dtype (bfloat16 as uint16 bits)."""
    return _KIND_OF_DTYPE[array.dtype.name]


def kernel_call(storage, spec, step, params, grads, buffers, masters=None, scales=None):
    """``(params, grads, formats)`` for one call of ``spec``'s kernel on stored
    arrays, every kind read off the arrays' dtypes: ``params`` and ``grads``
    (bfloat16 as uint16 bits, float16, float32), ``buffers`` (name -> arrays or
    None), ``masters`` (the float32 master copies of ``params``, or None),
    ``scales`` (name -> the block scales of an int8/uint8 buffer). With masters
    the kernel steps them and writes their rounding into ``params``."""
    params, roles = stored_roles(spec, params, buffers, masters, scales)
    grads = [kernel_view(g) for g in grads]
    if grads and kind_of(grads[0]) != NATIVE:
        roles.append((grads, kind_of(grads[0]), None, None, NATIVE, False, None))
    return params, grads, formats(storage, step, roles)


def stored_roles(spec, params, buffers, masters=None, scales=None):
    """What :func:`kernel_call` makes of every role but the gradients (which an
    optimizer's step checks and gives anew each time): ``(params, roles)``, the
    arrays the kernel's params role takes and the roles for :func:`formats`."""
    roles = []
    if masters is not None:
        roles.append((masters, NATIVE, None, params, kind_of(params[0]), True, 0))
        params = masters
    elif params and kind_of(params[0]) != NATIVE:
        roles.append((params, kind_of(params[0]), None, None, NATIVE, True, 0))
    for stream, buffer in enumerate(spec.buffers, start=1):
        arrays = buffers.get(buffer.name)
        if arrays and kind_of(arrays[0]) != NATIVE:
            roles.append((arrays, kind_of(arrays[0]), (scales or {}).get(buffer.name), None, NATIVE, True, stream))
    return params, roles


def formats(storage, step, roles):
    """The ``formats`` of one kernel call (see ``stored`` in the kernels):
    ``roles`` lists ``(arrays, kind, scales, copies, copy_kind, written, stream)``
    for every role that is not plain float32; the keys of stochastic rounding
    come from ``storage.seed``, ``step`` and each role's ``stream``."""
    out = []
    for arrays, kind, scales, copies, copy_kind, written, stream in roles:
        key = None
        if storage.stochastic and written and kind != NATIVE:
            key = stream_key(storage.seed, step, stream)
        out.append((arrays, kind, scales, copies, copy_kind, written, key))
    return out
