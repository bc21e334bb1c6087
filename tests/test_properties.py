"""Hypothesis property tests for every rule and every optimizer, derived from the
specs (``fastdescent.rules.SPECS``), so a rule added there is covered at once.

* A face and an optimizer step with the kernel equal the reference bit for bit,
  for random shapes (several tensors, empty ones included), both dtypes, special
  values (inf, nan, subnormals, -0.0, the largest finite), any valid
  hyperparameters, step, gradient scale and thread count. "Bit for bit" covers
  every non-NaN value and the positions of the NaNs; where two NaNs meet, the
  payload that survives may differ between the kernel and NumPy.
* Every call that raises, whatever is wrong with it (a hyperparameter, the step,
  a buffer missing, of another dtype or shape, strided, read-only or sharing
  memory with another), leaves every array byte for byte as it was; so does every
  optimizer step that raises, step counts included.

The example counts are bounded for CI (``FASTDESCENT_HYPOTHESIS_EXAMPLES``,
default 30 per test, drawn deterministically; a larger count draws at random).
"""

import contextlib
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastdescent as fd
from fastdescent import _checks, _dispatch
from fastdescent.rules import FACES, SPECS, adafactor, muon, rprop
from fastdescent.rules._spec import FIRST_GRADIENT
from test_rule_inputs import BAD_VALUES, validator

EXAMPLES = int(os.environ.get("FASTDESCENT_HYPOTHESIS_EXAMPLES", "30"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 30,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 1e-310, 1.4e-45, -1e-40,
           3.4028235e38, -3.4028235e38, 1.7976931348623157e308, 1e-30, 65504.0]


def values(dtype):
    """Array elements: mostly ordinary numbers, often a special value."""
    width = 32 if dtype == np.float32 else 64
    ordinary = st.floats(-8.0, 8.0, width=width, allow_subnormal=True)
    return st.one_of(ordinary, ordinary, st.sampled_from(SPECIAL))


@st.composite
def arrays_like(draw, shapes, dtype):
    """One array per entry of ``shapes`` (an int: 1-D; None: no array, None)."""
    out = []
    for shape in shapes:
        if shape is None:
            out.append(None)
            continue
        shape = (shape,) if isinstance(shape, int) else shape
        n = math.prod(shape)
        with np.errstate(over="ignore"):  # float64 specials beyond the float32 range become inf
            out.append(np.array(draw(st.lists(values(dtype), min_size=n, max_size=n)), dtype=dtype).reshape(shape))
    return out


def shapes(spec, largest):
    """Parameter shapes: 1-D up to ``largest`` elements, and for a tensorwise rule
    (Adafactor factors matrices) also matrices, 3-D arrays and scalars; of those,
    the ones of the rule's ``param_ndim`` (Muon: matrices)."""
    vector = st.tuples(st.integers(0, largest))
    if not spec.tensorwise:
        return vector
    by_ndim = {1: vector, 2: st.tuples(st.integers(0, 4), st.integers(0, 5)),
               3: st.tuples(st.integers(1, 2), st.integers(0, 3), st.integers(0, 3)), 0: st.just(())}
    return st.one_of(*(shapes for ndim, shapes in by_ndim.items() if spec.param_ndim in (None, ndim)))


def buffer_shapes(b, param_shapes):
    """The shape of buffer ``b`` for each parameter (None where it keeps none)."""
    return [b.shape_for(shape) for shape in param_shapes]


# ------------------------------------------------------------- hyperparameters
def valid_value(hyper):
    """A strategy of values the hyperparameter's validator accepts."""
    check = validator(hyper)
    small = st.one_of(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 5e-324]), st.floats(0.0, 4.0, allow_subnormal=True))
    unit = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0 - 2**-53]),
                     st.floats(0.0, 1.0, exclude_max=True))
    strategies = {
        _checks.nonnegative: small,
        _checks.positive: st.floats(5e-324, 4.0),
        _checks.finite: st.floats(-4.0, 4.0),
        _checks.unit_interval: unit,
        _checks.closed_unit_interval: st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
        _checks.betas_pair: st.tuples(unit, unit),
        _checks.boolean: st.booleans(),
        _checks.open_unit_interval: st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
        rprop.etas_pair: st.tuples(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
                                   st.floats(1.0, 4.0, exclude_min=True)),
        rprop.step_size_bounds: st.tuples(small, small).map(sorted).map(tuple),
        adafactor._nonpositive: st.one_of(st.sampled_from([0.0, -0.8, -1.0, -math.inf]), st.floats(-4.0, 0.0)),
        adafactor._eps_pair: st.tuples(st.one_of(st.none(), small), small),
        adafactor._clipping_threshold: st.one_of(st.sampled_from([1.0, 1.5, math.inf]), st.floats(1.0, 8.0)),
        muon.coefficient_triple: st.one_of(st.sampled_from([muon.NS_COEFFICIENTS, (3.0, -3.2, 1.2), (1.5, -0.5, 0.0)]),
                                           st.tuples(st.floats(1.0, 4.0), st.floats(-5.0, -1.0), st.floats(0.0, 2.5))),
        muon.ns_steps: st.integers(0, 6),
        muon.adjust_lr_fn: st.sampled_from([None, *muon.ADJUST_LR_FNS]),
    }
    if check is _checks.choice:
        return st.sampled_from(hyper.check.keywords["options"])
    if check is _checks.integer:
        minimum = hyper.check.keywords["minimum"]
        return st.one_of(st.integers(minimum, minimum + 5), st.sampled_from([minimum + 1000]))
    if check not in strategies:
        raise AssertionError(f"add a strategy for {check} ({hyper.name}) to valid_value")
    return strategies[check]


@st.composite
def configurations(draw, spec):
    """Validated face hyperparameters of ``spec`` (options the face takes)."""
    options = {h.name: draw(valid_value(h)) for h in spec.hyper if h.face}
    try:
        spec.validate({**spec.defaults, **options})
    except ValueError:  # a constraint between hyperparameters
        assume(False)
    return options


@st.composite
def face_calls(draw, spec):
    """(arrays by role, face keyword arguments, dtype) for one valid call."""
    options = draw(configurations(spec))
    hyper = spec.validate({**spec.defaults, **options})
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    sizes = draw(st.lists(shapes(spec, 9), min_size=1, max_size=3))
    arrays = {"params": draw(arrays_like(sizes, dtype)), "grads": draw(arrays_like(sizes, dtype))}
    for b in spec.needed(hyper):
        kept = buffer_shapes(b, sizes)
        if any(shape is not None for shape in kept):  # else not given
            arrays[b.face_argument] = draw(arrays_like(kept, dtype))
    call = dict(options)
    if spec.uses_step:
        call["step"] = draw(st.one_of(st.integers(1, 100), st.sampled_from([2**31, 2**62, 2**63 - 1])))
    if spec.may_start_as_gradient:
        starts = any(b.initial(hyper) is FIRST_GRADIENT for b in spec.needed(hyper))
        call["first_step"] = draw(st.booleans()) if starts else False
    call["grad_scale"] = draw(st.one_of(st.just(1.0), st.floats(-4.0, 4.0), st.sampled_from([0.0, -0.0, 5e-324])))
    call["n_threads"] = draw(st.sampled_from([1, 2]))
    return arrays, call, dtype


def call_face(spec, arrays, call, backend):
    args = [arrays.get(b.face_argument) for b in spec.buffers]
    with np.errstate(all="ignore"):
        return FACES[spec.face_name](arrays["params"], arrays["grads"], *args, **call, backend=backend)


def copy_arrays(arrays):
    return {k: [None if a is None else a.copy() for a in v] for k, v in arrays.items()}


def assert_same_bits(a, b, what):
    """Equal bit for bit, except the payloads of NaNs (their positions must match)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    bits = a.view(np.uint32 if a.dtype == np.float32 else np.uint64)
    other = b.view(bits.dtype)
    both_nan = np.isnan(a) & np.isnan(b)
    differ = (bits != other) & ~both_nan
    assert not differ.any(), f"{what}: {a[differ][:3]} != {b[differ][:3]}"


@contextlib.contextmanager
def tiny_parts(on):
    """Let two threads split even tiny updates (when ``on``)."""
    modules = [_dispatch.load_variant(v) for v in _dispatch.supported_variants()]
    previous = [(m.get_min_elements_per_thread(), m.get_min_elements_per_thread(cold=True)) for m in modules]
    if on:
        for m in modules:
            m.set_min_elements_per_thread(1)
    try:
        yield
    finally:
        for m, p in zip(modules, previous):
            m.set_min_elements_per_thread(*p)


# ------------------------------------------------------------------ the faces
@pytest.mark.parametrize("name", list(SPECS))
def test_face_kernel_equals_reference(name):
    spec = SPECS[name]

    @PROPERTY
    @given(face_calls(spec))
    def check(case):
        arrays, call, _ = case
        kernel, reference = copy_arrays(arrays), copy_arrays(arrays)
        with tiny_parts(call["n_threads"] == 2):
            result = call_face(spec, kernel, call, "kernel")
        expected = call_face(spec, reference, call, "reference")
        assert (result is None) == (expected is None)
        for role in arrays:
            for k, (a, b) in enumerate(zip(kernel[role], reference[role])):
                if a is not None:
                    assert_same_bits(a, b, f"{role}[{k}]")
    check()


def faults(spec, arrays, call, draw):
    """One thing wrong with a valid call: (description, arrays, call)."""
    roles = [r for r in arrays if arrays[r] and arrays[r][0] is not None]
    written = [r for r in roles if r != "grads"]
    kinds = ["hyper", "buffer", "alias"] + (["step"] if spec.uses_step else [])
    kind = draw(st.sampled_from(kinds))
    arrays = {k: list(v) for k, v in arrays.items()}
    call = dict(call)
    if kind == "hyper":
        hyper = draw(st.sampled_from([h for h in spec.hyper if h.face]))
        value, _ = draw(st.sampled_from(BAD_VALUES[validator(hyper)]))
        call[hyper.name] = value
        return f"{hyper.name}={value!r}", arrays, call
    if kind == "step":
        call["step"] = draw(st.sampled_from([0, -1, 2.0, True, 2**63, "1"]))
        return f"step={call['step']!r}", arrays, call
    role = draw(st.sampled_from(roles))
    k = draw(st.sampled_from([k for k, a in enumerate(arrays[role]) if a is not None]))
    a = arrays[role][k]
    if kind == "buffer":
        change = draw(st.sampled_from(["dtype", "short", "strided", "read-only", "missing", "not an array"]))
        if change == "dtype":
            bad = a.astype(np.float64 if a.dtype == np.float32 else np.float32)
        elif change == "short":
            bad = np.resize(a, a.size + 1)
        elif change == "strided":
            assume(a.size > 1)
            bad = np.repeat(a, 2)[::2]
        elif change == "read-only":
            assume(role != "grads")
            bad = a.copy()
            bad.flags.writeable = False
        elif change == "missing":
            assume(role not in ("params", "grads"))
            arrays[role] = None
            return f"{role} missing", arrays, call
        else:
            bad = a.tolist()
        arrays[role][k] = bad
        return f"{role}[{k}] {change}", arrays, call
    # alias: a written buffer is (or overlaps) another buffer of the call
    target = draw(st.sampled_from(written))
    j = draw(st.integers(0, len(arrays[target]) - 1))
    assume((target, j) != (role, k) and arrays[target][j] is not None and arrays[target][j].size
           and a.size == arrays[target][j].size)
    arrays[target][j] = a
    return f"{target}[{j}] is {role}[{k}]", arrays, call


@pytest.mark.parametrize("name", list(SPECS))
def test_a_face_call_that_raises_changes_nothing(name):
    spec = SPECS[name]

    @PROPERTY
    @given(face_calls(spec), st.data())
    def check(case, data):
        arrays, call, _ = case
        description, bad_arrays, bad_call = faults(spec, arrays, call, data.draw)
        every = [a for v in bad_arrays.values() if v for a in v if isinstance(a, np.ndarray)]
        before = [a.tobytes() for a in every]
        with pytest.raises((TypeError, ValueError)):
            call_face(spec, bad_arrays, bad_call, data.draw(st.sampled_from(["kernel", "reference"])))
        assert [a.tobytes() for a in every] == before, description
    check()


# -------------------------------------------------------------- the optimizers
@st.composite
def optimizer_runs(draw, spec):
    """(groups, gradients per step, dtype): one or two groups with their own
    hyperparameters, random parameters and special-valued gradients."""
    groups = []
    for _ in range(draw(st.integers(1, 2))):
        options = draw(configurations(spec))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        sizes = draw(st.lists(shapes(spec, 7), min_size=1, max_size=3))
        groups.append({"params": draw(arrays_like(sizes, dtype)), **options})
    steps = draw(st.integers(1, 3))
    grads = [[draw(arrays_like([p.shape], p.dtype))[0] for p in (p for g in groups for p in g["params"])]
             for _ in range(steps)]
    return groups, grads


def build(spec, groups, backend, **options):
    cls = fd.optim.CLASSES[spec.title]
    return cls([{**g, "params": [p.copy() for p in g["params"]]} for g in groups], backend=backend, **options)


def optimizer_bytes(opt):
    out = [p.tobytes() for p in opt.params]
    for i in sorted(opt.state):
        out += [repr(v) if not isinstance(v, np.ndarray) else v.tobytes() for _, v in sorted(opt.state[i].items())]
    return out


@pytest.mark.parametrize("name", list(SPECS))
def test_optimizer_kernel_equals_reference(name):
    spec = SPECS[name]

    @PROPERTY
    @given(optimizer_runs(spec), st.sampled_from([1, 2]), st.booleans())
    def check(run, n_threads, flat):
        groups, grad_steps = run
        kernel = build(spec, groups, "kernel", n_threads=n_threads, flat=flat)
        reference = build(spec, groups, "reference", flat=flat)
        with tiny_parts(n_threads == 2), np.errstate(all="ignore"):
            for grads in grad_steps:
                for opt in (kernel, reference):
                    if flat:
                        for view, g in zip(opt.grads, grads):
                            view[...] = g
                        opt.step()
                    else:
                        opt.step([g.copy() for g in grads])
        for k, (a, b) in enumerate(zip(kernel.params, reference.params)):
            assert_same_bits(a, b, f"params[{k}]")
        assert kernel.state.keys() == reference.state.keys()
        for i in kernel.state:
            for key, value in kernel.state[i].items():
                if isinstance(value, np.ndarray):
                    assert_same_bits(value, reference.state[i][key], f"state[{i}][{key!r}]")
                else:
                    assert value == reference.state[i][key]
    check()


@pytest.mark.parametrize("name", list(SPECS))
def test_an_optimizer_step_that_raises_changes_nothing(name):
    spec = SPECS[name]

    @PROPERTY
    @given(optimizer_runs(spec), st.data())
    def check(run, data):
        groups, grad_steps = run
        opt = build(spec, groups, data.draw(st.sampled_from(["kernel", "reference"])))
        with np.errstate(all="ignore"):
            for grads in grad_steps[:-1]:
                opt.step([g.copy() for g in grads])
        grads = [g.copy() for g in grad_steps[-1]]
        kind = data.draw(st.sampled_from(["hyper", "grad", "alias"]))
        g = data.draw(st.integers(0, len(opt.param_groups) - 1))
        if kind == "hyper":
            hyper = data.draw(st.sampled_from(list(spec.hyper)))
            bad = BAD_VALUES.get(validator(hyper))
            assume(bad)
            opt.param_groups[g][hyper.name] = data.draw(st.sampled_from(bad))[0]
        else:
            k = data.draw(st.integers(0, len(grads) - 1))
            if kind == "grad":
                with np.errstate(over="ignore"):
                    wrong = [None, grads[k].astype(np.float16), np.append(grads[k], 1.0)]
                grads[k] = data.draw(st.sampled_from(wrong))
            else:
                arrays = list(opt.params) + [v for s in opt.state.values() for v in s.values()
                                             if isinstance(v, np.ndarray)]
                same = [a for a in arrays if a.shape == grads[k].shape and a.dtype == grads[k].dtype and a.size]
                assume(same)
                grads[k] = data.draw(st.sampled_from(same))
        before = optimizer_bytes(opt)
        with pytest.raises((TypeError, ValueError)), np.errstate(all="ignore"):
            opt.step(grads)
        assert optimizer_bytes(opt) == before
    check()
