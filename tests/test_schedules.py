import math
from types import SimpleNamespace

import numpy as np
import pytest

import fastdescent as fd
from fastdescent import schedules as S

# One instance of every schedule, for the properties all of them share.
EXAMPLES = {
    "constant": S.constant(0.3),
    "step_decay": S.step_decay(0.1, 7, 0.5),
    "multi_step": S.multi_step(0.1, [5, 12, 30], 0.3),
    "exponential": S.exponential(0.1, 0.93),
    "inverse_time": S.inverse_time(0.1, 0.05, power=0.75),
    "polynomial": S.polynomial(0.1, 40, power=2.0, end_value=0.001),
    "linear": S.linear(0.5, 0.9, 25),
    "cosine": S.cosine(0.1, 40, eta_min=0.002),
    "cosine_warm_restarts": S.cosine_warm_restarts(0.1, 5, T_mult=2, eta_min=0.001),
    "cyclic": S.cyclic(0.01, 0.1, step_size_up=6, step_size_down=3, mode="triangular2"),
    "one_cycle": S.one_cycle(0.1, 50, pct_start=0.3, three_phase=True),
    "swa_anneal": S.swa_anneal(0.1, 0.02, anneal_steps=8),
    "swa_cyclic": S.swa_cyclic(0.05, 0.001, 6),
    "warmup": S.warmup(S.cosine(0.1, 30), 10, start_value=0.001),
    "join": S.join([S.constant(0.1), S.exponential(0.05, 0.9), S.linear(0.01, 0.0, 5)], [10, 20]),
    "from_function": S.from_function(lambda t: 0.1 / (1 + t) ** 0.5),
}


def exact(value):
    return pytest.approx(value, rel=1e-13, abs=1e-15)


# ---------------------------------------------------------------- closed forms


def test_constant():
    s = S.constant(0.3)
    assert [s(0), s(7), s(10**9)] == [0.3, 0.3, 0.3]


def test_step_decay():
    s = S.step_decay(1.0, 3, 0.5)
    assert [s(t) for t in (0, 2, 3, 5, 6, 9)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_multi_step():
    s = S.multi_step(2.0, [2, 5], 0.1)
    assert [s(t) for t in (0, 1, 2, 4, 5, 100)] == [2.0, 2.0, exact(0.2), exact(0.2), exact(0.02), exact(0.02)]


def test_exponential_decays_and_grows():
    assert S.exponential(0.5, 0.9)(3) == exact(0.5 * 0.9**3)
    assert S.exponential(1e-6, 1.5)(10) == exact(1e-6 * 1.5**10)


def test_inverse_time():
    assert S.inverse_time(1.0, 0.5)(4) == exact(1 / 3)
    assert S.inverse_time(1.0, 0.5, power=0.5)(4) == exact(1 / math.sqrt(3))


def test_polynomial():
    s = S.polynomial(1.0, 10, power=2.0, end_value=0.1)
    assert [s(0), s(5), s(10), s(20)] == [1.0, exact(0.1 + 0.9 * 0.25), exact(0.1), exact(0.1)]


def test_linear_anneals_momentum():
    s = S.linear(0.5, 0.9, 4)
    assert [s(t) for t in (0, 1, 2, 4, 8)] == [0.5, exact(0.6), exact(0.7), exact(0.9), exact(0.9)]


def test_cosine_with_floor():
    s = S.cosine(1.0, 10, eta_min=0.1)
    assert [s(0), s(5), s(10), s(15)] == [1.0, exact(0.55), exact(0.1), exact(0.1)]


@pytest.mark.parametrize("t, expected", [(0, 1.0), (5, 0.5), (9.999999, 0.0), (10, 1.0), (20, 0.5),
                                         (30, 1.0), (50, 0.5), (70, 1.0), (150, 1.0), (230, 0.5)])
def test_cosine_warm_restarts_periods_double(t, expected):
    """T_0 = 10, T_mult = 2: restarts at 10, 30, 70, 150, 310."""
    assert S.cosine_warm_restarts(1.0, 10, T_mult=2)(t) == pytest.approx(expected, abs=1e-9)


def test_cosine_warm_restarts_every_restart_is_exact():
    """The logarithm must not put a restart step into the previous period."""
    for T_0, T_mult in [(1, 2), (3, 3), (7, 5), (2, 10)]:
        starts = [T_0 * (T_mult**i - 1) // (T_mult - 1) for i in range(12)]
        values = S.cosine_warm_restarts(0.7, T_0, T_mult, eta_min=0.1)(np.array(starts))
        np.testing.assert_array_equal(values, 0.7)


def test_cyclic_modes():
    tri = S.cyclic(0.1, 1.0, step_size_up=4)
    assert [tri(t) for t in (0, 2, 4, 6, 8, 10)] == [exact(0.1), exact(0.55), exact(1.0), exact(0.55), exact(0.1),
                                                       exact(0.55)]
    tri2 = S.cyclic(0.1, 1.0, step_size_up=4, mode="triangular2")
    assert [tri2(4), tri2(12), tri2(20)] == [exact(1.0), exact(0.1 + 0.9 / 2), exact(0.1 + 0.9 / 4)]
    exp = S.cyclic(0.1, 1.0, step_size_up=4, mode="exp_range", gamma=0.9)
    assert exp(4) == exact(0.1 + 0.9 * 0.9**4)
    uneven = S.cyclic(0.0, 1.0, step_size_up=1, step_size_down=3)
    assert [uneven(t) for t in range(5)] == [0.0, 1.0, exact(2 / 3), exact(1 / 3), 0.0]


def test_cyclic_momentum_runs_opposite():
    lr = S.cyclic(0.01, 0.1, step_size_up=5)
    momentum = S.cyclic(0.95, 0.85, step_size_up=5)
    t = np.arange(30)
    rise = np.diff(lr(t)) > 0
    assert rise.any() and (~rise).any()
    np.testing.assert_array_equal(np.diff(momentum(t)) < 0, rise)


def test_one_cycle():
    s = S.one_cycle(1.0, 100, pct_start=0.25, anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0)
    assert [s(0), s(24), s(99), s(500)] == [exact(0.1), exact(1.0), exact(0.001), exact(0.001)]
    assert s(12) == exact(0.1 + 0.9 * 12 / 24)
    three = S.one_cycle(1.0, 100, pct_start=0.25, div_factor=10.0, final_div_factor=100.0, three_phase=True)
    assert [three(24), three(48), three(99)] == [exact(1.0), exact(0.1), exact(0.001)]
    momentum = S.one_cycle(0.85, 100, initial_value=0.95, final_value=0.95)
    assert [momentum(0), momentum(29), momentum(99)] == [exact(0.95), exact(0.85), exact(0.95)]


def test_warmup_then_schedule():
    s = S.warmup(S.exponential(1.0, 0.5), 4, start_value=0.2)
    assert [s(0), s(2), s(4), s(6)] == [exact(0.2), exact(0.6), 1.0, exact(0.25)]


def test_join_restarts_each_schedule_at_its_boundary():
    s = S.join([S.constant(1.0), S.exponential(1.0, 0.5), S.linear(0.3, 0.1, 2)], [3, 6])
    assert [s(t) for t in (0, 2, 3, 5, 6, 7, 8, 100)] == [1.0, 1.0, 1.0, 0.25, exact(0.3), exact(0.2), exact(0.1),
                                                           exact(0.1)]


def test_swa_anneal_and_cyclic():
    s = S.swa_anneal(1.0, 0.1, anneal_steps=10, anneal_strategy="linear")
    assert [s(0), s(5), s(10), s(11)] == [1.0, exact(0.55), exact(0.1), exact(0.1)]
    assert S.swa_anneal(1.0, 0.1, anneal_steps=0)(0) == 0.1
    c = S.swa_cyclic(1.0, 0.2, 4)
    assert [c(3), c(4), c(7)] == [exact(0.2), exact(0.8), exact(0.2)]


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_vectorized_equals_scalar(name):
    s = EXAMPLES[name]
    steps = np.arange(120)
    values = s(steps)
    assert values.dtype == np.float64 and values.shape == (120,)
    scalars = [s(int(t)) for t in steps]
    assert all(type(v) is float for v in scalars)
    np.testing.assert_array_equal(values, scalars)
    np.testing.assert_array_equal(s(steps.reshape(8, 15).astype(np.float32)), values.reshape(8, 15))
    assert s(np.int64(7)) == s(7.0) == values[7]
    assert len(set(values.tolist())) > 1 or name == "constant", "the schedule does not move"


@pytest.mark.parametrize("name", list(EXAMPLES))
@pytest.mark.parametrize("step", [-1, -0.5, float("nan"), float("inf")])
def test_bad_steps_raise(name, step):
    with pytest.raises(ValueError):
        EXAMPLES[name](step)
    with pytest.raises(ValueError):
        EXAMPLES[name](np.array([0.0, step]))


@pytest.mark.parametrize("step", [True, "3", None, np.array([True]), np.array(["1"])])
def test_non_numeric_steps_raise(step):
    with pytest.raises(TypeError):
        S.constant(1.0)(step)


BAD_ARGUMENTS = [
    (ValueError, lambda: S.step_decay(0.1, 0, 0.5)),
    (ValueError, lambda: S.step_decay(0.1, -3, 0.5)),
    (ValueError, lambda: S.step_decay(0.1, 3, 1.0)),
    (ValueError, lambda: S.step_decay(0.1, 3, 0.0)),
    (ValueError, lambda: S.multi_step(0.1, [5, 3], 0.5)),
    (ValueError, lambda: S.multi_step(0.1, [0, 3], 0.5)),
    (ValueError, lambda: S.multi_step(0.1, [3], 1.5)),
    (TypeError, lambda: S.multi_step(0.1, 3, 0.5)),
    (ValueError, lambda: S.exponential(0.1, 0.0)),
    (ValueError, lambda: S.exponential(float("nan"), 0.5)),
    (TypeError, lambda: S.exponential("0.1", 0.5)),
    (ValueError, lambda: S.inverse_time(0.1, -1.0)),
    (ValueError, lambda: S.polynomial(0.1, 0)),
    (ValueError, lambda: S.polynomial(0.1, 10, power=0.0)),
    (ValueError, lambda: S.linear(0.1, 0.2, -5)),
    (ValueError, lambda: S.cosine(0.1, 0)),
    (ValueError, lambda: S.cosine(0.1, 10, eta_min=float("inf"))),
    (ValueError, lambda: S.cosine_warm_restarts(0.1, 0)),
    (ValueError, lambda: S.cosine_warm_restarts(0.1, 10, T_mult=0)),
    (TypeError, lambda: S.cosine_warm_restarts(0.1, 10, T_mult=1.5)),
    (TypeError, lambda: S.cosine_warm_restarts(0.1, 10.0)),
    (ValueError, lambda: S.cyclic(0.1, 1.0, step_size_up=0)),
    (ValueError, lambda: S.cyclic(0.1, 1.0, step_size_down=-1)),
    (ValueError, lambda: S.cyclic(0.1, 1.0, mode="sine")),
    (ValueError, lambda: S.cyclic(0.1, 1.0, mode="exp_range", gamma=1.5)),
    (ValueError, lambda: S.one_cycle(0.1, 0)),
    (ValueError, lambda: S.one_cycle(0.1, 100, pct_start=1.0)),
    (ValueError, lambda: S.one_cycle(0.1, 100, pct_start=0.0)),
    (ValueError, lambda: S.one_cycle(0.1, 3, pct_start=0.3)),
    (ValueError, lambda: S.one_cycle(0.1, 100, div_factor=0.0)),
    (ValueError, lambda: S.one_cycle(0.1, 100, anneal_strategy="exp")),
    (ValueError, lambda: S.swa_anneal(0.1, 0.01, anneal_steps=-1)),
    (ValueError, lambda: S.swa_cyclic(0.1, 0.01, 0)),
    (ValueError, lambda: S.warmup(S.constant(1.0), 0)),
    (TypeError, lambda: S.warmup(lambda t: 1.0, 5)),
    (ValueError, lambda: S.join([S.constant(1.0), S.constant(2.0)], [])),
    (ValueError, lambda: S.join([S.constant(1.0), S.constant(2.0)], [-1])),
    (ValueError, lambda: S.join([S.constant(1.0)] * 3, [5, 5])),
    (TypeError, lambda: S.from_function(0.1)),
]


@pytest.mark.parametrize("index", range(len(BAD_ARGUMENTS)))
def test_invalid_arguments_raise(index):
    exception, call = BAD_ARGUMENTS[index]
    with pytest.raises(exception):
        call()


def test_from_function_gets_int_steps_and_checks_values():
    seen = []
    S.from_function(lambda t: seen.append(t) or 1.0)(np.array([0, 3]))
    assert seen == [0, 3] and all(type(t) is int for t in seen)
    with pytest.raises(ValueError):
        S.from_function(lambda t: float("nan"))(0)


def test_repr_names_the_arguments():
    assert repr(S.cosine(0.1, 10)) == "cosine(init_value=0.1, T_max=10.0, eta_min=0.0)"


# ---------------------------------------------------------------- Scheduler


def groups(*lrs, **extra):
    return SimpleNamespace(param_groups=[{"params": [], "lr": lr, **extra} for lr in lrs])


def test_scheduler_writes_step_zero_then_each_step():
    opt = groups(1.0, 1.0)
    sched = fd.Scheduler(opt, S.step_decay(0.4, 2, 0.5))
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(5):
        sched.step()
        seen.append(opt.param_groups[1]["lr"])
    assert seen == [0.4, 0.4, 0.2, 0.2, 0.1, 0.1]
    assert sched.last_step == 5 and sched.get_last_value() == [0.1, 0.1]


def test_scheduler_per_group_schedules_and_any_callable():
    opt = groups(1.0, 1.0)
    sched = fd.Scheduler(opt, [S.constant(0.3), lambda t: 0.1 / (t + 1)])
    sched.step()
    assert sched.get_last_value() == [0.3, 0.05]
    with pytest.raises(ValueError):
        fd.Scheduler(opt, [S.constant(0.3)])
    with pytest.raises(TypeError):
        fd.Scheduler(opt, [S.constant(0.3), 0.1])


@pytest.mark.parametrize("name", ["betas[0]", "beta1"])
def test_scheduler_drives_one_beta(name):
    opt = groups(0.1, 0.1, betas=(0.9, 0.999))
    sched = fd.Scheduler(opt, S.linear(0.85, 0.95, 10), name)
    for _ in range(5):
        sched.step()
    for group in opt.param_groups:
        assert group["betas"] == (pytest.approx(0.9), 0.999) and type(group["betas"]) is tuple
    fd.Scheduler(opt, S.constant(0.99), "beta2")
    assert opt.param_groups[0]["betas"][1] == 0.99


def test_scheduler_anneals_momentum_and_weight_decay_independently():
    opt = groups(0.1, momentum=0.0, weight_decay=0.0)
    lr = fd.Scheduler(opt, S.cosine(0.1, 100))
    mom = fd.Scheduler(opt, S.linear(0.5, 0.9, 100), "momentum")
    wd = fd.Scheduler(opt, S.constant(5e-4), "weight_decay")
    for _ in range(100):
        for s in (lr, mom, wd):
            s.step()
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (pytest.approx(0.0, abs=1e-15), pytest.approx(0.9), 5e-4)


@pytest.mark.parametrize("name", ["momentum", "betas[2]", "lr[0]", "params"])
def test_scheduler_rejects_a_missing_hyperparameter(name):
    with pytest.raises((ValueError, TypeError)):
        fd.Scheduler(groups(0.1, betas=(0.9, 0.99)), S.constant(0.1), name)


def test_scheduler_rejects_non_optimizers():
    with pytest.raises(TypeError):
        fd.Scheduler([{"lr": 0.1}], S.constant(0.1))
    with pytest.raises(TypeError):
        fd.Scheduler(groups(0.1), S.constant(0.1), 3)


def test_scheduler_state_round_trip_resumes_exactly():
    schedule = S.warmup(S.cosine_warm_restarts(0.1, 7, T_mult=2, eta_min=1e-3), 5)
    first = groups(0.1, 0.2)
    sched = fd.Scheduler(first, schedule)
    for _ in range(13):
        sched.step()
    state = sched.state_dict()
    second = groups(0.0, 0.0)
    resumed = fd.Scheduler(second, schedule)
    resumed.load_state_dict(state)
    assert resumed.get_last_value() == sched.get_last_value()
    for _ in range(20):
        sched.step()
        resumed.step()
        assert second.param_groups == first.param_groups
    with pytest.raises(ValueError):
        fd.Scheduler(groups(0.1), schedule).load_state_dict(state)


# ---------------------------------------------------------------- against torch.optim.lr_scheduler


def torch_lrs(make_scheduler, n, key="lr", optimizer="SGD", **opt_kwargs):
    """The values PyTorch's scheduler sets at steps 0..n-1 (step 0 = on construction)."""
    torch = pytest.importorskip("torch")
    opt = getattr(torch.optim, optimizer)([torch.zeros(2, requires_grad=True)], **opt_kwargs)
    sched = make_scheduler(torch.optim.lr_scheduler, opt)
    seen = []
    for _ in range(n):
        seen.append(Hyper(key).get(opt.param_groups[0]))
        opt.step()
        sched.step()
    return np.array(seen)


Hyper = S.Hyperparameter
LR = 0.1
TORCH_CASES = {
    "StepLR": (lambda m, o: m.StepLR(o, 7, gamma=0.5), S.step_decay(LR, 7, 0.5)),
    "MultiStepLR": (lambda m, o: m.MultiStepLR(o, [4, 9, 30], gamma=0.3), S.multi_step(LR, [4, 9, 30], 0.3)),
    "ExponentialLR": (lambda m, o: m.ExponentialLR(o, 0.95), S.exponential(LR, 0.95)),
    "PolynomialLR": (lambda m, o: m.PolynomialLR(o, total_iters=30, power=2.0), S.polynomial(LR, 30, power=2.0)),
    "LinearLR": (lambda m, o: m.LinearLR(o, start_factor=0.25, end_factor=0.8, total_iters=20),
                 S.linear(0.25 * LR, 0.8 * LR, 20)),
    "ConstantLR": (lambda m, o: m.ConstantLR(o, factor=0.5, total_iters=6),
                   S.join([S.constant(0.5 * LR), S.constant(LR)], [6])),
    "CosineAnnealingLR": (lambda m, o: m.CosineAnnealingLR(o, T_max=60, eta_min=0.002), S.cosine(LR, 60, 0.002)),
    "CosineAnnealingWarmRestarts": (lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=1e-3),
                                    S.cosine_warm_restarts(LR, 3, 2, 1e-3)),
    "CosineAnnealingWarmRestarts-mult1": (lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=7, eta_min=1e-3),
                                          S.cosine_warm_restarts(LR, 7, 1, 1e-3)),
    "CyclicLR-triangular": (lambda m, o: m.CyclicLR(o, 0.01, 0.1, step_size_up=5, step_size_down=8,
                                                    cycle_momentum=False),
                            S.cyclic(0.01, 0.1, 5, 8)),
    "CyclicLR-triangular2": (lambda m, o: m.CyclicLR(o, 0.01, 0.1, step_size_up=4, mode="triangular2",
                                                     cycle_momentum=False),
                             S.cyclic(0.01, 0.1, 4, mode="triangular2")),
    "CyclicLR-exp_range": (lambda m, o: m.CyclicLR(o, 0.01, 0.1, step_size_up=4, mode="exp_range", gamma=0.97,
                                                   cycle_momentum=False),
                           S.cyclic(0.01, 0.1, 4, mode="exp_range", gamma=0.97)),
    "OneCycleLR": (lambda m, o: m.OneCycleLR(o, max_lr=0.5, total_steps=60, cycle_momentum=False),
                   S.one_cycle(0.5, 60)),
    "OneCycleLR-linear-3phase": (lambda m, o: m.OneCycleLR(o, max_lr=0.5, total_steps=60, pct_start=0.2,
                                                           anneal_strategy="linear", three_phase=True,
                                                           div_factor=10.0, final_div_factor=50.0,
                                                           cycle_momentum=False),
                                 S.one_cycle(0.5, 60, pct_start=0.2, anneal_strategy="linear", three_phase=True,
                                             div_factor=10.0, final_div_factor=50.0)),
    "SequentialLR-warmup-cosine": (lambda m, o: m.SequentialLR(o, [m.LinearLR(o, start_factor=0.1, total_iters=5),
                                                                   m.CosineAnnealingLR(o, T_max=55)], milestones=[5]),
                                   S.warmup(S.cosine(LR, 55), 5, start_value=0.1 * LR)),
    "SWALR-cos": (lambda m, o: __import__("torch").optim.swa_utils.SWALR(o, swa_lr=0.02, anneal_epochs=9),
                  S.swa_anneal(LR, 0.02, 9)),
    "SWALR-linear": (lambda m, o: __import__("torch").optim.swa_utils.SWALR(o, swa_lr=0.02, anneal_epochs=4,
                                                                            anneal_strategy="linear"),
                     S.swa_anneal(LR, 0.02, 4, "linear")),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_matches_torch_lr_scheduler(name):
    make, schedule = TORCH_CASES[name]
    n = 60
    expected = torch_lrs(make, n, lr=LR)
    np.testing.assert_allclose(schedule(np.arange(n)), expected, rtol=1e-12, atol=1e-16)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cosine_matches_torch_only_up_to_T_max():
    """Past T_max PyTorch's cosine climbs back up; ours stays at the floor."""
    expected = torch_lrs(lambda m, o: m.CosineAnnealingLR(o, T_max=10, eta_min=0.01), 15, lr=LR)
    ours = S.cosine(LR, 10, 0.01)(np.arange(15))
    np.testing.assert_allclose(ours[:11], expected[:11], rtol=1e-12)
    assert ours[14] == 0.01 < expected[14]


@pytest.mark.parametrize("optimizer, key, kwargs", [("SGD", "momentum", dict(momentum=0.9)),
                                                    ("Adam", "beta1", dict())])
def test_cyclic_momentum_matches_torch(optimizer, key, kwargs):
    """PyTorch's cycle_momentum: the momentum (or beta1) moves opposite to the rate."""
    make = lambda m, o: m.CyclicLR(o, 0.01, 0.1, step_size_up=5, mode="triangular2", base_momentum=0.8,
                                   max_momentum=0.95)
    expected = torch_lrs(make, 40, key=key, optimizer=optimizer, lr=LR, **kwargs)
    ours = S.cyclic(0.95, 0.8, 5, mode="triangular2")(np.arange(40))
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_momentum_matches_torch(three_phase):
    make = lambda m, o: m.OneCycleLR(o, max_lr=0.5, total_steps=50, three_phase=three_phase)
    expected = torch_lrs(make, 50, key="momentum", momentum=0.9, lr=LR)
    ours = S.one_cycle(0.85, 50, initial_value=0.95, final_value=0.95, three_phase=three_phase)
    np.testing.assert_allclose(ours(np.arange(50)), expected, rtol=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_scheduler_on_a_torch_optimizer_steps_like_torch():
    """Our Scheduler drives any param_groups, so it can be compared step for step."""
    torch = pytest.importorskip("torch")
    ours = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR, momentum=0.9)
    theirs = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR, momentum=0.9)
    mine = fd.Scheduler(ours, S.cosine_warm_restarts(LR, 4, 2, 1e-4))
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(theirs, 4, 2, 1e-4)
    for _ in range(40):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
        mine.step()
        theirs.step()
        ref.step()
