"""The cached step plan (issue 13 part 1): hyperparameters validated once per
change, never a value validation refuses; a write into ``param_groups`` seen
before the next write to any array; the kernel scalars computed once per change
give the very results computed per step; the plan's C path equals the general
path bit for bit."""

import math

import numpy as np
import pytest

import fastdescent as fd
from fastdescent import _runtime
from fastdescent.rules import SPECS
from rule_cases import EXAMPLES, RICHEST, make_state
from support import assert_bitwise_equal, random_array, step_optimizer
from test_optim import RULES, assert_same, make_grads, make_params, snapshot_optimizer


# ------------------------------------------------------------- the exact cache
@pytest.mark.parametrize("stored, other", [
    ((True,), (1,)), ((1,), (True,)), ((1,), (1.0,)), ((0.0,), (-0.0,)), ((-0.0,), (0.0,)),
    ((False,), (0,)), (((0.9, 0.99),), ((0.9, 0.99, 0.0),)), (((1, 2),), ((1.0, 2),)), (("a",), ("b",)),
])
def test_the_cache_tells_equal_values_of_other_types_or_signs_apart(stored, other):
    cache = _runtime.ExactCache()
    cache.put(stored, "value")
    assert cache.get(stored) == "value"
    assert cache.get(tuple(list(stored))) == "value"  # another tuple of the same objects
    assert cache.get(other) is None


def test_the_cache_takes_only_immutable_builtin_values():
    cache = _runtime.ExactCache()
    for key in [([0.9, 0.99],), (np.float64(0.1),), (np.array(0.1),), (float("nan"),)]:
        cache.put(key, "value")
        assert cache.get(key) is (None if not _runtime.immutable(key) else "value")
    nan = float("nan")
    cache.put((nan,), "nan")
    assert cache.get((nan,)) == "nan"  # the same object (a dict finds NaN only by identity)
    assert cache.get((float("nan"),)) in (None, "nan")
    assert cache.get((-nan,)) is None


def test_the_cache_empties_when_full():
    cache = _runtime.ExactCache(4)
    for k in range(10):
        cache.put((float(k),), k)
        assert cache.get((float(k),)) == k
    assert len(cache) <= 4


@pytest.mark.parametrize("good, bad, error", [
    (dict(maximize=True), dict(maximize=1), TypeError),    # True == 1, hash(True) == hash(1)
    (dict(lr=1.0), dict(lr=True), TypeError),
    (dict(lr=1), dict(lr=True), TypeError),
    (dict(betas=(0.0, 0.5)), dict(betas=(False, 0.5)), TypeError),
    (dict(eps=0.0), dict(eps=-0.0), None),                   # both valid: each keeps its sign
])
def test_a_cached_configuration_never_accepts_a_value_validation_refuses(good, bad, error, rng):
    p, g, m, v = (random_array(rng, 5, np.float32) for _ in range(4))
    v = np.abs(v)
    for _ in range(2):
        fd.adam_step(p, g, m, v, step=1, **good)
    if error is None:
        fd.adam_step(p, g, m, v, step=1, **bad)
        config = SPECS["adam"].configure(SPECS["adam"].values_of({**SPECS["adam"].defaults, **bad}))
        key = next(iter(bad))
        assert math.copysign(1.0, config.hyper[key]) == math.copysign(1.0, bad[key])
        return
    before = [a.copy() for a in (p, m, v)]
    with pytest.raises(error):
        fd.adam_step(p, g, m, v, step=1, **bad)
    for a, b in zip((p, m, v), before):
        assert_bitwise_equal(a, b)


def test_nan_is_refused_every_time(rng):
    p, g = random_array(rng, 5, np.float32), random_array(rng, 5, np.float32)
    nan = float("nan")
    for _ in range(3):
        with pytest.raises(ValueError, match="lr"):
            fd.sgd_step(p, g, lr=nan)


def test_a_negative_zero_weight_decay_gives_the_reference_bits(rng):
    """-0.0 and 0.0 compare and hash equal; cached, they must still give each its own result."""
    p = np.array([-0.0, 0.0, 1.5], np.float64)
    g = np.array([0.0, -0.0, 0.0], np.float64)
    results = {}
    for wd in (0.0, -0.0, 0.0, -0.0):
        for backend in ("kernel", "reference"):
            q = p.copy()
            fd.sgd_step(q, g, lr=0.5, weight_decay=wd, backend=backend)
            results.setdefault((math.copysign(1, wd), backend), q)
            assert_bitwise_equal(q, results[(math.copysign(1, wd), backend)])
    for sign in (1.0, -1.0):
        assert_bitwise_equal(results[(sign, "kernel")], results[(sign, "reference")])


# ------------------------------------------------------ the step scalars split
def step_scalar_cases():
    return [(name, rule) for name, rule in EXAMPLES.items() if rule.spec.step_scalars is not None]


@pytest.mark.parametrize("name, rule", step_scalar_cases(), ids=[n for n, _ in step_scalar_cases()])
def test_step_scalars_are_the_scalars_that_change_with_the_step(name, rule):
    """A spec's ``step_scalars`` give exactly (bit for bit) the entries of its
    ``scalars`` they replace, at any step; the other entries do not depend on the step."""
    spec = rule.spec
    first = spec.scalars(rule.hyper, step=1, grad_scale=1.0, fresh=frozenset())
    for step in (1, 2, 3, 10, 1000, 2**40, 2**63 - 1):
        scalars = spec.scalars(rule.hyper, step=step, grad_scale=1.0, fresh=frozenset())
        varying = dict(zip(spec.step_scalar_names, spec.step_scalars(rule.hyper, step)))
        for key, value in scalars.items():
            expected = varying[key] if key in varying else first[key]
            assert type(value) is type(expected) and repr(value) == repr(expected), (key, step)


# ------------------------------------------------------ writes to param_groups
@pytest.mark.parametrize("name", list(RICHEST))
def test_writes_between_steps_take_effect_on_the_plan_path(name, rng):
    """Steady steps (the C plan) with a rate written now and then equal the general
    path, forced at every step by writing a new (equal) rate object."""
    cls, config = RULES[RICHEST[name].name]
    params = make_params(rng, np.float64, [(30,), (7,)], rule=RICHEST[name].name)
    grad_steps = make_grads(rng, params, 8)
    lrs = [config["lr"]] * 4 + [config["lr"] * 0.5] * 2 + [config["lr"] * 0.25] * 2
    steady = cls([p.copy() for p in params], **config)
    general = cls([p.copy() for p in params], **config)
    for t, grads in enumerate(grad_steps):
        if t and lrs[t] != lrs[t - 1]:
            steady.param_groups[0]["lr"] = lrs[t]
        general.param_groups[0]["lr"] = float(repr(lrs[t]))
        assert steady.step(grads) and general.step(grads)
    assert steady._plan is not None or not _plannable(steady)
    assert_same(steady, general)


def _plannable(opt):
    spec = opt.spec
    return not spec.scalar_state and spec.runner is None and (not spec.uses_step or spec.step_scalars is not None)


def test_a_bad_value_written_after_many_plan_steps_raises_before_any_write(rng):
    params = make_params(rng, np.float32, [(10,), (4,)])
    opt = fd.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.01)
    grads = make_grads(rng, params, 1)[0]
    for _ in range(5):
        assert opt.step(grads)
    assert opt._plan is not None
    before = snapshot_optimizer(opt)
    opt.param_groups[1]["betas"] = (0.9, 1.0)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*betas"):
        opt.step(grads)
    assert_same(opt, before)
    opt.param_groups[1]["betas"] = (0.9, 0.999)
    assert opt.step(grads)


def test_a_group_dict_or_list_replaced_is_seen(rng):
    params = make_params(rng, np.float32, [(10,)])
    grads = make_grads(rng, params, 1)[0]
    opt = fd.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.step(grads)
    opt.param_groups[0] = dict(opt.param_groups[0], lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        opt.step(grads)
    opt.param_groups = [dict(opt.param_groups[0], lr=0.2, params=list(opt.param_groups[0]["params"]))]
    before = opt.params[0].copy()
    assert opt.step(grads)
    expected, buffer = before.copy(), opt.state[0]["momentum_buffer"]
    assert not np.array_equal(opt.params[0], before) and np.all(np.isfinite(buffer)) and expected.size


def test_the_plan_is_dropped_when_options_change(rng):
    params = make_params(rng, np.float32, [(10,)])
    grads = [np.full(10, 100.0, np.float32)]
    opt = fd.SGD([params[0].copy()], lr=0.1)
    opt.step(grads)
    opt.step(grads)
    assert opt._plan is not None
    opt.clip_grad_norm = 1.0
    assert opt._plan is None
    p = opt.params[0].copy()
    opt.step(grads)
    assert np.linalg.norm(p.astype(np.float64) - opt.params[0]) == pytest.approx(0.1, rel=1e-4)  # clipped to 1


def test_a_step_count_written_into_the_state_is_checked(rng):
    params = make_params(rng, np.float32, [(6,)])
    grads = make_grads(rng, params, 1)[0]
    opt = fd.Adam(params, lr=0.01)
    for _ in range(3):
        opt.step(grads)
    for bad in (-1, "3", 2.5, 2**63 - 1):
        opt.state[0]["step"] = bad
        before = snapshot_optimizer(opt)
        with pytest.raises(ValueError, match="step"):
            opt.step(grads)
        assert_same(opt, before)
    opt.state[0]["step"] = 10
    assert opt.step(grads) and opt.state[0]["step"] == 11


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("name", list(RICHEST))
def test_plan_steps_equal_general_steps(name, flat, rng):
    """The C plan and the general path (forced by a new lr object every step) agree
    bit for bit, with mixed dtypes and groups."""
    cls, config = RULES[RICHEST[name].name]
    shapes = [(5,), (3, 3), (0,)]
    example = RICHEST[name].name
    params = make_params(rng, np.float32, shapes, rule=example) + make_params(rng, np.float64, [(9,)], rule=example)
    grad_steps = make_grads(rng, params, 6)
    opts = []
    for _ in range(2):
        groups = [{"params": [p.copy() for p in params[:2]]}, {"params": [p.copy() for p in params[2:]]}]
        opts.append(cls(groups, **config, flat=flat))
    steady, general = opts
    for grads in grad_steps:
        for g in general.param_groups:
            g["lr"] = float(repr(config["lr"]))
        for opt in opts:
            step_optimizer(opt, grads)
    assert_same(steady, general)


def test_a_schedule_writing_the_rate_every_step_keeps_the_plan(rng):
    """A new rate object at every step is validated (only that value) and the plan
    goes on: the same plan object, the results of the general path."""
    params = make_params(rng, np.float32, [(12,)])
    grad_steps = make_grads(rng, params, 6)
    opt = fd.Adam([params[0].copy()], lr=0.01)
    opt.step(grad_steps[0])
    opt.step(grad_steps[1])
    plan = opt._plan
    p, m, v = opt.params[0].copy(), opt.state[0]["exp_avg"].copy(), opt.state[0]["exp_avg_sq"].copy()
    for t, grads in enumerate(grad_steps[2:], start=3):
        lr = 0.01 * 0.9**t
        opt.param_groups[0]["lr"] = lr
        assert opt.step(grads)
        fd.adam_step(p, grads[0], m, v, step=t, lr=lr)
    assert opt._plan is plan
    assert_bitwise_equal(opt.params[0], p)
    opt.param_groups[0]["lr"] = -1.0
    before = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match="lr"):
        opt.step(grad_steps[0])
    assert_same(opt, before)


def test_amsgrad_switched_off_leaves_its_buffer_out(rng):
    """A buffer kept from an earlier configuration is not handed to the kernel."""
    params = make_params(rng, np.float64, [(20,)])
    grad_steps = make_grads(rng, params, 5)
    for grads in grad_steps[:2]:  # large first gradients: the running maximum stays above v
        grads[0] *= 100.0
    opt = fd.Adam([params[0].copy()], lr=0.01, amsgrad=True, betas=(0.9, 0.5))
    p, m, v, vmax = params[0].copy(), np.zeros(20), np.zeros(20), np.zeros(20)
    for t, grads in enumerate(grad_steps, start=1):
        amsgrad = t <= 2
        opt.param_groups[0]["amsgrad"] = amsgrad
        opt.step(grads)
        fd.adam_step(p, grads[0], m, v, vmax if amsgrad else None, step=t, lr=0.01, amsgrad=amsgrad,
                     betas=(0.9, 0.5))
    assert_bitwise_equal(opt.params[0], p)
    assert_bitwise_equal(opt.state[0]["max_exp_avg_sq"], vmax)


def test_a_gradient_scale_that_changes_every_step_keeps_the_plan(rng):
    params = make_params(rng, np.float64, [(9,)])
    grad_steps = make_grads(rng, params, 6)
    opt = fd.SGD([params[0].copy()], lr=0.1, momentum=0.9)
    p, buffer = params[0].copy(), np.zeros(9)
    for t, grads in enumerate(grad_steps):
        scale = 1.0 / (t + 1.5)  # a new float every step (a loss scale, a world size)
        opt.step(grads, grad_scale=scale)
        fd.sgd_step(p, grads[0], buffer, lr=0.1, momentum=0.9, grad_scale=scale, first_step=t == 0)
        if t == 2:
            plan = opt._plan
    assert opt._plan is plan is not None
    assert_bitwise_equal(opt.params[0], p)
    before = snapshot_optimizer(opt)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="grad_scale"):
            opt.step(grad_steps[0], grad_scale=bad)
    assert_same(opt, before)


@pytest.mark.parametrize("kind", [np.float64, np.float32])
def test_numpy_scalar_rates_are_cached_exactly_and_keep_the_plan(kind, rng):
    cache = _runtime.ExactCache()
    cache.put((kind(0.0),), "zero")
    assert cache.get((kind(0.0),)) == "zero"
    assert cache.get((kind(-0.0),)) is None and cache.get((0.0,)) is None and cache.get((0,)) is None
    params = make_params(rng, np.float32, [(8,)])
    grad_steps = make_grads(rng, params, 6)
    opt = fd.SGD([params[0].copy()], lr=0.1, momentum=0.5)
    p, buffer = params[0].copy(), np.zeros(8, np.float32)
    for t, grads in enumerate(grad_steps):
        lr = kind(0.1 * 0.8**t)
        opt.param_groups[0]["lr"] = lr
        opt.step(grads)
        fd.sgd_step(p, grads[0], buffer, lr=lr, momentum=0.5, first_step=t == 0)
        if t == 2:
            plan = opt._plan
    assert opt._plan is plan is not None
    assert_bitwise_equal(opt.params[0], p)


# ----------------------------------------------- the C paths' direct kernel calls
def _kernel_modules():
    from fastdescent import _dispatch

    return [_dispatch.load_variant(v) for v in _dispatch.supported_variants()]


@pytest.mark.parametrize("module", _kernel_modules(), ids=lambda m: m.__name__)
def test_direct_entries_take_what_their_def_entries_take(module):
    """A direct entry's roles and scalars are its ``def``'s parameters: the scalars
    in order, the roles in the order its segment functions read them (the def's,
    but for Schedule-Free AdamW's)."""
    import inspect

    entries = module.direct_entries()
    assert entries
    for kernel, (_capsule, roles, scalars) in entries.items():
        parameters = list(inspect.signature(getattr(module, kernel)).parameters)
        assert parameters[len(roles):] == [*scalars, "n_threads"], kernel
        assert sorted(parameters[:len(roles)]) == sorted(roles), kernel
        assert list(roles) == parameters[:len(roles)] or kernel == "schedule_free_adamw", kernel


@pytest.mark.parametrize("name", [n for n in EXAMPLES if SPECS[EXAMPLES[n].spec.name].runner is None])
def test_the_direct_kernel_call_equals_the_def_entry(name, rng):
    """The face's C path, through the direct entry where the kernel has one, and
    the def entry (the face's general path) give the same bits, for lists of
    several arrays and for one array."""
    rule = EXAMPLES[name]
    spec = rule.spec
    for count in (1, 3):
        sizes = [7, 0, 33][:count] if count > 1 else [9]
        params = [random_array(rng, n, np.float64) for n in sizes]
        grads = [random_array(rng, n, np.float64) for n in sizes]
        state = [rule.make_state(rng, n, np.float64) for n in sizes]
        outputs = []
        for general in (False, True):
            ps, buffers = [p.copy() for p in params], {k: [s[i].copy() for s in state] for i, k in enumerate(rule.state)}
            args = [b.face_argument for b in spec.buffers]
            kwargs = {b.face_argument: buffers[b.name] if count > 1 else buffers[b.name][0]
                      for b in spec.buffers if b.name in buffers}
            options = {k: v for k, v in rule.options.items() if next(h for h in spec.hyper if h.name == k).face}
            options["grad_scale"] = 1 if general else 1.0  # an int: the C path hands it to face_step
            face = getattr(fd, spec.face_name)
            step = {"step": 3} if spec.uses_step else {}
            face(ps if count > 1 else ps[0], grads if count > 1 else grads[0],
                 *[kwargs.get(a) for a in args], **step, **options)
            outputs.append((ps, buffers))
        for a, b in zip(outputs[0][0], outputs[1][0]):
            assert_bitwise_equal(a, b)
        for key in outputs[0][1]:
            for a, b in zip(outputs[0][1][key], outputs[1][1][key]):
                assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", [n for n in EXAMPLES if SPECS[EXAMPLES[n].spec.name].runner is None])
def test_every_direct_entry_equals_its_def_entry(name, dtype, rng):
    """Every rule kernel's direct entry, called as the C paths call it, writes the
    bits of its ``def`` entry: rules with scalar state included (their faces and
    optimizers take the Python path, so the test above never reaches them)."""
    from fastdescent._config import resolve_backend
    from fastdescent.rules._spec import NOTHING_FRESH

    rule = EXAMPLES[name]
    spec, kernels = rule.spec, resolve_backend("kernel")
    config = spec.configure(spec.values_of(rule.hyper))
    scalar_state = {s.name: s.initial_value(config.hyper) for s in spec.scalar_state} or None
    invoke, constants, varying = config.kernel_arguments(3, 0.75, NOTHING_FRESH, scalar_state)
    assert invoke.has_direct(kernels), spec.kernel
    for sizes in ([9], [7, 0, 33]):
        states = [make_state(rng, rule, n, dtype) for n in sizes]
        grads = [random_array(rng, n, dtype) for n in sizes]
        outputs = []
        for direct in (False, True):
            params = [s["param"].copy() for s in states]
            buffers = tuple([[s[b.name].copy() for s in states] if b.name in states[0] else None
                             for b in spec.buffers])
            if direct:
                assert invoke.call_direct(kernels, params, grads, buffers, constants, varying, 2)
            else:
                invoke(kernels, params, grads, buffers, constants, varying, 2)
            outputs.append([params, *[b for b in buffers if b is not None]])
        for arrays, expected in zip(outputs[1], outputs[0]):
            for a, b in zip(arrays, expected):
                assert_bitwise_equal(a, b)


def test_an_optimizer_keeps_its_plan_when_a_face_cached_its_values_first(rng, monkeypatch):
    """A configuration validated first by a face call (its default objects) and then
    found by an optimizer whose group holds other objects of the same values: the
    optimizer's plan compares against its own group's objects, so it never
    validates again while nobody writes (it did at every step)."""
    fd.adam_step(random_array(rng, 5, np.float32), random_array(rng, 5, np.float32), np.zeros(5, np.float32),
                 np.zeros(5, np.float32), step=1)
    lr = float("0.001")  # equal to the face's default, another object
    opt = fd.Adam([random_array(rng, 5, np.float32)], lr=lr)
    grads = [random_array(rng, 5, np.float32)]
    opt.step(grads)
    refreshed = []
    original = type(opt)._refresh_plan
    monkeypatch.setattr(type(opt), "_refresh_plan", lambda self, *a: refreshed.append(a) or original(self, *a))
    for _ in range(3):
        opt.step(grads)
    assert not refreshed and opt._plan is not None
    opt.param_groups[0]["lr"] = 0.002
    opt.step(grads)
    assert len(refreshed) == 1


def test_a_key_added_or_removed_and_added_again_in_a_group_is_seen(rng):
    """The plan's check of a group walks its dict in order: a new key, or a key
    removed and added again (with another value), goes the slow way and is seen."""
    params, grads = [random_array(rng, 6, np.float32)], [random_array(rng, 6, np.float32)]
    plain = fd.Adam([params[0].copy()], lr=0.01)
    moved = fd.Adam([params[0].copy()], lr=0.01)
    for opt in (plain, moved):
        opt.step(grads)
        opt.step(grads)
    group = moved.param_groups[0]
    group["initial_lr"] = 0.01   # a new key, not a hyperparameter
    moved.step(grads)
    plain.step(grads)
    lr = group.pop("lr")
    group["lr"] = lr * 0.5       # the same key, at the end now
    plain.param_groups[0]["lr"] = lr * 0.5
    for opt in (plain, moved):
        opt.step(grads)
        opt.step(grads)
    assert_bitwise_equal(moved.params[0], plain.params[0])
    with pytest.raises(ValueError, match="lr"):
        del group["lr"]
        group["lr"] = -1.0
        moved.step(grads)


def test_call_defaults_resolve_as_documented():
    """The faces and the step plans resolve ``n_threads`` and ``backend`` through
    ``_config``'s own ``CALL_DEFAULTS`` (the state and the rules in one place): the
    rules of ``fastdescent._config``'s docstring, under every kind of default."""
    from fastdescent import _config
    from fastdescent.rules._spec import CALL_DEFAULTS

    assert CALL_DEFAULTS is _config.CALL_DEFAULTS

    def documented(request, default):
        limit = _config.max_threads()
        request = default if request is None else request
        if request is None:
            return limit
        return max(1, limit + 1 + request) if request < 0 else min(request, limit)

    def check(default=None):
        for request in (None, 1, 2, 3, -1, -2, 10**6, 10**30, -10**30):
            assert CALL_DEFAULTS.threads(request) == fd.effective_n_threads(request) == documented(request, default)
        for backend in (None, "kernel", "reference"):
            got = CALL_DEFAULTS.backend(backend)  # (loads the backends on first use)
            assert got is _config.resolve_backend(backend) is _config._BACKEND_MODULES[backend or fd.get_backend()]

    check()
    for bad in (0, True, 1.0, "2", np.int64(2)):
        with pytest.raises((TypeError, ValueError)):
            CALL_DEFAULTS.threads(bad)
    for bad in ("nope", ["kernel"]):
        with pytest.raises(ValueError, match="backend"):
            CALL_DEFAULTS.backend(bad)
    try:
        fd.set_num_threads(1)
        check(1)
        with fd.num_threads(-1):
            check(-1)
        with fd.num_threads(None):
            check(None)
        fd.set_backend("reference")
        check(1)
    finally:
        fd.set_num_threads(None)
        fd.set_backend(None)
    check()
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        check()


def test_adams_step_scalars_in_c_are_the_python_ones_bit_for_bit():
    from fastdescent.rules.adam import adam_bias_corrections

    c = _runtime.BiasCorrections(adam_bias_corrections)
    for betas in [(0.9, 0.999), (0.0, 0.0), (-0.0, 0.5), (0.2, 0.9), (0.999999, 0.9999999999)]:
        for bias_correction in (True, False):
            h = {"lr": 1e-3, "betas": betas, "bias_correction": bias_correction}
            for step in [1, 2, 3, 7, 10, 100, 1001, 10**6, 2**40, 2**53 - 1, 2**53, 2**62]:
                got, want = c(h, step), adam_bias_corrections(h, step)
                assert [x.hex() for x in got] == [x.hex() for x in want], (betas, step)
