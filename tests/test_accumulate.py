"""Gradient accumulation (``accumulate_steps=k``): a window of k micro-steps equals one
step on the mean of its gradients, bit for bit, for every rule, both dtypes, both
backends and thread counts; clipping and the guard act on the accumulated gradient;
state dicts and checkpoints resume an open window exactly; bad input changes nothing."""

import math

import numpy as np
import pytest

import fastdescent as fd
from fastdescent import _dispatch, reference
from fastdescent.optim.accumulate import Accumulation
from fastdescent.optim.checkpoint import CheckpointError
from fastdescent.rules import SPECS
from rule_cases import EXAMPLES, RICHEST, rule_shape
from support import DTYPES, assert_bitwise_equal, random_array

#: Odd sizes, an empty and a 2-D parameter, and one large enough that two threads
#: split it and each thread's part ends in a partial block of the fused step
#: (blocks of 2048 elements in chunks of 16384).
SHAPES = [(1,), (0,), (7,), (10, 13), (4097,), (40_001,)]
#: Unequal micro-step scales, cycled.
SCALES = (0.5, 1.25, 2.0, 0.75, 3.0, 1.0, 0.3)
WINDOWS = 4
BACKENDS = [("kernel", 1), ("kernel", 2), ("reference", 1)]


def make_params(rng, dtype, shapes=SHAPES, spec=None):
    """Random parameters of ``shapes`` (each in a shape the rule of ``spec`` takes)."""
    if spec is not None:
        shapes = [rule_shape(spec, s) for s in shapes]
    return [random_array(rng, math.prod(s), dtype).reshape(s) for s in shapes]


def make_windows(rng, params, k, windows=WINDOWS):
    """Per window, k micro-steps of (gradients, grad_scale): fresh data, unequal scales."""
    scales = iter(SCALES * (k * windows))
    return [[([random_array(rng, p.size, p.dtype).reshape(p.shape) for p in params], next(scales))
             for _ in range(k)] for _ in range(windows)]


def summed(window):
    """The accumulated gradient S of one window, summed in call order in NumPy."""
    grads, scale = window[0]
    total = [scale * g for g in grads]
    for grads, scale in window[1:]:
        total = [t + scale * g for t, g in zip(total, grads)]
    return total


def options_of(rule):
    return dict(rule.options, lr=rule.hyper["lr"])


def run_accumulating(cls, config, params, windows, k, *, flat=False, **options):
    """Step an accumulating optimizer through the windows; check what each call returns."""
    opt = cls([p.copy() for p in params], **config, accumulate_steps=k, flat=flat, **options)
    for t, window in enumerate(windows):
        for group in opt.param_groups:
            group["lr"] = config["lr"] * 0.9**t
        for j, (grads, scale) in enumerate(window):
            if flat:
                for view, g in zip(opt.grads, grads):
                    view[...] = g
                updated = opt.step(grad_scale=scale)
            else:
                updated = opt.step([g.copy() for g in grads], grad_scale=scale)
            assert updated == (j == k - 1)
            assert opt.pending_micro_steps == (j + 1) % k
    return opt


def run_plain(cls, config, params, windows, k, **options):
    """The expected result: a plain optimizer (reference backend) stepping on each
    window's sum with grad_scale 1/k."""
    opt = cls([p.copy() for p in params], **config, backend="reference", **options)
    for t, window in enumerate(windows):
        for group in opt.param_groups:
            group["lr"] = config["lr"] * 0.9**t
        opt.step(summed(window), grad_scale=1.0 / k)
    return opt


def assert_same_optimizer(actual, expected):
    for i, (a, b) in enumerate(zip(actual.params, expected.params)):
        assert_bitwise_equal(a, b, f"param {i}")
    assert actual.state.keys() == expected.state.keys()
    for i in expected.state:
        assert actual.state[i].keys() == expected.state[i].keys()
        for name, value in expected.state[i].items():
            if isinstance(value, np.ndarray):
                assert_bitwise_equal(actual.state[i][name], value, f"state[{i}][{name!r}]")
            else:
                assert actual.state[i][name] == value, f"state[{i}][{name!r}]"


@pytest.mark.parametrize("backend, n_threads", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_window_is_one_step_on_the_mean_gradient(rng, name, dtype, k, backend, n_threads):
    """Every rule: k micro-steps equal one step on S with grad_scale 1/k (S summed in
    call order), window after window, bit for bit."""
    rule = RICHEST[name]
    cls, config = fd.optim.CLASSES[rule.spec.title], options_of(rule)
    params = make_params(rng, dtype, spec=rule.spec)
    windows = make_windows(rng, params, k)
    actual = run_accumulating(cls, config, params, windows, k, backend=backend, n_threads=n_threads)
    if k == 1:  # no accumulation: the plain step on the scaled gradient
        expected = cls([p.copy() for p in params], **config, backend="reference")
        for t, [(grads, scale)] in enumerate(windows):
            for group in expected.param_groups:
                group["lr"] = config["lr"] * 0.9**t
            expected.step(grads, grad_scale=scale)
    else:
        expected = run_plain(cls, config, params, windows, k)
    assert_same_optimizer(actual, expected)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_every_example_flat_and_per_array(rng, example):
    """Every configuration of every rule, in a flat arena and per array, 2 threads."""
    rule = EXAMPLES[example]
    cls, config = fd.optim.CLASSES[rule.spec.title], options_of(rule)
    params = make_params(rng, np.float32, spec=rule.spec)
    windows = make_windows(rng, params, 3, windows=2)
    expected = run_plain(cls, config, params, windows, 3)
    for flat in (False, True):
        actual = run_accumulating(cls, config, params, windows, 3, flat=flat, n_threads=2)
        assert_same_optimizer(actual, expected)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("name", sorted(name for name, spec in SPECS.items() if spec.runner is None))
def test_the_unfused_path_gives_the_same_result(rng, monkeypatch, name, backend):
    """The path of rules with a runner (the sum completed in the accumulators, then
    a plain step) equals the fused one, for every rule that takes the fused one
    (scalar states included: NAdam's mu_product, ASGD's eta and mu)."""
    rule = RICHEST[name]
    cls, config = fd.optim.CLASSES[rule.spec.title], options_of(rule)
    params = make_params(rng, np.float64)
    windows = make_windows(rng, params, 3)
    fused = run_accumulating(cls, config, params, windows, 3, backend=backend, n_threads=2)
    monkeypatch.setattr(Accumulation, "fused", lambda self, opt: False)
    unfused = run_accumulating(cls, config, params, windows, 3, backend=backend, n_threads=2)
    assert_same_optimizer(unfused, fused)
    assert_same_optimizer(fused, run_plain(cls, config, params, windows, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(clip_grad_norm=0.5), dict(clip_grad_value=0.02),
                                     dict(clip_grad_norm=2.0, clip_grad_value=0.05, skip_nonfinite=True)])
def test_clipping_applies_to_the_accumulated_gradient(rng, dtype, options):
    params = make_params(rng, dtype)
    windows = make_windows(rng, params, 3)
    config = dict(lr=1e-2)
    actual = run_accumulating(fd.Adam, config, params, windows, 3, n_threads=2, **options)
    expected = run_plain(fd.Adam, config, params, windows, 3, **options)
    assert_same_optimizer(actual, expected)
    assert actual.last_grad_norm == expected.last_grad_norm


@pytest.mark.parametrize("bad_call", [0, 2])
def test_the_guard_skips_a_window_with_a_non_finite_gradient(rng, bad_call):
    """A NaN in any micro-step: the window's step is skipped and discarded (the
    user's gradients untouched), the next window starts afresh."""
    params = make_params(rng, np.float32)
    windows = make_windows(rng, params, 3, windows=3)
    windows[1][bad_call][0][4][5] = np.nan
    opt = fd.Adam([p.copy() for p in params], lr=1e-2, accumulate_steps=3, skip_nonfinite=True)
    results = []
    for window in windows:
        for grads, scale in window:
            results.append(opt.step(grads, grad_scale=scale))
    assert results == [False, False, True, False, False, False, False, False, True]
    assert opt.skipped_steps == 1 and opt.pending_micro_steps == 0
    assert np.isnan(windows[1][bad_call][0][4][5])
    expected = fd.Adam([p.copy() for p in params], lr=1e-2, backend="reference", skip_nonfinite=True)
    for window in (windows[0], windows[2]):
        expected.step(summed(window), grad_scale=1 / 3)
    assert_same_optimizer(opt, expected)


def test_micro_steps_touch_neither_parameters_nor_state(rng):
    params = make_params(rng, np.float64)
    opt = fd.Adam(params, lr=1e-2, accumulate_steps=4)
    before = [p.copy() for p in params]
    for grads, scale in make_windows(rng, params, 4, windows=1)[0][:3]:
        assert opt.step(grads, grad_scale=scale) is False
    assert opt.pending_micro_steps == 3 and not opt.state
    for p, b in zip(params, before):
        assert_bitwise_equal(p, b)


# ------------------------------------------------------------------ resuming
def open_window(rng, k=3, flat=False, dtype=np.float32):
    """An accumulating Adam one window and two micro-steps in, its parameters, the
    windows it takes, and how far it got."""
    params = make_params(rng, dtype)
    windows = make_windows(rng, params, k, windows=3)
    opt = fd.Adam([p.copy() for p in params], lr=1e-2, accumulate_steps=k, flat=flat, n_threads=2)
    calls = [call for window in windows for call in window]
    for grads, scale in calls[:k + 2]:
        opt.step(grads, grad_scale=scale)
    return opt, params, calls, k + 2


def finish(opt, calls, start):
    for grads, scale in calls[start:]:
        opt.step(grads, grad_scale=scale)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("how", ["state_dict", "checkpoint"])
def test_a_resumed_run_continues_mid_window(rng, tmp_path, how, flat):
    opt, params, calls, done = open_window(rng, flat=flat)
    assert opt.pending_micro_steps == 2
    resumed = fd.Adam([p.copy() for p in params], lr=1e-2, accumulate_steps=3, flat=flat)
    if how == "checkpoint":
        opt.save(tmp_path / "ckpt.npz")
        resumed.load(tmp_path / "ckpt.npz")
    else:
        sd = opt.state_dict()
        assert sd["accumulation"]["pending"] == 2 and len(sd["accumulation"]["grads"]) == len(params)
        resumed.load_state_dict(sd)
        for i, p in enumerate(opt.params):
            resumed.params[i][...] = p
    assert resumed.pending_micro_steps == 2
    finish(opt, calls, done)
    finish(resumed, calls, done)
    assert_same_optimizer(resumed, opt)


def test_a_state_dict_without_a_window_loads_as_none_pending(rng, tmp_path):
    opt, params, calls, done = open_window(rng)
    closed = fd.Adam([p.copy() for p in params], lr=1e-2, accumulate_steps=3)
    finish(closed, calls, 3)  # two whole windows, none open
    assert "accumulation" not in closed.state_dict()
    closed.save(tmp_path / "closed.npz")
    opt.load(tmp_path / "closed.npz")
    assert opt.pending_micro_steps == 0
    assert_same_optimizer(opt, closed)
    finish(opt, calls, 6)
    finish(closed, calls, 6)
    assert_same_optimizer(opt, closed)


def corrupt(sd, change):
    accumulation = sd["accumulation"]
    if change == "pending":
        accumulation["pending"] = 3
    elif change == "pending-bool":
        accumulation["pending"] = True
    elif change == "steps":
        accumulation["steps"] = 4
    elif change == "dtype":
        accumulation["grads"][3] = accumulation["grads"][3].astype(np.float64)
    elif change == "shape":
        accumulation["grads"][3] = accumulation["grads"][3].reshape(-1)
    elif change == "missing":
        del accumulation["grads"][2]
    elif change == "extra-index":
        accumulation["grads"][99] = accumulation["grads"][0]
    elif change == "extra-key":
        accumulation["note"] = 1
    elif change == "not-a-dict":
        sd["accumulation"] = [1, 2]
    return sd


@pytest.mark.parametrize("change", ["pending", "pending-bool", "steps", "dtype", "shape", "missing",
                                    "extra-index", "extra-key", "not-a-dict"])
def test_a_bad_window_in_a_state_dict_changes_nothing(rng, tmp_path, change):
    opt, params, calls, done = open_window(rng)
    other, _, _, _ = open_window(np.random.default_rng(7))
    before = opt.state_dict()
    with pytest.raises((TypeError, ValueError)):
        opt.load_state_dict(corrupt(other.state_dict(), change))
    path = tmp_path / "bad.npz"
    fd.optim.checkpoint.save(path, "Adam", corrupt(other.state_dict(), change), other.params)
    with pytest.raises(CheckpointError):
        opt.load(path)
    after = opt.state_dict()
    assert after["accumulation"]["pending"] == 2
    for i, acc in before["accumulation"]["grads"].items():
        assert_bitwise_equal(after["accumulation"]["grads"][i], acc)
    for i in before["state"]:
        for name, value in before["state"][i].items():
            if isinstance(value, np.ndarray):
                assert_bitwise_equal(after["state"][i][name], value)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("k, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError),
                                      ("2", TypeError), (None, TypeError), (2.0, TypeError)])
def test_bad_accumulate_steps_are_refused(rng, k, error):
    params = make_params(rng, np.float32)
    with pytest.raises(error, match="accumulate_steps"):
        fd.Adam(params, accumulate_steps=k)
    opt = fd.Adam(params, accumulate_steps=np.int64(3))
    assert opt.accumulate_steps == 3
    with pytest.raises(error, match="accumulate_steps"):
        opt.accumulate_steps = k
    assert opt.accumulate_steps == 3


def test_what_a_window_refuses_changes_nothing(rng):
    opt, params, calls, done = open_window(rng)
    before = opt.state_dict()
    grads, scale = calls[done]
    with pytest.raises(ValueError, match="accumulate_steps"):
        opt.accumulate_steps = 2
    with pytest.raises(ValueError, match="group"):
        opt.step(grads, 0, grad_scale=scale)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [np.ones(3, np.float32)]})
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grads, grad_scale=0.0)
    with pytest.raises(ValueError):
        opt.step(grads[:-1], grad_scale=scale)
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([opt.params[0], *grads[1:]], grad_scale=scale)
    wrong = list(grads)
    wrong[2] = grads[2].astype(np.float64)
    with pytest.raises(TypeError):
        opt.step(wrong, grad_scale=scale)
    after = opt.state_dict()
    assert opt.accumulate_steps == 3 and after["accumulation"]["pending"] == 2 and len(opt.param_groups) == 1
    for i, acc in before["accumulation"]["grads"].items():
        assert_bitwise_equal(after["accumulation"]["grads"][i], acc)
    # Nothing was lost: the window finishes as if nothing had been tried.
    finish(opt, calls, done)
    plain = fd.Adam([p.copy() for p in params], lr=1e-2, backend="reference")
    for w in range(3):
        plain.step(summed(calls[3 * w:3 * w + 3]), grad_scale=1 / 3)
    assert_same_optimizer(opt, plain)


def test_a_micro_step_refuses_bad_gradients_before_writing(rng):
    """A bad gradient in the last micro-step (and in a middle one) leaves the window as it was."""
    opt, params, calls, done = open_window(rng)
    grads, scale = calls[done]
    bad = list(grads)
    bad[4] = grads[4][:-1]
    before = opt.state_dict()
    with pytest.raises(ValueError):
        opt.step(bad, grad_scale=scale)  # the last micro-step
    assert opt.pending_micro_steps == 2
    assert_bitwise_equal(opt.state_dict()["accumulation"]["grads"][5], before["accumulation"]["grads"][5])


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_step_accumulated_needs_exactly_the_rule_call(rng, backend):
    kernels = _dispatch.kernels if backend == "kernel" else reference
    acc, g, p = (random_array(rng, 10, np.float32) for _ in range(3))
    if backend == "kernel":
        with pytest.raises(RuntimeError, match="no kernel call"):
            kernels.step_accumulated(lambda ps, gs: None, [p], [g], [acc], grad_scale=1.0, n_threads=1)
    with pytest.raises(ValueError):
        kernels.step_accumulated(lambda ps, gs: None, [p], [g], [acc, acc], grad_scale=1.0, n_threads=1)


def test_threads_splitting_every_tensor_anywhere(rng, tiny_parts):
    """Threads cut even tiny tensors (1-element chunks, stolen in any order): the
    fused step still equals the plain one."""
    params = make_params(rng, np.float32)
    windows = make_windows(rng, params, 3, windows=2)
    actual = run_accumulating(fd.AdamW, dict(lr=1e-2), params, windows, 3, n_threads=2)
    assert_same_optimizer(actual, run_plain(fd.AdamW, dict(lr=1e-2), params, windows, 3))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_the_accumulators_are_zero_between_windows(rng, monkeypatch, backend, fused):
    if not fused:
        monkeypatch.setattr(Accumulation, "fused", lambda self, opt: False)
    for flat in (False, True):
        params = make_params(rng, np.float64)
        opt = run_accumulating(fd.Lion, dict(lr=1e-3), params, make_windows(rng, params, 2, windows=1), 2,
                               flat=flat, backend=backend, n_threads=2)
        accumulated = [a for arrays, arena in opt._accumulation._arrays.values() for a in arrays]
        assert len(accumulated) == len(params) and not any(a.any() for a in accumulated)


def test_accumulate_steps_can_change_between_windows(rng):
    """k = 3, then plain steps, then k = 2: each part as its own optimizer would step."""
    params = make_params(rng, np.float32)
    windows = make_windows(rng, params, 3, windows=1) + make_windows(rng, params, 1, windows=2)
    windows += make_windows(rng, params, 2, windows=2)
    opt = fd.Adam([p.copy() for p in params], lr=1e-2, accumulate_steps=3)
    expected = fd.Adam([p.copy() for p in params], lr=1e-2, backend="reference")
    for window in windows:
        opt.accumulate_steps = len(window)
        for grads, scale in window:
            opt.step(grads, grad_scale=scale)
        if len(window) == 1:
            expected.step(window[0][0], grad_scale=window[0][1])
        else:
            expected.step(summed(window), grad_scale=1 / len(window))
    assert_same_optimizer(opt, expected)


def mixed_groups(rng):
    """Two groups with their own rates, each mixing float32 and float64 parameters
    (four buckets, their positions interleaved)."""
    shapes = [(5,), (40_001,), (3, 4), (1,), (4097,)]
    dtypes = [np.float32, np.float64, np.float32, np.float64, np.float32]
    params = [random_array(rng, math.prod(s), d).reshape(s) for s, d in zip(shapes, dtypes)]
    return params, lambda ps: [{"params": ps[:3], "lr": 1e-2}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.1}]


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_groups_of_mixed_dtypes_and_a_resume(rng, tmp_path, backend, flat):
    params, groups = mixed_groups(rng)
    calls = [call for window in make_windows(rng, params, 3, windows=3) for call in window]
    expected = fd.Adam(groups([p.copy() for p in params]), backend="reference")
    for w in range(3):
        expected.step(summed(calls[3 * w:3 * w + 3]), grad_scale=1 / 3)
    opt = fd.Adam(groups([p.copy() for p in params]), accumulate_steps=3, flat=flat, backend=backend, n_threads=2)
    for grads, scale in calls[:4]:
        opt.step(grads, grad_scale=scale)
    opt.save(tmp_path / "mixed.npz")
    resumed = fd.Adam(groups([p.copy() for p in params]), accumulate_steps=3, flat=flat, backend=backend,
                      n_threads=2)
    resumed.load(tmp_path / "mixed.npz")
    for grads, scale in calls[4:]:
        resumed.step(grads, grad_scale=scale)
    assert_same_optimizer(resumed, expected)


def test_optimizers_in_two_threads_at_once(rng):
    """Each Python thread's fused step finishes its own accumulation (thread-local)."""
    import threading

    params = make_params(rng, np.float32)
    runs = [make_windows(rng, params, 2, windows=6) for _ in range(2)]
    results = [None, None]

    def train(i):
        results[i] = run_accumulating(fd.Adam, dict(lr=1e-2), params, runs[i], 2, n_threads=2)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert_same_optimizer(results[i], run_plain(fd.Adam, dict(lr=1e-2), params, runs[i], 2))


@pytest.mark.parametrize("state_dtype, rounding", [("bfloat16", None), ("int8", "stochastic")])
@pytest.mark.parametrize("backend, n_threads", BACKENDS)
def test_low_precision_state_steps_on_the_completed_sum(rng, state_dtype, rounding, backend, n_threads):
    """float32 parameters with bfloat16 or int8 state: the last micro-step completes S
    first (the stored pass is not fused with the sum), then equals the plain step."""
    rule = RICHEST["adam"]
    cls, config = fd.optim.CLASSES[rule.spec.title], options_of(rule)
    storage = dict(state_dtype=state_dtype, rounding=rounding, seed=7 if rounding else None)
    params = make_params(rng, np.float32)
    windows = make_windows(rng, params, 3)
    actual = run_accumulating(cls, config, params, windows, 3, backend=backend, n_threads=n_threads, **storage)
    assert_same_optimizer(actual, run_plain(cls, config, params, windows, 3, **storage))


def test_half_precision_parameters_refuse_accumulation(rng):
    """bfloat16 parameters (with a float32 master copy): accumulate_steps > 1 raises
    TypeError at the first micro-step, before anything is written."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p = random_array(rng, 33, np.float32).astype(ml_dtypes.bfloat16)
    opt = fd.Adam([p], lr=1e-3, master_weights=True, accumulate_steps=2)
    before = p.copy()
    with pytest.raises(TypeError, match="accumulate_steps > 1 needs float32 or float64"):
        opt.step([random_array(rng, 33, np.float32).astype(ml_dtypes.bfloat16)])
    assert opt.pending_micro_steps == 0 and np.array_equal(p.view(np.uint16), before.view(np.uint16))
