"""Low-precision storage in the optimizer objects (issue 16): every rule's optimizer
with bfloat16/int8 state and bfloat16/float16 parameters (master weights or not),
kernel against reference; what master weights and stochastic rounding do; state
memory; checkpoints, conversions; bad combinations refused before any write."""

import warnings

import ml_dtypes
import numpy as np
import pytest

import fastdescent as fd
from fastdescent import _runtime, precision
from fastdescent.optim import optimizer_class
from fastdescent.rules import SPECS
from fastdescent.rules._spec import Buffer
from rule_cases import EXAMPLES
from support import step_optimizer
from test_lowprec import assert_same, richest_storable

BF = np.dtype(ml_dtypes.bfloat16)

#: (parameter dtype, grad dtype, options) of the modes every rule runs in.
MODES = {
    "f32-bf16state-stochastic": (np.float32, np.float32, dict(state_dtype="bfloat16", rounding="stochastic", seed=7)),
    "f32-int8state": (np.float32, np.float32, dict(state_dtype="int8")),
    "bf16-master-bf16grads": (BF, BF, dict(master_weights=True)),
    "bf16-master-int8state-stochastic": (BF, np.float32, dict(master_weights=True, state_dtype="int8",
                                                              rounding="stochastic", seed=3)),
    "bf16-direct": (BF, BF, dict(rounding="nearest")),
    "bf16-direct-stochastic-int8state": (BF, BF, dict(rounding="stochastic", seed=5, state_dtype="int8")),
    "f16-master": (np.float16, np.float16, dict(master_weights=True)),
}
SHAPES = [(33, 20), (700,), (), (3, 0)]


def fd_class(rule):
    return getattr(fd, rule.spec.title)


def options_of(rule):
    return {k: v for k, v in rule.options.items()}


def arrays(rng, dtype, shapes=SHAPES):
    return [rng.standard_normal(shape).astype(np.float32).astype(dtype) for shape in shapes]


def state_arrays(opt):
    return [(i, k, opt.state[i][k]) for i in sorted(opt.state) for k in sorted(opt.state[i])
            if isinstance(opt.state[i][k], np.ndarray)]


def run(rule, mode, backend, steps=4, flat=False, seed=0):
    param_dtype, grad_dtype, options = MODES[mode]
    rng = np.random.default_rng(seed)
    params = arrays(rng, param_dtype)
    grads = [arrays(rng, grad_dtype) for _ in range(steps)]
    opt = fd_class(rule)(params, **options_of(rule), **options, backend=backend, flat=flat)
    if flat:
        params = opt.params
    for t in range(steps):
        opt.param_groups[0]["lr"] = 0.05 * 0.8**t
        if flat:
            for g, value in zip(opt.grads, grads[t]):
                g[...] = value
            opt.step()
        else:
            opt.step(grads[t])
    return params, opt


def mode_grid():
    out = []
    for spec in SPECS.values():
        for mode, (_, _, options) in MODES.items():
            kind = options.get("state_dtype", "bfloat16")
            rule = richest_storable(spec, kind)
            if rule is not None and spec.runner is None:
                out.append((rule.name, mode))
    return out


@pytest.mark.parametrize("name,mode", mode_grid())
def test_optimizer_kernel_matches_reference(name, mode):
    rule = EXAMPLES[name]
    kernel_params, kernel = run(rule, mode, "kernel")
    reference_params, reference = run(rule, mode, "reference")
    for a, b in zip(kernel_params, reference_params):
        assert_same(a, b, "param")
    assert [(i, k) for i, k, _ in state_arrays(kernel)] == [(i, k) for i, k, _ in state_arrays(reference)]
    for (i, k, a), (_, _, b) in zip(state_arrays(kernel), state_arrays(reference)):
        assert_same(a, b, f"state[{i}][{k!r}]")
    param_dtype = MODES[mode][0]
    assert all(p.dtype == param_dtype for p in kernel_params)
    if MODES[mode][2].get("master_weights"):
        for i, p in enumerate(kernel_params):
            master = kernel.state[i]["master_param"]
            assert master.dtype == np.float32
            assert_same(p, master.astype(param_dtype), "the parameter is its master rounded to nearest")


@pytest.mark.parametrize("mode", ["bf16-master-bf16grads", "bf16-direct", "f32-bf16state-stochastic"])
def test_flat_arena_equals_separate_arrays(mode):
    """Without int8 blocks and random keys along the arena, flat and per-array
    layouts give the same bits."""
    rule = EXAMPLES["adam"]
    if MODES[mode][2].get("rounding") == "stochastic":
        flat_params, flat = run(rule, mode, "kernel", flat=True)
        reference_params, _ = run(rule, mode, "reference", flat=True)
        for a, b in zip(flat_params, reference_params):
            assert_same(a, b)
        return
    flat_params, flat = run(rule, mode, "kernel", flat=True)
    params, separate = run(rule, mode, "kernel")
    for a, b in zip(flat_params, params):
        assert_same(a, b)
    for (_, _, a), (_, _, b) in zip(state_arrays(flat), state_arrays(separate)):
        assert_same(a, b)


def test_master_weights_and_stochastic_rounding_on_tiny_updates():
    """SGD, lr * grad a quarter of a bfloat16 spacing at 1.0: round to nearest
    never moves a bfloat16 parameter, a master copy moves exactly as float32, and
    stochastic rounding moves the parameter by the right amount on average."""
    n, steps, lr = 100_000, 100, 2.0**-10
    start = np.ones(n, np.float32)

    def train(dtype, **options):
        p = start.astype(dtype)
        opt = fd.SGD([p], lr=lr, **options)
        g = np.full(n, -1.0, np.float32)
        for _ in range(steps):
            opt.step([g])
        return p.astype(np.float64), opt

    exact, _ = train(np.float32)
    nearest, _ = train(BF, rounding="nearest")
    master, opt = train(BF, master_weights=True)
    stochastic, sgd = train(BF, rounding="stochastic", seed=1)
    assert np.all(nearest == 1.0), "round to nearest stalls"
    assert_same(opt.state[0]["master_param"], exact.astype(np.float32))
    assert_same(master.astype(np.float32).astype(BF), exact.astype(np.float32).astype(BF))
    # each element is a random walk of `steps` roundings, each off by at most a spacing
    standard_error = np.sqrt(steps * 0.25) * 2.0**-7 / np.sqrt(n)
    assert abs(stochastic.mean() - exact.mean()) < 5 * standard_error
    assert stochastic.mean() > 1.0 + 0.9 * steps * lr
    assert sgd.state[0]["step"] == steps  # stochastic rounding counts steps, for its keys


@pytest.mark.parametrize("state_dtype,expected", [(None, 8.0), ("bfloat16", 4.0), ("int8", 2.0 + 8.0 / 256)])
def test_adam_state_memory_per_parameter(state_dtype, expected):
    p = np.zeros(256 * 1000, np.float32)
    opt = fd.Adam([p], state_dtype=state_dtype)
    opt.step([np.ones_like(p)])
    state_bytes = sum(v.nbytes for _, _, v in state_arrays(opt))
    assert state_bytes / p.size == pytest.approx(expected)


# ------------------------------------------------------------------ checkpoints
CHECKPOINT_MODES = ["f32-bf16state-stochastic", "f32-int8state", "bf16-master-int8state-stochastic", "bf16-direct"]


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_checkpoint_resumes_bit_for_bit(mode, tmp_path):
    rule = EXAMPLES["adam"]
    param_dtype, grad_dtype, options = MODES[mode]
    rng = np.random.default_rng(1)
    start = arrays(rng, param_dtype)
    grads = [arrays(rng, grad_dtype) for _ in range(6)]

    def make(params):
        return fd.Adam(params, lr=0.01, **options)

    straight = [p.copy() for p in start]
    opt = make(straight)
    for g in grads:
        opt.step(g)
    resumed = [p.copy() for p in start]
    first = make(resumed)
    for g in grads[:3]:
        first.step(g)
    first.save(tmp_path / "ckpt.npz")
    fresh = [np.zeros_like(p) for p in start]
    second = make(fresh)
    second.load(tmp_path / "ckpt.npz")
    for g in grads[3:]:
        second.step(g)
    for a, b in zip(fresh, straight):
        assert_same(a, b)
    for (_, _, a), (_, _, b) in zip(state_arrays(second), state_arrays(opt)):
        assert_same(a, b)
    saved = second.state_dict().get("storage", precision.Storage().as_dict())  # absent: the defaults
    assert saved == precision.Storage.of(**options).as_dict()


def test_loading_other_storage_needs_convert_and_says_what_it_did():
    rng = np.random.default_rng(2)
    params = arrays(rng, np.float32, [(40, 30), (9,)])
    grad = arrays(rng, np.float32, [(40, 30), (9,)])
    source = fd.Adam([p.copy() for p in params], state_dtype="bfloat16")
    source.step(grad)
    sd = source.state_dict()
    target_params = [p.copy() for p in params]
    target = fd.Adam(target_params)
    before = target.state_dict()
    with pytest.raises(ValueError, match="convert=True"):
        target.load_state_dict(sd)
    assert target.state_dict().keys() == before.keys() and not target.state
    with pytest.warns(precision.StateConversion, match="'exp_avg' bfloat16 -> float32"):
        target.load_state_dict(sd, convert=True)
    for name in ("exp_avg", "exp_avg_sq"):
        assert_same(target.state[0][name], sd["state"][0][name].astype(np.float32))  # exact widening
    int8 = fd.Adam([p.copy() for p in params], state_dtype="int8")
    with pytest.warns(precision.StateConversion, match="'exp_avg_sq' bfloat16 -> uint8"):
        int8.load_state_dict(sd, convert=True)
    codes, scales = precision.int8_encode(sd["state"][0]["exp_avg_sq"].astype(np.float32), precision.UNSIGNED_CODE)
    assert_same(int8.state[0]["exp_avg_sq"], codes)
    assert_same(int8.state[0]["exp_avg_sq_scales"], scales)
    other_seed = fd.Adam([p.copy() for p in params], state_dtype="bfloat16", rounding="stochastic", seed=9)
    with pytest.raises(ValueError, match="rounding='nearest'"):
        other_seed.load_state_dict(sd)


def test_master_copies_are_made_from_the_parameters_when_converting():
    rng = np.random.default_rng(3)
    params = arrays(rng, BF, [(10, 10)])
    plain = fd.Adam([p.copy() for p in params], rounding="nearest")
    plain.step(arrays(rng, BF, [(10, 10)]))
    mastered_params = [p.copy() for p in params]
    mastered = fd.Adam(mastered_params, master_weights=True)
    with pytest.warns(precision.StateConversion, match="master copies made"):
        mastered.load_state_dict(plain.state_dict(), convert=True)
    assert_same(mastered.state[0]["master_param"], mastered_params[0].astype(np.float32))


def test_corrupt_stored_state_is_refused():
    p = np.zeros(600, np.float32)
    opt = fd.Adam([p], state_dtype="int8")
    opt.step([np.ones_like(p)])
    sd = opt.state_dict()
    bad = {**sd, "state": {0: {**sd["state"][0], "exp_avg_scales": np.zeros(2, np.float32)}}}
    with pytest.raises(ValueError, match="one scale per block"):
        opt.load_state_dict(bad)
    bad = {**sd, "state": {0: {k: v for k, v in sd["state"][0].items() if k != "exp_avg_sq_scales"}}}
    with pytest.raises(ValueError, match="exp_avg_sq_scales"):
        opt.load_state_dict(bad)
    bad = {**sd, "state": {0: {**sd["state"][0], "exp_avg": sd["state"][0]["exp_avg"].astype(np.float32)}}}
    with pytest.raises(TypeError, match="expected int8"):
        opt.load_state_dict(bad)


# ------------------------------------------------------------------ bad input
def test_bad_combinations_are_refused_before_anything_changes():
    f32 = [np.ones(10, np.float32)]
    with pytest.raises(ValueError, match="their own master"):
        fd.Adam(f32, master_weights=True)
    with pytest.raises(ValueError, match="needs a seed"):
        fd.Adam(f32, state_dtype="bfloat16", rounding="stochastic")
    with pytest.raises(ValueError, match="nothing to round"):
        fd.Adam(f32, rounding="stochastic", seed=1)
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        fd.Adam(f32, state_dtype="float16")
    with pytest.raises(ValueError, match="rounding must be one of"):
        fd.Adam(f32, state_dtype="bfloat16", rounding="up")
    with pytest.raises(TypeError, match="seed must be an int"):
        fd.Adam(f32, state_dtype="bfloat16", rounding="stochastic", seed=1.5)
    with pytest.raises(ValueError, match="float64 parameters"):
        fd.Adam([np.ones(10)], state_dtype="bfloat16")
    with pytest.raises(ValueError, match="flat=True"):
        fd.Adam(f32, state_dtype="int8", flat=True)
    with pytest.raises(ValueError, match="centered RMSprop"):
        fd.RMSprop(f32, centered=True, state_dtype="bfloat16")
    with pytest.raises(ValueError, match="stochastic rounding into float16"):
        fd.Adam([np.ones(4, np.float16)], rounding="stochastic", seed=1)
    with pytest.raises(TypeError, match="master_weights=True.*or choose how each update is rounded"):
        fd.Adam([np.ones(4, BF)])


def test_a_buffer_that_may_not_be_compressed_refuses_int8():
    spec = SPECS["adam"].variant(name="adam_bf16_only", buffers=(
        Buffer("exp_avg", storage=("bfloat16",)), *SPECS["adam"].buffers[1:]))
    cls = optimizer_class(spec, __name__)
    with pytest.raises(ValueError, match="'exp_avg' may only be kept in 'bfloat16'"):
        cls([np.ones(10, np.float32)], state_dtype="int8")
    cls([np.ones(10, np.float32)], state_dtype="bfloat16")  # allowed
    multi = SPECS["adam"].variant(name="adam_two_kernels", runner=lambda *args: None)
    with pytest.raises(ValueError, match="more than one elementwise kernel"):
        optimizer_class(multi, __name__)([np.ones(10, np.float32)], state_dtype="bfloat16")


def test_a_bad_step_writes_nothing():
    p = np.ones((4, 5), BF)
    opt = fd.RMSprop([p], lr=0.1, state_dtype="int8", rounding="nearest")
    opt.step([np.ones((4, 5), BF)])
    before = p.copy()
    state = {k: v.copy() for k, v in opt.state[0].items() if isinstance(v, np.ndarray)}
    with pytest.raises(TypeError, match="gradients are bfloat16 or float32"):
        opt.step([np.ones((4, 5), np.float64)])
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones(20, BF)])
    opt.param_groups[0]["centered"] = True  # a schedule switching an option mid-run
    with pytest.raises(ValueError, match="centered RMSprop"):
        opt.step([np.ones((4, 5), BF)])
    assert_same(p, before)
    for k, v in state.items():
        assert_same(opt.state[0][k], v, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.param_groups[0]["centered"] = False
        opt.step([np.ones((4, 5), BF)])


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("mode", ["f32-int8state", "bf16-master-int8state-stochastic", "bf16-direct"])
def test_a_gradient_sharing_memory_with_any_written_array_is_refused(mode, steps):
    """The cross-tensor aliasing check of the step path covers low-precision buckets:
    a gradient viewing a parameter, a state buffer, an int8 block scale or a
    master copy is refused before anything is written, on the general path (after
    the step that created the state) and on the plan's."""
    param_dtype, grad_dtype, options = MODES[mode]
    rng = np.random.default_rng(4)
    params = arrays(rng, param_dtype, [(300,), (1,)])
    opt = fd.Adam(params, lr=0.01, **options)
    grads = arrays(rng, grad_dtype, [(300,), (1,)])
    for _ in range(steps):
        opt.step(grads)
    assert (opt._plan is not None) == (steps > 1)
    before = [(i, k, v.copy()) for i, k, v in state_arrays(opt)], [p.copy() for p in params]
    written = [(i, k, v) for i, k, v in state_arrays(opt)] + [(i, "param", p) for i, p in enumerate(params)]
    assert {"exp_avg", "param"} <= {k for _, k, _ in written}
    size = np.dtype(grad_dtype).itemsize
    if "int8" in mode:
        assert any(k == "exp_avg_scales" for _, k, _ in written)
    for i, key, array in [w for w in written if w[2].nbytes >= size]:  # (not the one-byte int8 codes)
        alias = array.reshape(-1).view(np.uint8)[:size].view(grad_dtype)  # as grads[1]
        with pytest.raises(ValueError, match="shares memory"):
            opt.step([grads[0], alias])
    for (i, k, a), (_, _, b) in zip(state_arrays(opt), before[0]):
        assert_same(a, b, f"{i} {k}")
    for a, b in zip(params, before[1]):
        assert_same(a, b)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_plan_steps_equal_general_steps(mode, flat):
    """Low-precision buckets take the cached C step plan, as float ones do, and it
    gives the general path's bits: one optimizer keeps its plan, the other is
    sent the general way at every step (its plan dropped)."""
    param_dtype, grad_dtype, options = MODES[mode]
    if flat and "int8" in mode:
        pytest.skip("int8 blocks are per parameter: no flat arena")
    rng = np.random.default_rng(5)
    shapes = [(50,), (3, 7), (0,)]
    params = arrays(rng, param_dtype, shapes)
    grad_steps = [arrays(rng, grad_dtype, shapes) for _ in range(4)]
    steady, general = (fd.Adam([p.copy() for p in params], lr=0.01, **options, flat=flat) for _ in range(2))
    for t, grads in enumerate(grad_steps):
        general._plan = None
        for opt in (steady, general):
            step_optimizer(opt, grads)
        assert steady._plan is not None or t == 0  # (the first step creates the state)
    for a, b in zip(steady.params, general.params):
        assert_same(a, b, "param")
    assert [(i, k) for i, k, _ in state_arrays(steady)] == [(i, k) for i, k, _ in state_arrays(general)]
    for (i, k, a), (_, _, b) in zip(state_arrays(steady), state_arrays(general)):
        assert_same(a, b, f"state[{i}][{k!r}]")


@pytest.mark.parametrize("mode", ["f32-int8state", "bf16-master-bf16grads", "bf16-direct", "f16-master"])
def test_a_bad_input_after_cached_steps_raises_before_any_write(mode):
    """The plan caches what stays between steps, never the checks: after steps on
    the plan, a gradient of another dtype, of mixed dtypes, shape or layout, not
    an array, or sharing memory with another tensor's state, and a parameter made
    read-only, each raise before any write; then the plan steps on as if they had
    not been tried."""
    param_dtype, grad_dtype, options = MODES[mode]
    rng = np.random.default_rng(6)
    shapes = [(300,), (4, 5)]
    params = arrays(rng, param_dtype, shapes)
    twin = [p.copy() for p in params]
    opt, fresh = fd.Adam(params, lr=0.01, **options), fd.Adam(twin, lr=0.01, **options)
    good = arrays(rng, grad_dtype, shapes)
    for _ in range(2):
        opt.step(good)
    plan = opt._plan
    assert plan is not None
    state = opt.state[0]["exp_avg_sq"].reshape(-1).view(np.uint8)
    bad = [([good[0], good[1].astype(np.float64)], TypeError, "gradients are"),
           ([good[0], good[1].reshape(5, 4)], ValueError, "shape"),
           ([good[0], np.asfortranarray(good[1])], ValueError, "C-contiguous"),
           ([good[0], good[1].tolist()], TypeError, "numpy.ndarray"),
           ([good[0], state[:good[1].nbytes].view(grad_dtype).reshape(4, 5)], ValueError,
            r"grads\[1\] shares memory with state\[0\]\['exp_avg_sq'\]")]
    if param_dtype != np.float32:  # the other dtype these parameters' gradients may have
        other = np.float32 if grad_dtype != np.float32 else param_dtype
        bad.append(([good[0], good[1].astype(other)], TypeError, "one dtype per call"))
    before = [p.copy() for p in params], [(i, k, v.copy()) for i, k, v in state_arrays(opt)]
    for grads, error, match in bad:
        with pytest.raises(error, match=match):
            opt.step(grads)
        assert opt._plan is plan
    params[1].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[1\] was changed in place"):
        opt.step(good)
    params[1].flags.writeable = True
    for a, b in zip(params, before[0]):
        assert_same(a, b, "param")
    for (i, k, a), (_, _, b) in zip(state_arrays(opt), before[1]):
        assert_same(a, b, f"state[{i}][{k!r}]")
    opt.step(good)
    for _ in range(3):
        fresh.step(good)
    for a, b in zip(params, twin):
        assert_same(a, b, "param")
    for (i, k, a), (_, _, b) in zip(state_arrays(opt), state_arrays(fresh)):
        assert_same(a, b, f"state[{i}][{k!r}]")


@pytest.mark.parametrize("seed", [0, 5, 2**64 - 1])
def test_a_stored_call_derives_the_reference_stochastic_keys(seed):
    """A StoredCall derives stochastic rounding's keys in C for each step number:
    those of ``precision.formats`` (``stream_key``), for every stored role."""
    rng = np.random.default_rng(8)
    params = arrays(rng, BF, [(7,), (3,)])
    buffers = {"exp_avg": arrays(rng, np.uint16, [(7,), (3,)]), "exp_avg_sq": arrays(rng, np.uint8, [(7,), (3,)])}
    scales = {"exp_avg_sq": [np.ones(1, np.float32), np.ones(1, np.float32)]}
    kernel_params, roles = precision.stored_roles(SPECS["adam"], [p.view(np.uint16) for p in params], buffers,
                                                  None, scales)
    storage = precision.Storage.of("int8", "stochastic", seed)
    call = _runtime.StoredCall(kernel_params, (buffers["exp_avg"], buffers["exp_avg_sq"], None), roles, (0, 1),
                               precision.BF16, storage, precision.formats, "")
    for step in (1, 2, 2, 1000, 2**63 - 2):
        made, expected = call.formats_at(step), precision.formats(storage, step, roles)
        assert [entry[0] for entry in made] == [entry[0] for entry in expected]  # (the very lists)
        assert [entry[6] for entry in made] == [entry[6] for entry in expected]
        assert len([entry for entry in made if entry[6] is not None]) == 3  # the parameters and both moments


def test_clipping_needs_float32_gradients():
    p = np.ones(10, BF)
    opt = fd.Adam([p], master_weights=True, clip_grad_norm=1.0)
    with pytest.raises(TypeError, match="clip_grad_norm, clip_grad_value and skip_nonfinite read float32"):
        opt.step([np.ones(10, BF)])
    assert not opt.state
    opt.step([np.full(10, 3.0, np.float32)])
    assert opt.last_grad_norm == pytest.approx(3 * 10**0.5)
