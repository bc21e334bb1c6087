"""Aliasing across tensors (issue 14 #1): a buffer that a call writes may share no
byte with any other buffer of the call, whichever tensor and role either belongs
to. The faces and the optimizers refuse it before writing, name both buffers and
leave every array as it was; buffers that are only read (gradients) may overlap
each other."""

import numpy as np
import pytest

import fastdescent as fd
from fastdescent.rules import FACES
from rule_cases import RICHEST, make_state
from support import assert_unchanged, random_array, random_like, snapshot
from test_optim import RULES, assert_same, make_grads, make_params, snapshot_optimizer


def test_the_issue_examples_raise_and_change_nothing():
    n = 1 << 16
    q = np.full(n, 5.0, np.float32)
    p = np.zeros(n, np.float32)
    g = np.ones(n, np.float32)
    before = snapshot([q, p, g])
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[1\]"):
        fd.sgd_step([q, p], [p, g], lr=1.0, n_threads=2)
    with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
        fd.sgd_step([p, p], [g, g], lr=1.0)
    assert_unchanged([q, p, g], before)


def face_call(rule, n_tensors, rng, n=40):
    """(arrays by role, call(arrays)) for a multi-tensor call of ``rule``'s face: each
    role a list of ``n_tensors`` arrays."""
    spec = rule.spec
    states = [make_state(rng, rule, n, np.float32) for _ in range(n_tensors)]
    roles = {"params": [s["param"] for s in states], "grads": [random_like(rng, s["param"]) for s in states]}
    for b in spec.buffers:
        if b.name in states[0]:
            roles[b.face_argument] = [s[b.name] for s in states]
    kwargs = {k: v for k, v in rule.options.items() if next(h for h in spec.hyper if h.name == k).face}
    if spec.uses_step:
        kwargs["step"] = 3

    def call(arrays):
        FACES[spec.face_name](arrays["params"], arrays["grads"],
                              *[arrays.get(b.face_argument) for b in spec.buffers], **kwargs)
    return roles, call


def written_roles(rule, roles):
    """The written roles of a call: the parameters, and the buffers it has (1-D
    parameters keep none of Adafactor's row_var and col_var)."""
    return ["params"] + [b.face_argument for b in rule.spec.buffers if b.face_argument in roles]


@pytest.mark.parametrize("name", list(RICHEST))
def test_every_written_buffer_against_every_other_tensor(name, rng):
    """Each written role of tensor 1 replaced by a buffer of tensor 0 (of any role),
    or by a view overlapping it by one element: refused, naming both, nothing changed."""
    rule = RICHEST[name]
    roles, call = face_call(rule, 2, rng)
    for written in written_roles(rule, roles):
        for other in roles:
            for partial in (False, True):
                arrays = {k: list(v) for k, v in roles.items()}
                target = arrays[other][0]
                if partial:  # a buffer that overlaps the other by its last element only
                    block = np.empty(2 * target.size - 1, target.dtype)
                    block[:target.size] = target.reshape(-1)
                    arrays[other][0] = block[:target.size].reshape(target.shape)
                    arrays[written][1] = block[target.size - 1:].reshape(target.shape)
                else:
                    arrays[written][1] = target
                every = [a for v in arrays.values() for a in v]
                before = snapshot(every)
                with pytest.raises(ValueError, match="shares memory") as raised:
                    call(arrays)
                assert f"{written}[1]" in str(raised.value) or f"{other}[0]" in str(raised.value)
                assert_unchanged(every, before)


@pytest.mark.parametrize("name", list(RICHEST))
def test_gradients_may_overlap_each_other(name, rng):
    rule = RICHEST[name]
    roles, call = face_call(rule, 3, rng)
    shared = random_like(rng, roles["params"][0])
    roles["grads"] = [shared, shared, shared[::1]]
    call(roles)  # the same gradient read three times: fine


def test_one_parameter_twice_with_empty_arrays_around_it(rng):
    p, g = random_array(rng, 9, np.float32), random_array(rng, 9, np.float32)
    empty = np.zeros(0, np.float32)
    fd.sgd_step([empty, p, empty], [empty, g, empty], lr=0.1)  # empty arrays share no byte
    with pytest.raises(ValueError, match="shares memory"):
        fd.sgd_step([p, empty, p[3:]], [g, empty, g[3:]], lr=0.1)


def test_many_tensors_are_checked_all_against_all(rng):
    """More buffers than fit on the stack: the sort still finds the one overlap."""
    arena = random_array(rng, 100 * 8, np.float32)
    params = [arena[8 * k:8 * k + 8] for k in range(100)]
    grads = [random_array(rng, 8, np.float32) for _ in range(100)]
    before = arena.copy()
    fd.sgd_step(params, grads, lr=0.1)  # adjacent views: no overlap
    assert not np.array_equal(arena, before)
    grads[73] = arena[8 * 12 + 4:8 * 12 + 12]  # straddles params 12 and 13
    before = arena.copy()
    with pytest.raises(ValueError, match=r"grads\[73\] shares memory with params\[1[23]\]"):
        fd.sgd_step(params, grads, lr=0.1)
    np.testing.assert_array_equal(arena, before)


# ------------------------------------------------------------------ optimizers
def stepped_optimizer(name, rng, **options):
    cls, config = RULES[RICHEST[name].name]
    example = RICHEST[name].name  # each parameter in a shape the rule takes
    params = make_params(rng, np.float32, [(10,), (3, 4)], rule=example) + make_params(rng, np.float64, [(20,)],
                                                                                      rule=example)
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], **config, **options)
    opt.step(make_grads(rng, params, 1)[0])
    return opt


@pytest.mark.parametrize("name", list(RICHEST))
def test_a_gradient_that_is_a_parameter_or_state_buffer_is_refused(name, rng):
    opt = stepped_optimizer(name, rng)
    good = make_grads(rng, opt.params, 1)[0]
    candidates = [(f"params[{i}]", p) for i, p in enumerate(opt.params)]
    candidates += [(f"state[{i}][{k!r}]", v) for i, s in opt.state.items() for k, v in s.items()
                   if isinstance(v, np.ndarray) and v.size == opt.params[i].size]  # not Adafactor's row_var...
    for label, array in candidates:
        i = int(label.split("[")[1].split("]")[0])
        grads = list(good)
        grads[i] = array.reshape(opt.params[i].shape)
        before = snapshot_optimizer(opt)
        with pytest.raises(ValueError, match="shares memory") as raised:
            opt.step(grads)
        assert f"grads[{i}]" in str(raised.value) and label in str(raised.value)
        assert_same(opt, before)
    assert opt.step(good)


def test_the_issue_optimizer_example(rng):
    params = make_params(rng, np.float32, [(5,), (5,)])
    opt = fd.SGD(params, lr=0.1)
    g = random_array(rng, 5, np.float32)
    before = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[1\]"):
        opt.step([opt.params[1], g])
    assert_same(opt, before)


def test_a_gradient_overlapping_a_parameter_partly_is_refused(rng):
    block = random_array(rng, 30, np.float32)
    opt = fd.Adam([block[:20]], lr=0.01)
    grad = block[15:]  # shares 5 elements with the parameter
    grad = np.ascontiguousarray(grad[:5])
    opt.step([random_array(rng, 20, np.float32)])
    assert opt.step([np.concatenate([grad, grad, grad, grad])])  # a copy: fine
    before = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([np.lib.stride_tricks.as_strided(block[10:], (20,), (4,))])
    assert_same(opt, before)


def test_a_step_of_one_group_only_refuses_overlaps_with_that_group(rng):
    a, b = make_params(rng, np.float32, [(6,), (6,)])
    opt = fd.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([opt.params[0]], group=0)
    before = opt.params[0].copy()
    assert opt.step([opt.params[0].copy()], group=1)  # reads group 0's values, writes group 1
    np.testing.assert_array_equal(opt.params[0], before)
    assert opt.step([opt.params[0]], group=1)  # group 0's parameter is only read


def test_flat_optimizer_checks_gradients_given_per_array(rng):
    opt = fd.Adam(make_params(rng, np.float32, [(4,), (6,)]), lr=0.01, flat=True)
    opt.grads[0][...] = 1.0
    assert opt.step()
    before = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with state\[1\]\['exp_avg'\]"):
        opt.step([opt.grads[0], opt.state[1]["exp_avg"]])
    assert_same(opt, before)


def test_parameters_changed_in_place_are_refused(rng):
    """The optimizer checks its own arrays once, then only that none was changed in
    place (dtype, size, layout, writeable flag) since."""
    params = make_params(rng, np.float32, [(8,), (8,)])
    opt = fd.Adam(params, lr=0.01)
    grads = make_grads(rng, params, 1)[0]
    opt.step(grads)
    opt.params[1].flags.writeable = False
    before = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match=r"params\[1\] was changed in place"):
        opt.step(grads)
    assert_same(opt, before)
    opt.params[1].flags.writeable = True
    opt.state[0]["exp_avg"].dtype = np.int32  # same size, another dtype
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] was changed in place"):
        opt.step(grads)
    opt.state[0]["exp_avg"].dtype = np.float32
    assert opt.step(grads)


@pytest.mark.parametrize("seed", range(5))
def test_many_buffers_in_any_address_order(seed):
    """Views of one block in a random order (the sort's runs short), with or without
    one overlap placed at random: found exactly when it is there."""
    rng = np.random.default_rng(seed)
    count, size = 60, 5
    block = random_array(rng, 2 * count * size, np.float32)
    views = [block[size * k:size * (k + 1)] for k in range(2 * count)]
    order = rng.permutation(2 * count)
    params, grads = [views[k] for k in order[:count]], [views[k] for k in order[count:]]
    before = block.copy()
    fd.sgd_step(params, grads, lr=0.1)
    assert not np.array_equal(block, before)
    k = rng.integers(count)
    grads[k] = block[size * order[rng.integers(count)] + 2:][:size]  # overlaps a parameter
    before = block.copy()
    with pytest.raises(ValueError, match=rf"grads\[{k}\] shares memory with params\["):
        fd.sgd_step(params, grads, lr=0.1)
    np.testing.assert_array_equal(block, before)
