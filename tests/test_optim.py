"""Optimizer objects: multi-tensor and flat-arena steps equal per-array steps bit for
bit; steps equal the functional faces; groups, hyperparameters written between steps,
validation before any write, clipping and the non-finite guard."""

import copy
import math

import numpy as np
import pytest

import fastdescent as fd
from rule_cases import EXAMPLES, initial_state, rule_shape, stacked, take_step, torch_as_fastdescent
from support import DTYPES, THREADS, assert_bitwise_equal, random_array, step_optimizer

#: Every example of every rule: name -> (optimizer class, its arguments).
RULES = {name: (fd.optim.CLASSES[rule.spec.title], dict(rule.options, lr=rule.hyper["lr"]))
         for name, rule in EXAMPLES.items()}
#: Mixed shapes: empty arrays, odd sizes, 2-D and 3-D arrays (which Adafactor factors),
#: a 0-d one and one large array among small ones.
SHAPES = [(0,), (1,), (7,), (10, 13), (0, 3), (4097,), (65,), (100_003,), (30, 100), (1,), (2, 3, 5), ()]
STEPS = 4


def make_params(rng, dtype, shapes=SHAPES, rule=None):
    """Random parameters of ``shapes`` (example ``rule``: each in a shape that rule takes)."""
    if rule is not None:
        shapes = [rule_shape(EXAMPLES[rule].spec, s) for s in shapes]
    return [random_array(rng, math.prod(s), dtype).reshape(s) for s in shapes]


def make_grads(rng, params, steps=STEPS):
    return [[random_array(rng, p.size, p.dtype).reshape(p.shape) for p in params] for _ in range(steps)]


def run(cls, config, params, grad_steps, **options):
    """Step an optimizer over copies of ``params``, the rate changing every step as
    a schedule would change it."""
    opt = cls([p.copy() for p in params], **config, **options)
    take_steps(opt, config, grad_steps)
    return opt


def take_steps(opt, config, grad_steps, start=0):
    """Steps ``start``, ``start + 1``... of :func:`run` (with their rates)."""
    for t, grads in enumerate(grad_steps, start=start):
        for group in opt.param_groups:
            group["lr"] = config["lr"] * 0.9**t
        if opt.flat:
            for view, g in zip(opt.grads, grads):
                view[...] = g
            assert opt.step()
        else:
            assert opt.step([g.copy() for g in grads])


def snapshot_optimizer(opt):
    """Every byte the optimizer could change: params, state buffers and steps."""
    return ([p.copy() for p in opt.params],
            {i: {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in s.items()} for i, s in opt.state.items()})


def assert_same(actual, expected):
    """Two snapshots (or optimizers) equal bit for bit."""
    if isinstance(actual, fd.optim.Optimizer):
        actual = snapshot_optimizer(actual)
    if isinstance(expected, fd.optim.Optimizer):
        expected = snapshot_optimizer(expected)
    (params_a, state_a), (params_b, state_b) = actual, expected
    assert len(params_a) == len(params_b)
    for k, (a, b) in enumerate(zip(params_a, params_b)):
        assert_bitwise_equal(a, b, f"param {k}")
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys(), f"state[{i}]"
        for name, value in state_a[i].items():
            if isinstance(value, np.ndarray):
                assert_bitwise_equal(value, state_b[i][name], f"state[{i}][{name!r}]")
            else:
                assert value == state_b[i][name], f"state[{i}][{name!r}]"


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("layout", ["multi-tensor", "flat"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(RULES))
def test_multi_tensor_and_flat_steps_equal_per_array_steps(name, dtype, layout, n_threads, rng, tiny_parts):
    cls, config = RULES[name]
    params = make_params(rng, dtype, rule=name)
    grad_steps = make_grads(rng, params)
    together = run(cls, config, params, grad_steps, flat=layout == "flat", n_threads=n_threads)
    for k, p in enumerate(params):
        alone = run(cls, config, [p], [[grads[k]] for grads in grad_steps], n_threads=1)
        expected = snapshot_optimizer(alone)
        actual = ([together.params[k]], {0: together.state[k]} if k in together.state else {})
        assert_same(actual, expected)
    assert not np.array_equal(together.params[7], params[7]), "the steps changed nothing"


def face_run(name, params, grad_steps):
    """The optimizer's run through the public functional face, state kept here as
    PyTorch initialises it."""
    rule, lr = EXAMPLES[name], RULES[name][1]["lr"]
    lists = stacked([initial_state(rule, p.copy()) for p in params])
    for t, grads in enumerate(grad_steps, start=1):
        take_step(rule, lists, grads, t=t, lr=lr * 0.9 ** (t - 1))
    state = {key: arrays for key, arrays in lists.items() if key != "param"}
    return lists["param"], state


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(RULES))
def test_optimizer_steps_equal_face_steps(name, dtype, backend, rng):
    cls, config = RULES[name]
    params = make_params(rng, dtype, [(3, 5), (0,), (1000,), (17,), (2, 4, 3)], rule=name)
    grad_steps = make_grads(rng, params)
    opt = run(cls, config, params, grad_steps, backend=backend)
    face_params, face_state = face_run(name, params, grad_steps)
    for k, p in enumerate(face_params):
        assert_bitwise_equal(opt.params[k], p, f"param {k}")
        kept = {name for name, arrays in face_state.items() if arrays[k] is not None}
        for name in kept:  # buffers, and scalar states (floats, 0-d arrays here)
            assert_bitwise_equal(np.asarray(opt.state[k][name]), face_state[name][k], f"state[{k}][{name!r}]")
        if opt.spec.counts_steps:
            assert opt.state[k]["step"] == STEPS and type(opt.state[k]["step"]) is int
        if k in opt.state:
            assert set(opt.state[k]) == kept | ({"step"} if opt.spec.counts_steps else set()), k


def torch_steps_empty(torch, peer, options):
    """False if ``torch.optim.<peer>`` cannot step an empty parameter
    (torch.optim.Adafactor divides by its size; torch.optim.Muon takes matrices only;
    fastdescent leaves it alone)."""
    p = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    p.grad = torch.zeros(0, dtype=torch.float64)
    try:
        getattr(torch.optim, peer)([p], **options).step()
    except (ZeroDivisionError, ValueError):
        return False
    return True


@pytest.mark.parametrize("name", [n for n, rule in EXAMPLES.items() if rule.torch_peer is not None])
def test_close_to_torch_optim(name, rng):
    torch = pytest.importorskip("torch")
    cls, config = RULES[name]
    peer, options = EXAMPLES[name].torch_peer
    shapes = [(3, 5), (0,), (40,), (2, 3, 4)]
    if not torch_steps_empty(torch, peer, options):
        shapes.remove((0,))
    params = make_params(rng, np.float64, shapes, rule=name)
    grad_steps = make_grads(rng, params, 6)
    opt = cls([p.copy() for p in params], **config)
    tensors = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    reference = getattr(torch.optim, peer)(tensors, **dict(options, lr=config["lr"]))
    for grads in grad_steps:
        opt.step(grads)
        for tensor, g in zip(tensors, grads):
            tensor.grad = torch.tensor(g)
        with torch_as_fastdescent(torch):
            reference.step()
    for p, tensor in zip(opt.params, tensors):
        np.testing.assert_allclose(p, tensor.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layout", ["multi-tensor", "flat"])
def test_mixed_dtypes_in_one_group_equal_per_array_steps(layout, rng, tiny_parts):
    params = make_params(rng, np.float32, [(5,), (300,)]) + make_params(rng, np.float64, [(7,), (2, 2)])
    params = [params[0], params[2], params[1], params[3]]
    grad_steps = make_grads(rng, params)
    together = run(fd.Adam, dict(lr=0.01), params, grad_steps, flat=layout == "flat", n_threads=2)
    for k, p in enumerate(params):
        alone = run(fd.Adam, dict(lr=0.01), [p], [[grads[k]] for grads in grad_steps])
        assert_same(([together.params[k]], {0: together.state[k]}), alone)
        assert together.params[k].dtype == p.dtype


def test_groups_have_their_own_hyperparameters_and_step_alone(rng):
    a, b, c = make_params(rng, np.float32, [(10,), (20,), (30,)])
    opt = fd.SGD([{"params": [a, b]}, {"params": [c], "lr": 0.5, "momentum": 0.9}], lr=0.1)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.0
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["dampening"] == 0.0
    first = fd.SGD([a.copy(), b.copy()], lr=0.1)
    second = fd.SGD([c.copy()], lr=0.5, momentum=0.9)
    for grads in make_grads(rng, [a, b, c], 3):
        opt.step(grads)
        first.step(grads[:2])
        second.step(grads[2:])
    assert_same((opt.params[:2], {}), first)
    assert_same((opt.params[2:], {0: opt.state[2]}), second)
    only_second = snapshot_optimizer(opt)
    g = make_grads(rng, [c], 1)[0]
    assert opt.step(g, group=1)
    second.step(g)
    assert_same((opt.params[:2], {}), (only_second[0][:2], {}))  # group 0 untouched
    assert_same((opt.params[2:], {0: opt.state[2]}), second)
    with pytest.raises(ValueError, match="gradients for 1 parameters"):
        opt.step(g + g, group=1)
    with pytest.raises(ValueError, match="group 2 does not exist"):
        opt.step(g, group=2)


def test_add_param_group(rng):
    a, b = make_params(rng, np.float32, [(10,), (20,)])
    opt = fd.Adam([a], lr=0.01)
    opt.add_param_group({"params": b, "betas": (0.5, 0.6)})
    assert opt.param_groups[1]["betas"] == (0.5, 0.6) and opt.param_groups[1]["lr"] == 0.01
    assert opt.params[1] is b
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [a.copy()], "betas": (0.5, 1.5)})
    assert len(opt.param_groups) == 2


def test_hyperparameters_written_between_steps_take_effect(rng):
    params = make_params(rng, np.float64, [(50,)])
    grads = make_grads(rng, params, 2)
    opt = fd.Adam([params[0].copy()], lr=0.01)
    opt.step(grads[0])
    opt.param_groups[0].update(lr=0.2, betas=(0.5, 0.9), weight_decay=0.1)
    opt.step(grads[1])
    p, m, v = params[0].copy(), np.zeros(50), np.zeros(50)
    fd.adam_step(p, grads[0][0], m, v, step=1, lr=0.01)
    fd.adam_step(p, grads[1][0], m, v, step=2, lr=0.2, betas=(0.5, 0.9), weight_decay=0.1)
    assert_bitwise_equal(opt.params[0], p)


@pytest.mark.parametrize("convention", ["pytorch", "classical"])
def test_momentum_switched_on_mid_run_creates_its_buffer(convention, rng):
    params = make_params(rng, np.float64, [(30,), (4,)])
    grad_steps = make_grads(rng, params)
    opt = fd.SGD([p.copy() for p in params], lr=0.1, convention=convention)
    expected = [p.copy() for p in params]
    buffers = [np.zeros_like(p) for p in params]
    for t, grads in enumerate(grad_steps):
        momentum = 0.9 if t >= 2 else 0.0
        opt.param_groups[0]["momentum"] = momentum
        opt.step(grads)
        first = t == 2 and convention == "pytorch"
        fd.sgd_step(expected, grads, buffers if momentum else None, lr=0.1, momentum=momentum,
                    convention=convention, first_step=first)
    assert_same(opt, (expected, {0: {"momentum_buffer": buffers[0]}, 1: {"momentum_buffer": buffers[1]}}))


def test_array_valued_hyperparameters_are_validated(rng):
    params = make_params(rng, np.float32, [(5,)])
    grads = make_grads(rng, params, 2)
    opt = fd.Adam(params, lr=0.01)
    opt.step(grads[0])
    opt.param_groups[0]["betas"] = np.array([0.9, 1.5])
    with pytest.raises(ValueError, match="betas"):
        opt.step(grads[1])
    opt.param_groups[0]["betas"] = np.array([0.9, 0.99])
    assert opt.step(grads[1])
    opt.param_groups[0]["betas"] = [0.9, 0.99]
    assert opt.step(grads[1])
    opt.param_groups[0]["betas"][1] = 1.5  # changed in place, not rebound
    with pytest.raises(ValueError, match="betas"):
        opt.step(grads[1])


BAD_HYPERPARAMETERS = [
    ("lr", -1.0, ValueError), ("lr", float("nan"), ValueError), ("lr", "0.1", TypeError),
    ("betas", (0.9, 1.0), ValueError), ("betas", 0.9, TypeError), ("eps", -1e-8, ValueError),
    ("weight_decay", float("inf"), ValueError),
]


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("key, value, error", BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_raises_before_any_write(key, value, error, first_step, rng):
    a, b = make_params(rng, np.float32, [(10,), (20,)])
    opt = fd.Adam([{"params": [a]}, {"params": [b]}], lr=0.01)
    grads = make_grads(rng, [a, b], 2)
    if not first_step:
        opt.step(grads[0])
    before = snapshot_optimizer(opt)
    opt.param_groups[1][key] = value  # the second group: the first must not be written either
    with pytest.raises(error, match=key):
        opt.step(grads[1])
    assert_same(opt, before)
    opt.param_groups[1][key] = opt.defaults[key]
    assert opt.step(grads[1])


def test_adagrad_checks_its_initial_value(rng):
    a = make_params(rng, np.float32, [(10,)])[0]
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        fd.Adagrad([a], initial_accumulator_value=-1.0)
    opt = fd.Adagrad([a])
    opt.param_groups[0]["initial_accumulator_value"] = float("nan")
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        opt.step(make_grads(rng, [a], 1)[0])
    assert not opt.state


def bad_gradients(rng, params):
    """(description, exception, grads) for gradients a step must refuse."""
    good = make_grads(rng, params, 1)[0]
    f32, f64 = good[0], good[-1]
    return [
        ("too few", ValueError, good[:-1]),
        ("not a list", TypeError, f32),
        ("None inside", TypeError, good[:-1] + [None]),
        ("wrong shape in the last group", ValueError, good[:-1] + [f64[:-1]]),
        ("wrong dtype in the last group", TypeError, good[:-1] + [f64.astype(np.float32)]),
        ("non-contiguous", ValueError, good[:-1] + [np.repeat(f64, 2)[::2]]),
        ("a gradient is its parameter", ValueError, good[:-1] + [params[-1]]),
        ("list", TypeError, good[:-1] + [list(f64)]),
    ]


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("index", range(8))
def test_bad_gradients_raise_before_any_write(index, clip, rng):
    params = make_params(rng, np.float32, [(10,), (3,)]) + make_params(rng, np.float64, [(20,)])
    opt = fd.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.01,
                  clip_grad_value=0.1 if clip else None, skip_nonfinite=clip)
    opt.step(make_grads(rng, params, 1)[0])
    before = snapshot_optimizer(opt)
    description, error, grads = bad_gradients(rng, params)[index]
    kept = [g.copy() if isinstance(g, np.ndarray) else g for g in grads] if isinstance(grads, list) else None
    with pytest.raises(error):
        opt.step(grads)
    assert_same(opt, before)
    if kept is not None:  # clipping by value must not have touched the gradients either
        for g, k in zip(grads, kept):
            if isinstance(g, np.ndarray) and g.size:
                np.testing.assert_array_equal(g, k)


def test_step_needs_gradients_unless_flat(rng):
    opt = fd.SGD(make_params(rng, np.float32, [(3,)]), lr=0.1)
    with pytest.raises(TypeError, match="flat=True"):
        opt.step()
    with pytest.raises(ValueError, match="flat=True"):
        opt.zero_grad()
    assert opt.grads is None


def test_read_only_gradients_are_fine(rng):
    params = make_params(rng, np.float32, [(10,)])
    grads = make_grads(rng, params, 1)[0]
    grads[0].flags.writeable = False
    assert fd.SGD(params, lr=0.1, clip_grad_norm=1.0).step(grads)


def test_replacing_a_parameter_is_refused(rng):
    a, b = make_params(rng, np.float32, [(10,), (10,)])
    opt = fd.SGD([a], lr=0.1)
    params = opt.param_groups[0]["params"]
    assert isinstance(params, list) and params == [a]
    for change in (lambda: params.__setitem__(0, b), lambda: params.append(b), lambda: params.pop()):
        with pytest.raises(TypeError, match="add_param_group"):
            change()
    assert type(copy.deepcopy(params)) is list and params.copy() == [a]
    opt.param_groups[0]["params"] = [a]  # the same arrays in a new list: fine
    assert opt.step(make_grads(rng, [a], 1)[0])
    opt.param_groups[0]["params"] = [b]
    with pytest.raises(ValueError, match="changed"):
        opt.step(make_grads(rng, [a], 1)[0])


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["multi-tensor", "flat"])
def test_clip_by_global_norm_scales_through_grad_scale(dtype, layout, rng, tiny_parts):
    params = make_params(rng, dtype, SHAPES[:6]) + make_params(rng, dtype, [(4, 4)])
    grads = make_grads(rng, params, 1)[0]
    norm = fd.global_norm(grads)
    for max_norm in (norm / 3, norm * 3):
        opt = fd.SGD([p.copy() for p in params], lr=0.1, momentum=0.9, clip_grad_norm=max_norm,
                     flat=layout == "flat", n_threads=2)
        kept = [g.copy() for g in grads]
        step_optimizer(opt, grads)
        assert opt.last_grad_norm == norm
        factor = min(1.0, max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_
        expected = [p.copy() for p in params]
        buffers = [np.empty_like(p) for p in params]
        fd.sgd_step(expected, kept, buffers, lr=0.1, momentum=0.9, first_step=True, grad_scale=factor)
        assert_same((opt.params, {}), (expected, {}))
        for g, k in zip(grads, kept):
            assert_bitwise_equal(g, k, "gradient")  # norm clipping never rewrites gradients
        if max_norm < norm:  # the step really was clipped to the given norm
            moved = fd.global_norm([b.astype(np.float64) for b in buffers])
            assert moved == pytest.approx(max_norm, rel=1e-5)


def test_clip_norm_composes_with_a_loss_scale(rng):
    params = make_params(rng, np.float32, [(100,), (7,)])
    grads = make_grads(rng, params, 1)[0]
    loss_scale = 2.0**12  # a power of two: unscaling is exact, so results must be bitwise equal
    plain = fd.Adam([p.copy() for p in params], lr=0.01, clip_grad_norm=0.5)
    scaled = fd.Adam([p.copy() for p in params], lr=0.01, clip_grad_norm=0.5)
    plain.step(grads)
    scaled.step([g * loss_scale for g in grads], grad_scale=1 / loss_scale)
    assert scaled.last_grad_norm == plain.last_grad_norm
    assert_same(scaled, plain)


@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_clip_by_value_clamps_gradients_in_place(grad_scale, rng):
    params = make_params(rng, np.float32, [(100,), (0,), (33,)])
    grads = make_grads(rng, params, 1)[0]
    limit = 0.5 / grad_scale  # the value limit applies to the gradients as the rule sees them
    clipped = [np.clip(g, -np.float32(limit), np.float32(limit)) for g in grads]
    opt = fd.Adam([p.copy() for p in params], lr=0.01, clip_grad_value=0.5)
    assert opt.step(grads, grad_scale=grad_scale)
    for g, c in zip(grads, clipped):
        assert_bitwise_equal(g, c, "clamped gradient")
    expected = [p.copy() for p in params]
    fd.adam_step(expected, clipped, [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params],
                 step=1, lr=0.01, grad_scale=grad_scale)
    assert_same((opt.params, {}), (expected, {}))
    assert opt.last_grad_norm == pytest.approx(grad_scale * fd.global_norm(clipped), rel=1e-15)


def test_clip_options_are_validated(rng):
    params = make_params(rng, np.float32, [(3,)])
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip_grad_norm"):
            fd.SGD(params, clip_grad_norm=bad)
        with pytest.raises(ValueError, match="clip_grad_value"):
            fd.SGD(params, clip_grad_value=bad)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        fd.SGD(params, skip_nonfinite=1)
    opt = fd.SGD(params)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(make_grads(rng, params, 1)[0], grad_scale=0.0)


# ------------------------------------------------------------ non-finite guard
GUARDED = [dict(), dict(clip_grad_norm=1.0), dict(clip_grad_value=0.1), dict(clip_grad_norm=1.0, clip_grad_value=0.1)]


@pytest.mark.parametrize("options", GUARDED, ids=lambda o: "-".join(o) or "guard")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", ["multi-tensor", "flat"])
def test_guard_skips_a_non_finite_step_leaving_every_byte(options, bad, layout, rng):
    params = make_params(rng, np.float32, [(10,), (3000,)]) + make_params(rng, np.float64, [(20,)])
    flat = layout == "flat"
    make = lambda: fd.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], lr=0.01,  # noqa: E731
                           skip_nonfinite=True, flat=flat, **options)
    guarded, clean = make(), make()
    first, poisoned, last = make_grads(rng, params, 3)
    poisoned[1][1234] = bad
    for opt in (guarded, clean):
        assert opt.step(first)
    before = snapshot_optimizer(guarded)
    kept = [g.copy() for g in poisoned]
    assert guarded.step(poisoned) is False
    assert guarded.skipped_steps == 1
    assert_same(guarded, before)
    for g, k in zip(poisoned, kept):  # not even clipping by value touched them
        np.testing.assert_array_equal(g, k)
    assert guarded.step(last) and clean.step(last)
    assert_same(guarded, clean)
    assert guarded.skipped_steps == 1 and clean.skipped_steps == 0


def test_guard_on_the_first_step_creates_no_state(rng):
    params = make_params(rng, np.float32, [(10,)])
    grads = make_grads(rng, params, 1)[0]
    grads[0][3] = np.nan
    opt = fd.SGD(params, lr=0.1, momentum=0.9, skip_nonfinite=True)
    before = snapshot_optimizer(opt)
    assert opt.step(grads) is False
    assert not opt.state and opt.state_dict()["state"] == {}
    assert_same(opt, before)


def test_default_lets_non_finite_gradients_through(rng):
    """Documented default (as torch.optim): no check, the NaN reaches the parameter."""
    params = make_params(rng, np.float32, [(10,)])
    grads = make_grads(rng, params, 1)[0]
    grads[0][3] = np.nan
    opt = fd.SGD(params, lr=0.1)
    assert opt.skip_nonfinite is False
    assert opt.step(grads) is True
    assert np.isnan(opt.params[0][3]) and np.isfinite(np.delete(opt.params[0], 3)).all()


def test_non_finite_norm_without_guard_gives_clip_factor_zero(rng):
    params = make_params(rng, np.float32, [(10,)])
    grads = make_grads(rng, params, 1)[0]
    grads[0][3] = np.inf
    before = params[0].copy()
    opt = fd.SGD(params, lr=0.1, clip_grad_norm=1.0)
    with np.errstate(invalid="ignore"):  # the reference backend computes 0 * inf in NumPy
        assert opt.step(grads) and opt.last_grad_norm == math.inf
    assert np.isnan(opt.params[0][3])  # 0 * inf, as torch's clip_grad_norm_
    np.testing.assert_array_equal(np.delete(opt.params[0], 3), np.delete(before, 3))


# ---------------------------------------------------------------- flat arena
def test_flat_arena_holds_every_role_in_one_block(rng):
    params = make_params(rng, np.float32, [(10,), (2, 3), (0,)]) + make_params(rng, np.float64, [(5,)])
    originals = [p.copy() for p in params]
    opt = fd.Adam(params, lr=0.01, flat=True)
    assert all(a is not b for a, b in zip(opt.params, params))
    for view, original in zip(opt.params, originals):
        assert_bitwise_equal(view, original)
        assert view.flags.c_contiguous and view.flags.writeable
    f32 = [p for p in opt.params if p.dtype == np.float32 and p.size]
    assert f32[0].base is f32[1].base and f32[0].base.size == 16
    assert f32[1].__array_interface__["data"][0] == f32[0].__array_interface__["data"][0] + 40
    grads = opt.grads
    assert [g.shape for g in grads] == [p.shape for p in params]
    assert grads[0].base is grads[1].base and not np.shares_memory(grads[0].base, f32[0].base)
    for g in grads:
        g[...] = 1.0
    opt.step()
    assert opt.state[0]["exp_avg"].base is opt.state[1]["exp_avg"].base
    for p, original in zip(params, originals):
        assert_bitwise_equal(p, original, "the user's original arrays are not parameters any more")
    opt.zero_grad()
    assert all(not g.any() for g in grads)


def test_flat_step_takes_other_gradient_arrays_too(rng):
    params = make_params(rng, np.float32, [(10,), (300,), (0,)])
    grad_steps = make_grads(rng, params)
    by_views = run(fd.RMSprop, dict(lr=0.01, momentum=0.5), params, grad_steps, flat=True)
    by_arrays = fd.RMSprop([p.copy() for p in params], lr=0.01, momentum=0.5, flat=True)
    for t, grads in enumerate(grad_steps):
        by_arrays.param_groups[0]["lr"] = 0.01 * 0.9**t
        by_arrays.step(grads)
    assert_same(by_arrays, by_views)


# --------------------------------------------------------------------- state
@pytest.mark.parametrize("name, expected", [
    ("sgd", set()), ("sgd-momentum-dampening", {"momentum_buffer"}),
    ("adagrad", {"step", "sum"}), ("rmsprop", {"step", "square_avg"}),
    ("rmsprop_centered_momentum", {"step", "square_avg", "momentum_buffer", "grad_avg"}),
    ("adam", {"step", "exp_avg", "exp_avg_sq"}), ("adamw-amsgrad-maximize", {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ("adadelta", {"step", "square_avg", "acc_delta"}),
    ("adamax", {"step", "exp_avg", "exp_inf"}),
    ("nadam", {"step", "mu_product", "exp_avg", "exp_avg_sq"}),
    ("radam", {"step", "exp_avg", "exp_avg_sq"}),
])
def test_state_holds_pytorch_names_only_as_needed(name, expected, rng):
    cls, config = RULES[name]
    params = make_params(rng, np.float32, [(4,), (5,)])
    opt = cls(params, **config)
    assert not opt.state
    opt.step(make_grads(rng, params, 1)[0])
    if not expected:
        assert not opt.state
        return
    assert set(opt.state[1]) == expected
    assert opt.state[params[1]] is opt.state[1]  # an array works as a key, as in torch
    assert params[0] in opt.state and np.zeros(4) not in opt.state


def test_state_dict_layout(rng):
    params = make_params(rng, np.float32, [(4,), (5,), (6,)])
    opt = fd.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=0.01, amsgrad=True)
    opt.step(make_grads(rng, params, 1)[0])
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    assert sd["param_groups"][1]["lr"] == 0.5 and sd["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(sd["state"]) == {0, 1, 2}
    assert sd["state"][2]["step"] == 1 and type(sd["state"][2]["step"]) is int
    sd["state"][0]["exp_avg"][:] = 7.0  # a copy, not the optimizer's buffer
    assert not (opt.state[0]["exp_avg"] == 7.0).any()


def test_constructor_validation(rng):
    a = make_params(rng, np.float32, [(4,)])[0]
    cases = [
        (ValueError, lambda: fd.SGD([])),
        (TypeError, lambda: fd.SGD(a)),
        (TypeError, lambda: fd.SGD({"params": [a]})),
        (TypeError, lambda: fd.SGD([a, {"params": [a]}])),
        (TypeError, lambda: fd.SGD([np.arange(3)])),
        (TypeError, lambda: fd.SGD([[1.0, 2.0]])),
        (ValueError, lambda: fd.SGD([a, a])),
        (ValueError, lambda: fd.SGD([a, a[1:]])),
        (ValueError, lambda: fd.SGD([np.repeat(a, 2)[::2]])),
        (ValueError, lambda: fd.SGD([{"lr": 0.1}])),
        (ValueError, lambda: fd.SGD([a], lr=-1.0)),
        (ValueError, lambda: fd.SGD([a], momentum=1.0)),
        (ValueError, lambda: fd.SGD([a], nesterov=True)),
        (ValueError, lambda: fd.RMSprop([a], alpha=1.5)),
        (ValueError, lambda: fd.Adam([a], betas=(1.0, 0.9))),
        (TypeError, lambda: fd.Adam([a], fused=True)),
        (ValueError, lambda: fd.Adam([a], backend="gpu")),
        (ValueError, lambda: fd.Adam([a], n_threads=0)),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
