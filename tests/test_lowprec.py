"""Low-precision storage (issue 16): the formats of fastdescent.precision, the
kernel's stored pass against its NumPy twin bit for bit over every rule's examples
(derived from rule_cases, so new rules join), stochastic rounding's independence
of threads and splits, and its bias."""

import ml_dtypes
import numpy as np
import pytest

from fastdescent import _config, precision
from fastdescent.precision import BF16, BLOCK, INT8, NATIVE, UINT8
from fastdescent.rules._spec import FIRST_GRADIENT
from rule_cases import EXAMPLES, RICHEST, make_state
from support import assert_bitwise_equal, random_array

BF = np.dtype(ml_dtypes.bfloat16)
KINDS = {"bfloat16": BF16, "int8": INT8}


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def assert_same(a, b, name=""):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    mismatch = np.flatnonzero(bits(a) != bits(b))
    assert not mismatch.size, f"{name}: {mismatch.size} bytes differ, first at byte {mismatch[0]}"


# ------------------------------------------------------------------ formats
def special_values(rng, n):
    """float32 values of every kind: normal over many decades, subnormal, zeros,
    ties, the largest finite, infinities and NaN."""
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-40, 40, n))).astype(np.float32)
    extra = np.array([0.0, -0.0, 1.0, -1.0, 1e-40, -3e-42, 3.4028235e38, -3.4028235e38, np.inf, -np.inf, np.nan,
                      1.00390625, 1.01171875, 65504.0, 2.0**-126], np.float32)
    return np.concatenate([x, extra, (x[:100] * 2.0**-130).astype(np.float32)])


def test_bfloat16_nearest_is_ml_dtypes_conversion(rng):
    x = special_values(rng, 100_000)
    ours = precision.bf16_encode(x).view(BF)
    theirs = x.astype(BF)
    finite = ~np.isnan(x)
    assert_same(ours[finite], theirs[finite])
    assert np.isnan(precision.bf16_decode(ours[~finite])).all()
    assert_same(precision.bf16_decode(theirs), theirs.astype(np.float32))  # decoding is exact


def test_stochastic_bfloat16_rounds_to_a_neighbour_with_the_right_probability(rng):
    x = special_values(rng, 20_000)
    x = x[np.isfinite(x) & (np.abs(x) < 3e38)]
    down = precision.bf16_decode(precision.bf16_encode(x, np.zeros(x.size, np.uint32)))  # truncation
    up = precision.bf16_decode(precision.bf16_encode(x, np.full(x.size, 0xFFFF, np.uint32)))
    assert np.all((np.abs(down) <= np.abs(x)) & (np.abs(x) <= np.abs(up)))
    draws = [precision.bf16_decode(precision.bf16_encode(x, precision.random_bits(precision.stream_key(5, s, 1), 0,
                                                                                   x.size))) for s in range(64)]
    assert all(np.all((d == down) | (d == up)) for d in draws)


@pytest.mark.parametrize("code", [precision.SIGNED_CODE, precision.UNSIGNED_CODE], ids=["int8", "uint8"])
def test_int8_codes(code, rng):
    x = special_values(rng, 50_000)
    if not code.signed:
        x = np.abs(x)
    codes, scales = precision.int8_encode(x, code)
    tie = np.array([1.0, 0.53125], np.float32)  # halfway between the codes of 0.5 and 0.5625
    assert precision.int8_decode(*precision.int8_encode(tie, code), code)[1] == 0.5625  # ties away from zero
    assert codes.dtype == code.dtype and scales.shape == (precision.n_blocks(x.size),)
    y = precision.int8_decode(codes, scales, code)
    finite = np.isfinite(x)
    blocks = precision._blocks(np.where(finite, np.abs(x), 0).astype(np.float32))
    assert_same(scales, blocks.max(axis=1).astype(np.float32))  # the scale is the block's largest magnitude
    assert np.isnan(y[~finite]).all() and np.isfinite(y[finite]).all()
    scale = np.repeat(scales, precision.BLOCK)[: x.size]
    normal = finite & (np.abs(x) >= scale * code.smallest)
    relative = np.abs(y[normal] - x[normal]) / np.abs(x[normal])
    assert relative.max() <= 2.0**-4 * (1 + 1e-6), relative.max()
    tiny = finite & ~normal
    assert np.all(np.abs(y[tiny] - x[tiny]) <= scale[tiny] * code.smallest * 2.0**-code.mantissa)
    assert_same(np.signbit(y[finite & (x != 0)]), np.signbit(x[finite & (x != 0)]))
    if not code.signed:  # the code of a non-negative buffer holds |x|
        negative, _ = precision.int8_encode(np.array([-1.0, -0.0, 1.0, -np.nan], np.float32), code)
        assert negative[0] == negative[2] and negative[1] == 0 and negative[3] == code.nan
    zeros, zero_scales = precision.int8_encode(np.zeros(300, np.float32), code)
    assert not zeros.any() and not zero_scales.any()


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "uint8"])
def test_stochastic_rounding_is_unbiased_where_nearest_drifts(kind, rng):
    """The mean rounding error of one value over 10**6 draws is near zero;
    round to nearest makes the same error every time."""
    n = 1_000_000
    value = np.float32(1.0 + 2.0**-10)  # a quarter of the way from 1 (bfloat16) / inside a code step
    x = np.full(n, value, np.float32)
    if kind != "bfloat16":
        x[:: precision.BLOCK] = 3.0  # every block's scale is 3: value sits between two codes
    random = precision.random_bits(precision.stream_key(11, 1, 1), 0, n)
    if kind == "bfloat16":
        nearest = precision.bf16_decode(precision.bf16_encode(x))
        stochastic = precision.bf16_decode(precision.bf16_encode(x, random))
        step = 2.0**-7
    else:
        code = precision.SIGNED_CODE if kind == "int8" else precision.UNSIGNED_CODE
        nearest = precision.int8_decode(*precision.int8_encode(x, code), code)
        stochastic = precision.int8_decode(*precision.int8_encode(x, code, random), code)
        step = 3.0 * 2.0**-5  # a code step in [0.25, 0.5) of the scale
    draws = x == value
    bias_nearest = float(np.mean(nearest[draws].astype(np.float64) - value))
    bias_stochastic = float(np.mean(stochastic[draws].astype(np.float64) - value))
    spread = step / np.sqrt(draws.sum())  # standard error of the mean is below this
    assert abs(bias_nearest) > 20 * spread
    assert abs(bias_stochastic) < 5 * spread, (bias_stochastic, spread)


def test_random_bits_are_the_documented_hash():
    key = precision.stream_key(1234, 7, 2)
    start = 2**32 - 3  # crosses a high-word boundary
    expected = []
    for i in range(start, start + 6):
        mixed = int(precision.lowbias32(np.uint32((i >> 32) ^ (key >> 32)))) ^ (key & 0xFFFFFFFF)
        expected.append(int(precision.lowbias32(np.uint32((i & 0xFFFFFFFF) ^ mixed))))
    assert precision.random_bits(key, start, 6).tolist() == expected
    x = 1  # lowbias32 by hand, in Python integers
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    assert int(precision.lowbias32(np.uint32(1))) == x and int(precision.lowbias32(np.uint32(0))) == 0


# ------------------------------------------------------------------ kernel == reference
def stored_buffers(rule, state, kind_name):
    """The rule's state (float32, from make_state) converted to ``kind_name``:
    name -> (stored arrays as the kernel takes them, scales or None, kind)."""
    out = {}
    for buffer in rule.spec.needed(rule.hyper):
        kind = KINDS[kind_name]
        if kind == INT8 and buffer.nonnegative:
            kind = UINT8
        values = state[buffer.name]
        if kind == BF16:
            out[buffer.name] = ([precision.bf16_encode(v) for v in values], None, kind)
        else:
            encoded = [precision.int8_encode(v, precision.code_of(kind)) for v in values]
            out[buffer.name] = ([c for c, _ in encoded], [s for _, s in encoded], kind)
    return out


def stored_step(rule, backend, params, grads, stored, step, lr, rounding, n_threads, ids):
    spec, h = rule.spec, dict(rule.hyper, lr=lr)
    fresh = frozenset(b.name for b in spec.needed(h) if step == 1 and b.initial(h) is FIRST_GRADIENT)
    buffers = {b.name: stored[b.name][0] if b.name in stored else None for b in spec.buffers}
    roles = [(stored[b.name][0], stored[b.name][2], stored[b.name][1], None, NATIVE, True, k)
             for k, b in enumerate(spec.buffers, start=1) if b.name in stored]
    storage = precision.Storage.of(rounding=rounding, seed=42 if rounding == "stochastic" else None)
    spec.run(backend, params, grads, buffers, h, step=step, grad_scale=1.0, fresh=fresh,
             scalar_state={s.name: s.initial_value(h) for s in spec.scalar_state} if spec.scalar_state else None,
             n_threads=n_threads, formats=precision.formats(storage, step, roles), tensor_ids=ids)


def storable(rule, kind_name):
    try:
        precision.Storage.of(kind_name).check(rule.spec, rule.hyper, np.float32)
    except ValueError:
        return False
    return bool(rule.spec.needed(rule.hyper))


GRID = [(name, kind, rounding) for name, rule in EXAMPLES.items() for kind in KINDS
        for rounding in precision.ROUNDINGS if storable(rule, kind)]
#: Tensor sizes of one call: empty, one element, part of a block, several chunks
#: and blocks with a ragged end, and enough for two threads.
STORED_SIZES = (0, 1, 300, 5_000, 100_003)
STEPS = 3


@pytest.mark.parametrize("name,kind,rounding", GRID)
def test_stored_kernel_matches_reference(name, kind, rounding, rng, kernel_variant):
    """Every example of every rule, with its state stored in bfloat16 or int8 and
    rounded either way: the kernel (1 and 2 threads) and the NumPy twin agree bit
    for bit on every array after every step."""
    rule = EXAMPLES[name]
    state = {n: make_state(rng, rule, n, np.float32) for n in STORED_SIZES}
    params = [state[n]["param"] for n in STORED_SIZES]
    merged = {b.name: [state[n][b.name] for n in STORED_SIZES] for b in rule.spec.needed(rule.hyper)}
    grads = [[random_array(rng, n, np.float32) for n in STORED_SIZES] for _ in range(STEPS)]
    ids = [3, 0, 17, 2**40 + 5, 9]
    runs = {}
    for backend, n_threads in (("reference", 1), ("kernel", 1), ("kernel", 2)):
        p = [a.copy() for a in params]
        stored = stored_buffers(rule, merged, kind)
        for t in range(STEPS):
            stored_step(rule, _config.resolve_backend(backend), p, grads[t], stored, t + 1, 0.05 * 0.8**t, rounding,
                        n_threads, ids)
        runs[backend, n_threads] = (p, stored)
    assert not np.array_equal(runs["reference", 1][0][-1], params[-1]), "the steps left the parameters unchanged"
    assert_runs_agree(runs)


def assert_runs_agree(runs):
    """Every run (key -> (params, stored buffers)) bit for bit as the reference's."""
    expected = runs["reference", 1]
    for key, (p, stored) in runs.items():
        for k, (a, b) in enumerate(zip(p, expected[0])):
            assert_bitwise_equal(a, b, f"{key} param[{k}]")
        for buffer_name, (arrays, scales, _) in stored.items():
            for k, (a, b) in enumerate(zip(arrays, expected[1][buffer_name][0])):
                assert_same(a, b, f"{key} {buffer_name}[{k}]")
            for k, (a, b) in enumerate(zip(scales or (), expected[1][buffer_name][1] or ())):
                assert_same(a, b, f"{key} {buffer_name} scales[{k}]")


def richest_storable(spec, kind):
    """The example of ``spec`` with the most buffers that may be kept in ``kind`` (or None)."""
    examples = [EXAMPLES[e.name] for e in spec.examples if storable(EXAMPLES[e.name], kind)]
    return max(examples, key=lambda rule: len(rule.state)) if examples else None


SPLIT_GRID = [(rule.name, kind) for name in RICHEST for kind in KINDS
              if (rule := richest_storable(RICHEST[name].spec, kind)) is not None]


@pytest.mark.parametrize("name,kind", SPLIT_GRID)
def test_stochastic_rounding_ignores_the_thread_split(name, kind, rng, tiny_parts):
    """Threads splitting even tiny updates at arbitrary block boundaries, and the
    same tensors stepped one call each: the same bits (keys are per parameter)."""
    rule = EXAMPLES[name]
    sizes = [0, 1, 257, 7, 4097, 3000, 1]
    state = [make_state(rng, rule, n, np.float32) for n in sizes]
    grads = [random_array(rng, n, np.float32) for n in sizes]
    kernels = _config.resolve_backend("kernel")
    together_p = [s["param"].copy() for s in state]
    together = stored_buffers(rule, {b: [s[b] for s in state] for b in state[0] if b != "param"}, kind)
    stored_step(rule, kernels, together_p, grads, together, 1, 0.1, "stochastic", 2, list(range(len(sizes))))
    for k, s in enumerate(state):
        p = [s["param"].copy()]
        alone = stored_buffers(rule, {b: [s[b]] for b in s if b != "param"}, kind)
        stored_step(rule, kernels, p, [grads[k]], alone, 1, 0.1, "stochastic", 1, [k])
        assert_bitwise_equal(p[0], together_p[k], f"param[{k}]")
        for b, (arrays, scales, _) in alone.items():
            assert_same(arrays[0], together[b][0][k], b)
            if scales:
                assert_same(scales[0], together[b][1][k], b)


def special_moments(rng, n, nonnegative):
    """Moments whose blocks hold what the codecs special-case: values over 60
    binades (int8 subnormal codes, values that encode to zero, signed zeros), a
    block of subnormal float32s, huge values (2**bias * scale overflows), NaN
    and infinities."""
    x = (rng.standard_normal(n) * np.exp2(rng.uniform(-60, 0, n))).astype(np.float32)
    x[:256] *= np.float32(2.0**-120)              # a block of float32 subnormals and tiny normals
    x[256:512] *= np.float32(2.0**120)            # a block whose scale overflows 2**bias * scale
    x[512:768:7] = -0.0
    x[768:1024:5] = 0.0
    x[1024:1280] = np.float32(1e-30)               # a block whose largest value is tiny
    x[1300] = np.nan
    x[1600] = np.inf
    x[1900] = -np.inf
    return np.abs(x) if nonnegative else x


@pytest.mark.parametrize("name", ["adam", "adam-decoupled", "adam_amsgrad", "rmsprop"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("rounding", precision.ROUNDINGS)
def test_stored_codecs_on_special_values(name, kind, rounding, rng, kernel_variant):
    """The decoders and encoders of the stored pass (Adam's fused loops; AMSGrad and
    RMSprop take the three-phase blocks) against the reference on moments of every
    kind of value, gradients over many binades: bit for bit, 1 and 2 threads."""
    rule = EXAMPLES[name]
    n = 2 * 2048 + 300
    buffers = rule.spec.needed(rule.hyper)
    values = {b.name: special_moments(rng, n, b.nonnegative) for b in buffers}
    param = random_array(rng, n, np.float32)
    grads = [(rng.standard_normal(n) * np.exp2(rng.uniform(-50, 10, n))).astype(np.float32) for _ in range(2)]
    for g in grads:   # NaNs whose payloads a rounding's addition would carry into the exponent or sign
        g[2000:2004].view(np.uint32)[:] = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF, 0x7FC0C000]
    noise = rng.integers(0, 256, BLOCK, dtype=np.uint8)   # every code, even those no encoder writes
    runs = {}
    for backend, n_threads in (("reference", 1), ("kernel", 1), ("kernel", 2)):
        p = [param.copy()]
        stored = stored_buffers(rule, {k: [v] for k, v in values.items()}, kind)
        for arrays, _, stored_kind in stored.values():
            if stored_kind != BF16:
                arrays[0].view(np.uint8)[6 * BLOCK:7 * BLOCK] = noise
        for t, g in enumerate(grads):
            with np.errstate(all="ignore"):
                stored_step(rule, _config.resolve_backend(backend), p, [g], stored, t + 1, 0.01, rounding,
                            n_threads, [7])
        runs[backend, n_threads] = (p, stored)
    expected = runs["reference", 1]
    for key, (p, stored) in runs.items():
        assert_bitwise_equal(p[0], expected[0][0], f"{key} param")
        for buffer_name, (arrays, scales, _) in stored.items():
            assert_same(arrays[0], expected[1][buffer_name][0][0], f"{key} {buffer_name}")
            if scales:
                assert_same(scales[0], expected[1][buffer_name][1][0], f"{key} {buffer_name} scales")


@pytest.mark.parametrize("name", ["adam", "adam-decoupled"])
@pytest.mark.parametrize("rounding", precision.ROUNDINGS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_large_stored_calls_match_the_reference(name, rounding, kind, rng):
    """Calls of at least 2**22 elements take the fused loops' prefetching paths
    (FD_PREFETCH_MIN in _storage.pxi): two tensors of which the second ends in a
    ragged strip (and block), bit for bit, 1 and 2 threads."""
    rule = EXAMPLES[name]
    sizes = (1 << 21, (1 << 21) + 300)
    state = {n: make_state(rng, rule, n, np.float32) for n in sizes}
    params = [state[n]["param"] for n in sizes]
    merged = {b.name: [state[n][b.name] for n in sizes] for b in rule.spec.needed(rule.hyper)}
    grads = [random_array(rng, n, np.float32) for n in sizes]
    runs = {}
    for backend, n_threads in (("reference", 1), ("kernel", 1), ("kernel", 2)):
        p = [a.copy() for a in params]
        stored = stored_buffers(rule, merged, kind)
        stored_step(rule, _config.resolve_backend(backend), p, grads, stored, 2, 0.05, rounding, n_threads, [1, 4])
        runs[backend, n_threads] = (p, stored)
    assert_runs_agree(runs)


def test_a_fused_loop_takes_only_the_codes_it_decodes(rng, kernel_variant):
    """Adam's fused int8 loop decodes exp_avg as int8 and exp_avg_sq as uint8; a
    call handing other codes (here both uint8, from positive first moments) runs
    the three phases, and matches the reference."""
    rule = EXAMPLES["adam"]
    n = 3000
    values = {b.name: np.abs(random_array(rng, n, np.float32, scale=0.1)) for b in rule.spec.needed(rule.hyper)}
    param, grad = random_array(rng, n, np.float32), random_array(rng, n, np.float32)
    runs = []
    for backend in ("reference", "kernel"):
        p = [param.copy()]
        stored = {}
        for name, v in values.items():
            codes, scales = precision.int8_encode(v, precision.UNSIGNED_CODE)
            stored[name] = ([codes], [scales], UINT8)
        stored_step(rule, _config.resolve_backend(backend), p, [grad], stored, 1, 0.01, "nearest", 1, [0])
        runs.append((p, stored))
    assert_bitwise_equal(runs[1][0][0], runs[0][0][0], "param")
    for name in values:
        assert_same(runs[1][1][name][0][0], runs[0][1][name][0][0], name)
        assert_same(runs[1][1][name][1][0], runs[0][1][name][1][0], f"{name} scales")
