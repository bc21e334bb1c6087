"""All or nothing (issue 15 part 2) for the ``fd`` optimizers: every check that can
fail for any group runs before the first write to any group, so a failed step
leaves every parameter, state buffer and step count byte for byte as it was, on
the plan's path and on the general path, at the first step and later. Each
failure that can occur in the middle of a step is tried on every optimizer
class, in the last group."""

import math

import numpy as np
import pytest

from fastdescent.optim import base
from rule_cases import RICHEST
from test_optim import RULES, make_grads, make_params


def snapshot_optimizer(opt):
    """Every byte the optimizer could change: parameters, state buffers, step counts
    and scalar states (as their reprs, so that a NaN equals itself)."""
    state = {i: {k: v.tobytes() if isinstance(v, np.ndarray) else repr(v) for k, v in s.items()}
             for i, s in opt.state.items()}
    return [p.tobytes() for p in opt.params], state


def assert_same(opt, before):
    assert snapshot_optimizer(opt) == before


def two_groups(name, rng, second=np.float64, **options):
    """An optimizer of ``name``'s richest example with two groups (float32 arrays,
    then a float32 and a ``second`` one), and its gradients."""
    example = RICHEST[name].name
    cls, config = RULES[example]
    params = make_params(rng, np.float32, [(10,), (3, 4)], rule=example) + make_params(rng, second, [(20,)],
                                                                                     rule=example)
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], **config, **options)
    return opt, lambda: make_grads(rng, params, 1)[0]


def failures(opt, grads):
    """(description, exception, prepare(grads) -> grads to step with), each failing
    in the last group only (the first group would pass its checks)."""
    last = len(opt.params) - 1
    spec = opt.spec
    bad_hyper = next(h for h in spec.hyper if h.name == "lr")

    def hyper(key, value):
        def prepare(g):
            opt.param_groups[1][key] = value
            return g
        return prepare

    def grad(value):
        def prepare(g):
            return g[:last] + [value(g[last])]
        return prepare

    def in_place(change):
        def prepare(g):
            change()
            return g
        return prepare

    cases = [
        ("lr < 0 in the second group", ValueError, hyper(bad_hyper.name, -1.0)),
        ("lr nan in the second group", ValueError, hyper("lr", math.nan)),
        ("lr a string in the second group", TypeError, hyper("lr", "0.1")),
        ("a hyperparameter deleted", ValueError, in_place(lambda: opt.param_groups[1].pop("lr"))),
        ("last gradient's shape", ValueError, grad(lambda g: g[:-1])),
        ("last gradient's dtype", TypeError, grad(lambda g: g.astype(np.float32 if g.dtype == np.float64 else np.float64))),
        ("last gradient strided", ValueError, grad(lambda g: np.repeat(g, 2)[::2])),
        ("last gradient None", TypeError, grad(lambda g: None)),
        ("last gradient is its parameter", ValueError, lambda g: g[:last] + [opt.params[last]]),
        ("one gradient too few", ValueError, lambda g: g[:last]),
        ("last parameter made read-only", ValueError,
         in_place(lambda: setattr(opt.params[last].flags, "writeable", False))),
        ("the second group's parameter list replaced", ValueError,
         in_place(lambda: opt.param_groups[1].__setitem__("params", [opt.params[last].copy()]))),
    ]
    if spec.counts_steps and opt.state:
        cases += [
            ("a negative step count", ValueError, in_place(lambda: opt.state[last].__setitem__("step", -2))),
            ("a step count of no integer", ValueError, in_place(lambda: opt.state[last].__setitem__("step", 1.5))),
        ]
    for s in spec.scalar_state:
        if opt.state:
            cases.append((f"{s.name} nan", ValueError, in_place(lambda n=s.name: opt.state[last].__setitem__(n, math.nan))))
    for b in spec.buffers:
        if opt.state and b.name in opt.state[0]:
            cases.append((f"last gradient is its {b.name}", ValueError,
                          lambda g, n=b.name: g[:last] + [opt.state[last][n]]))
    return cases


def case_ids(first):
    rng = np.random.default_rng(0)
    ids = []
    for name in RICHEST:
        opt, grads = two_groups(name, rng)
        if not first:
            opt.step(grads())
        ids += [(name, i, d) for i, (d, _, _) in enumerate(failures(opt, grads()))]
    return ids


def unchanged_by_failure(name, index, first, rng, steps, **options):
    opt, grads = two_groups(name, rng, **options)
    for _ in range(steps):
        assert opt.step(grads())
    description, error, prepare = failures(opt, grads())[index]
    g = prepare(grads())
    before = snapshot_optimizer(opt)
    state_keys = {i: set(s) for i, s in opt.state.items()}
    kept = [a.copy() if isinstance(a, np.ndarray) else a for a in g]
    with pytest.raises(error):
        opt.step(g)
    assert_same(opt, before)
    assert {i: set(s) for i, s in opt.state.items()} == state_keys, "state was created"
    for a, b in zip(g, kept):  # the gradients too (clipping by value clamps them in place)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, index, description", case_ids(first=True),
                         ids=[f"{n}-{d}" for n, _, d in case_ids(first=True)])
def test_a_failed_first_step_changes_nothing_and_creates_no_state(name, index, description, rng):
    unchanged_by_failure(name, index, True, rng, steps=0)


@pytest.mark.parametrize("name, index, description", case_ids(first=False),
                         ids=[f"{n}-{d}" for n, _, d in case_ids(first=False)])
def test_a_failed_step_on_the_plan_path_changes_nothing(name, index, description, rng):
    """After three steps the optimizer runs its C plan: its failures too."""
    unchanged_by_failure(name, index, False, rng, steps=3)


@pytest.mark.parametrize("options", [dict(clip_grad_norm=1.0), dict(clip_grad_value=0.5, skip_nonfinite=True),
                                     dict(flat=True)], ids=["clip-norm", "clip-value-guard", "flat"])
@pytest.mark.parametrize("name", list(RICHEST))
def test_failures_with_clipping_and_flat_arenas(name, options, rng):
    count = len(failures(*_stepped(name, rng, options)))
    for index in range(count):
        unchanged_by_failure(name, index, False, np.random.default_rng(index), steps=2, **options)


def _low_precision_cases():
    """(name, state_dtype, failure count) for the rules that keep their state in
    bfloat16 and int8 (float32 parameters in both groups)."""
    cases = []
    for name in RICHEST:
        for state_dtype in ("bfloat16", "int8"):
            try:
                opt, grads = two_groups(name, np.random.default_rng(0), second=np.float32, state_dtype=state_dtype)
            except ValueError:  # a rule that refuses low-precision state (say why: tests/test_lowprec_optim.py)
                continue
            cases.append((name, state_dtype, len(failures(opt, grads()))))
    return cases


@pytest.mark.parametrize("name, state_dtype, count", _low_precision_cases(),
                         ids=[f"{n}-{s}" for n, s, _ in _low_precision_cases()])
def test_failures_with_low_precision_state(name, state_dtype, count):
    """Low-precision buckets take the C plan too (a StoredCall): a failure in the
    second group after three steps leaves every array as it was."""
    for index in range(count):
        unchanged_by_failure(name, index, False, np.random.default_rng(index), steps=3, second=np.float32,
                             state_dtype=state_dtype)


def _stepped(name, rng, options):
    opt, grads = two_groups(name, rng, **options)
    opt.step(grads())
    opt.step(grads())
    return opt, grads()


@pytest.mark.parametrize("name", list(RICHEST))
def test_running_out_of_memory_while_creating_state_removes_what_was_created(name, rng, monkeypatch):
    """The second group's state cannot be allocated: the first group's state, just
    created, is removed again, and the next step starts afresh."""
    opt, grads = two_groups(name, rng)
    g = grads()
    calls = {"n": 0}
    real = base._new_buffer

    def failing(like, fill, *shape):
        calls["n"] += 1
        if like.dtype == np.float64:  # the second group
            raise MemoryError("no room")
        return real(like, fill, *shape)

    monkeypatch.setattr(base, "_new_buffer", failing)
    if not opt.spec.needed(opt.spec.validate(opt.param_groups[1])):
        pytest.skip("this configuration keeps no buffer")
    before = snapshot_optimizer(opt)
    with pytest.raises(MemoryError):
        opt.step(g)
    assert_same(opt, before)
    assert not opt.state and calls["n"]
    monkeypatch.setattr(base, "_new_buffer", real)
    assert opt.step(g)
