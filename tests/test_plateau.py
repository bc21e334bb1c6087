from types import SimpleNamespace

import numpy as np
import pytest

import fastdescent as fd
from fastdescent import schedules as S


def groups(*lrs):
    return SimpleNamespace(param_groups=[{"params": [], "lr": lr} for lr in lrs])


def scripted_losses(rng, n=120):
    """A noisy loss that falls, stalls on plateaus, spikes and has a NaN: every branch."""
    t = np.arange(n)
    loss = 2.0 * np.exp(-t / 15) + 0.3 + 0.05 * rng.standard_normal(n)
    loss[40:70] = loss[40] + 0.01 * rng.standard_normal(30)  # a plateau
    loss[80] = np.nan
    loss[90] = 10.0
    return loss


# ---------------------------------------------------------------- ReduceLROnPlateau vs PyTorch

PLATEAU_CONFIGS = {
    "defaults": dict(),
    "patience0": dict(patience=0, factor=0.5),
    "abs-cooldown": dict(patience=2, threshold=0.02, threshold_mode="abs", cooldown=3, factor=0.7),
    "max": dict(mode="max", patience=3, factor=0.3),
    "max-abs": dict(mode="max", patience=1, threshold=0.01, threshold_mode="abs", cooldown=1),
    "floors": dict(patience=1, factor=0.2, min_lr=[1e-3, 0.05]),
    "big-eps": dict(patience=1, factor=0.9, eps=5e-3, min_lr=1e-3),
}


@pytest.mark.parametrize("name", list(PLATEAU_CONFIGS))
def test_plateau_decisions_match_torch(name, rng):
    torch = pytest.importorskip("torch")
    config = PLATEAU_CONFIGS[name]
    losses = scripted_losses(rng)
    if config.get("mode") == "max":
        losses = -losses
    params = [torch.zeros(1, requires_grad=True)]
    theirs = torch.optim.SGD([{"params": params, "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 0.3}])
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(theirs, **config)
    ours = groups(0.1, 0.3)
    plateau = fd.ReduceLROnPlateau(ours, **config)
    reductions = 0
    for loss in losses:
        before = [g["lr"] for g in ours.param_groups]
        reduced = plateau.step(loss)
        reference.step(loss)
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]
        assert reduced == ([g["lr"] for g in ours.param_groups] != before)
        assert (plateau.best, plateau.num_bad_epochs, plateau.cooldown_counter) == (
            pytest.approx(reference.best, nan_ok=True), reference.num_bad_epochs, reference.cooldown_counter)
        reductions += reduced
    assert reductions >= 1, "the script should trigger reductions"


def test_plateau_patience_counts_by_hand():
    opt = groups(1.0)
    plateau = fd.ReduceLROnPlateau(opt, factor=0.5, patience=2, threshold=0.0)
    decisions = [plateau.step(x) for x in [5, 4, 4, 4, 4, 3, 3, 3, 3]]
    # Reduced at the third evaluation in a row without improvement.
    assert decisions == [False, False, False, False, True, False, False, False, True]
    assert opt.param_groups[0]["lr"] == 0.25


def test_plateau_reduces_a_schedule_after_its_warm_up():
    """A plateau rule composed with a warm-up: the schedule keeps running, scaled."""
    opt = groups(0.0)
    sched = fd.Scheduler(opt, S.warmup(S.constant(0.1), 4))
    plateau = fd.ReduceLROnPlateau(sched, factor=0.5, patience=0, min_lr=0.03)
    lrs = []
    for loss in [9, 8, 7, 6, 6, 5, 5, 5]:
        sched.step()
        plateau.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [pytest.approx(v) for v in [0.025, 0.05, 0.075, 0.1, 0.05, 0.05, 0.03, 0.03]]
    assert sched.scale == [0.25]


def test_plateau_floor_does_not_lift_the_schedule_itself():
    """Reductions stop at min_lr, but a schedule that goes lower still does."""
    opt = groups(0.0)
    sched = fd.Scheduler(opt, S.linear(0.1, 0.0, 10))
    plateau = fd.ReduceLROnPlateau(sched, factor=0.1, patience=0, min_lr=0.05)
    plateau.step(1.0)
    plateau.step(1.0)  # reduced: max(0.1 * 0.1, min(0.05, 0.1)) = 0.05
    assert opt.param_groups[0]["lr"] == 0.05
    for _ in range(10):
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0


def test_plateau_on_a_scheduler_of_another_hyperparameter():
    opt = SimpleNamespace(param_groups=[{"params": [], "lr": 0.1, "weight_decay": 0.0}])
    wd = fd.Scheduler(opt, S.constant(1e-3), "weight_decay")
    plateau = fd.ReduceLROnPlateau(wd, patience=0, factor=0.5, eps=0.0)
    plateau.step(1.0)
    plateau.step(1.0)
    assert opt.param_groups[0] == {"params": [], "lr": 0.1, "weight_decay": 5e-4}


def test_plateau_state_round_trip(rng):
    losses = scripted_losses(rng)
    config = dict(patience=1, cooldown=2, factor=0.5)
    opt_a, opt_b = groups(0.1), groups(0.1)
    a = fd.ReduceLROnPlateau(opt_a, **config)
    for loss in losses[:50]:
        a.step(loss)
    b = fd.ReduceLROnPlateau(opt_b, **config)
    b.load_state_dict(a.state_dict())
    opt_b.param_groups[0]["lr"] = opt_a.param_groups[0]["lr"]  # the optimizer's own checkpoint holds the rate
    for loss in losses[50:]:
        assert a.step(loss) == b.step(loss)
        assert opt_a.param_groups == opt_b.param_groups
        assert a.state_dict() == b.state_dict()


PLATEAU_BAD = [
    (ValueError, dict(factor=1.0)),
    (ValueError, dict(factor=0.0)),
    (ValueError, dict(factor=1.5)),
    (ValueError, dict(patience=-1)),
    (TypeError, dict(patience=1.5)),
    (ValueError, dict(cooldown=-1)),
    (ValueError, dict(mode="avg")),
    (ValueError, dict(threshold_mode="pct")),
    (ValueError, dict(threshold=-1e-4)),
    (ValueError, dict(min_lr=-1.0)),
    (ValueError, dict(min_lr=[0.0, 0.0])),
    (ValueError, dict(eps=-1.0)),
]


@pytest.mark.parametrize("exception, kwargs", PLATEAU_BAD)
def test_plateau_bad_arguments_raise(exception, kwargs):
    with pytest.raises(exception):
        fd.ReduceLROnPlateau(groups(0.1), **kwargs)


def test_plateau_rejects_bad_targets_and_metrics():
    with pytest.raises(TypeError):
        fd.ReduceLROnPlateau([{"lr": 0.1}])
    with pytest.raises(ValueError):
        fd.ReduceLROnPlateau(SimpleNamespace(param_groups=[{"params": []}]))
    with pytest.raises(TypeError):
        fd.ReduceLROnPlateau(groups(0.1)).step("loss")


# ---------------------------------------------------------------- EarlyStopping


def stop_index(stopper, metrics):
    for i, m in enumerate(metrics):
        if stopper.step(m):
            return i
    return None


def test_early_stopping_patience():
    metrics = [5.0, 4.0, 4.5, 4.2, 3.9, 4.0, 4.1, 4.0, 3.95, 3.0]
    assert stop_index(fd.EarlyStopping(patience=3), metrics) == 7
    assert stop_index(fd.EarlyStopping(patience=0), metrics) == 2
    assert stop_index(fd.EarlyStopping(patience=4), metrics) == 8
    assert stop_index(fd.EarlyStopping(patience=5), metrics) is None


def test_early_stopping_min_delta_and_max_mode():
    metrics = [1.0, 0.9, 0.87, 0.86, 0.84]  # improvements shrink below 0.05
    stopper = fd.EarlyStopping(patience=2, min_delta=0.05)
    assert stop_index(stopper, metrics) == 3 and stopper.best == 0.9 and stopper.best_epoch == 2
    accuracy = [0.5, 0.6, 0.7, 0.69, 0.7, float("nan")]
    assert stop_index(fd.EarlyStopping(mode="max", patience=3), accuracy) == 5


def test_early_stopping_stays_stopped():
    stopper = fd.EarlyStopping(patience=0)
    assert [stopper.step(m) for m in [1.0, 2.0, 0.5]] == [False, True, True]


def test_early_stopping_waits_for_the_rate_to_reach_its_floor():
    """Reduce on each plateau; stop after `patience` stale evaluations at the floor."""
    opt = groups(0.1)
    plateau = fd.ReduceLROnPlateau(opt, factor=0.1, patience=2, min_lr=1e-4)
    stopper = fd.EarlyStopping(opt, patience=2, min_lr=1e-4)
    lrs = []
    for epoch in range(100):
        loss = 1.0 if epoch >= 3 else 3.0 - epoch  # stalls from epoch 3
        lrs.append(opt.param_groups[0]["lr"])  # the rate this loss was measured with
        if stopper.step(loss):
            break
        plateau.step(loss)
    # Reduced after 5, 8, 11 (0.1 -> 1e-4, a few ulps above); two stale evaluations at the floor.
    assert lrs[-1] == pytest.approx(1e-4) and lrs[-4] > 2e-4
    assert epoch == 13


def test_early_stopping_restores_the_best_parameters_in_place(rng):
    w = [rng.standard_normal(5), rng.standard_normal((2, 3)).astype(np.float32)]
    opt = SimpleNamespace(param_groups=[{"params": [w[0]], "lr": 0.1}, {"params": [w[1]], "lr": 0.1}])
    stopper = fd.EarlyStopping(opt, patience=2, restore_best=True)
    best = None
    for loss in [3.0, 2.0, 1.0, 1.5, 1.2]:
        for a in w:
            a += rng.standard_normal(a.shape).astype(a.dtype)
        if loss == 1.0:
            best = [a.copy() for a in w]
        stopped = stopper.step(loss)
    assert stopped
    ids = [id(a) for a in w]
    for a, b in zip(w, best):
        np.testing.assert_array_equal(a, b)
    assert [id(a) for a in opt.param_groups[0]["params"] + opt.param_groups[1]["params"]] == ids
    w[0] += 1.0
    stopper.restore()
    np.testing.assert_array_equal(w[0], best[0])


def test_early_stopping_state_round_trip(rng):
    w = rng.standard_normal(4)
    opt = SimpleNamespace(param_groups=[{"params": [w], "lr": 0.1}])
    a = fd.EarlyStopping(opt, patience=3, restore_best=True)
    for loss in [3.0, 2.0, 2.5]:
        w += 1.0
        a.step(loss)
    state = a.state_dict()
    saved = state["best_params"][0].copy()
    w += 1.0
    b = fd.EarlyStopping(opt, patience=3, restore_best=True)
    b.load_state_dict(state)
    assert (b.best, b.num_bad_epochs, b.last_epoch, b.best_epoch) == (2.0, 1, 3, 2)
    assert [b.step(x) for x in [2.2, 2.1]] == [False, True]
    np.testing.assert_array_equal(w, saved)


EARLY_BAD = [
    (ValueError, dict(patience=-1)),
    (TypeError, dict(patience=2.0)),
    (ValueError, dict(min_delta=-0.1)),
    (ValueError, dict(mode="up")),
    (ValueError, dict(min_lr=-1e-3)),
]


@pytest.mark.parametrize("exception, kwargs", EARLY_BAD)
def test_early_stopping_bad_arguments_raise(exception, kwargs):
    with pytest.raises(exception):
        fd.EarlyStopping(groups(0.1), **kwargs)


def test_early_stopping_needs_the_optimizer_for_floor_and_restore():
    with pytest.raises(ValueError):
        fd.EarlyStopping(min_lr=1e-4)
    with pytest.raises(ValueError):
        fd.EarlyStopping(restore_best=True)
    with pytest.raises(RuntimeError):
        fd.EarlyStopping(groups(0.1)).restore()
