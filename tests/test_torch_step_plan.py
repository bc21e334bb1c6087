"""fastdescent.torch's step plan (``_tensorviews.StepPlan``): while nothing but the
gradients changes, a step is one C call. It must give exactly what the general way
gives, and see every change made between steps (a value written into
``param_groups``, a state tensor edited or replaced, a parameter moved) before it
writes anything."""

import pytest

torch = pytest.importorskip("torch")

import fastdescent.torch as fdt  # noqa: E402
from rule_cases import RICHEST  # noqa: E402
from test_torch_layouts import LATE, Layouts  # noqa: E402
from torch_support import assert_unchanged, one_torch_thread, snapshot, takes, torch_computes_as_fastdescent  # noqa: E402, F401

#: Every fastdescent.torch class with its richest configuration (every buffer in use).
CONFIGS = {spec.title: (rule.torch_peer[1] if rule.torch_peer is not None else rule.options)
           for spec, rule in ((fdt.optimizers.CLASSES[r.spec.title].spec, r) for r in RICHEST.values())
           if spec.title in fdt.optimizers.CLASSES}
#: The classes whose steady steps take the plan: not those that see whole tensors
#: (Adafactor, Muon) or keep scalar states as Python floats (the Schedule-Free rules,
#: which have no torch.optim peer); NAdam's and ASGD's are tensors, as torch.optim's.
PLANNED = [name for name, cls in fdt.optimizers.CLASSES.items()
           if not cls.spec.tensorwise and (not cls.spec.scalar_state or cls.spec.torch is not None)]
#: The classes with scalar states the plan keeps (in blocks, as the step counts).
STATEFUL = [name for name in PLANNED if fdt.optimizers.CLASSES[name].spec.scalar_state]


def general_way(opt):
    """``opt`` never takes the step plan."""
    opt._step_plan = lambda: None
    return opt


def counting_general_steps(opt):
    """A list that grows by one at each step ``opt`` takes the general way."""
    calls = []
    check_all = opt._check_all

    def counted():
        calls.append(1)
        return check_all()
    opt._check_all = counted
    return calls


def model_groups(rule, dtype=torch.float32, seed=0):
    """A model with parameters of every layout (gapped, transposed, channels_last, a
    scalar, one that joins late) in one group, and two float64 ones in another."""
    model = Layouts(dtype, seed)
    torch.manual_seed(seed)
    extra = [torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64)),
             torch.nn.Parameter(torch.randn(7, dtype=torch.float64))]
    groups = [{"params": [p for p in model.parameters() if takes(rule, p)]},
              {"params": [p for p in extra if takes(rule, p)], "lr": 0.5 * CONFIGS[rule].get("lr", 1e-3)}]
    return model, extra, [g for g in groups if g["params"]]


def gradients(model, extra, step, generator):
    """Fresh gradients for ``step`` (the late parameter's only from step 3 on)."""
    x = torch.randn(8, 6, generator=generator)
    loss = model(x, step).square().mean() + sum((p.square() * (1 + step % 3)).sum() for p in extra)
    loss.backward()


def train(rule, steps=14, reuse_gradients=False, general=False, edit=None, dtype=torch.float32):
    """Train ``rule`` on :func:`model_groups` of ``dtype``, with a scheduler writing ``lr``
    at every step; ``reuse_gradients``: the gradient tensors stay the same objects
    (written in place) after the first step; ``edit(opt, step)`` runs between steps."""
    model, extra, groups = model_groups(rule, dtype)
    opt = getattr(fdt, rule)(groups, **CONFIGS[rule])
    if general:
        general_way(opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + 0.1 * step))
    generator = torch.Generator().manual_seed(1)
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in range(steps):
        kept = [p.grad for p in params]
        opt.zero_grad(set_to_none=True)
        gradients(model, extra, step, generator)
        if reuse_gradients and step > 0:
            for p, g in zip(params, kept):
                if p.grad is not None and g is not None:
                    g.copy_(p.grad)
                    p.grad = g
        if edit is not None:
            edit(opt, step)
        opt.step()
        scheduler.step()
    return opt


def assert_identical(a, b):
    """Every parameter and state entry of optimizers ``a`` and ``b`` equal, bit for bit."""
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        assert list(a.state[x]) == list(b.state[y])
        for key, value in b.state[y].items():
            got = a.state[x][key]
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype and torch.equal(got, value), key
            else:
                assert got == value, key


@pytest.mark.parametrize("reuse_gradients", [False, True], ids=["new-grads", "same-grads"])
@pytest.mark.parametrize("rule", list(CONFIGS))
def test_plan_steps_as_the_general_way_bit_for_bit(rule, reuse_gradients):
    assert_identical(train(rule, reuse_gradients=reuse_gradients),
                     train(rule, reuse_gradients=reuse_gradients, general=True))


@pytest.mark.parametrize("rule", PLANNED)
def test_steady_steps_take_the_plan(rule):
    """After a step that went the general way, the steps take the plan while only the
    gradients and ``lr`` change (a scheduler writes it at every step)."""
    p = torch.nn.Parameter(torch.randn(10, 3))
    q = torch.nn.Parameter(torch.randn(3))
    opt = getattr(fdt, rule)([p, q], **CONFIGS[rule])
    general = counting_general_steps(opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9**step)
    for step in range(6):
        p.grad, q.grad = torch.randn(10, 3), torch.randn(3)
        opt.step()
        scheduler.step()
    assert len(general) <= 2  # the first step (state created), and SGD's second (its fresh buffer)
    assert opt._fd_step_plan is not None


def test_state_step_edited_in_place_is_followed():
    """``state["step"]`` written in place (the step counts are read from the step
    tensors at every step): the bias corrections follow it, as torch.optim's do."""
    def edit(opt, step):
        if step == 6:
            for state in opt.state.values():
                state["step"].fill_(100.0)
    assert_identical(train("Adam", edit=edit), train("Adam", edit=edit, general=True))
    fast = train("Adam", edit=edit)
    assert {s["step"].item() for s in fast.state.values()} == {100.0 + 14 - 6, 14.0 - LATE}  # (late: after the edit)


def test_a_step_count_out_of_line_takes_the_general_way():
    """One parameter's count edited: the counts differ, one kernel call per count."""
    def edit(opt, step):
        if step == 5:
            opt.state[opt.param_groups[0]["params"][0]]["step"].fill_(50.0)
    assert_identical(train("Adam", edit=edit), train("Adam", edit=edit, general=True))


@pytest.mark.parametrize("write, error", [
    (("lr", -1.0), ValueError), (("lr", "fast"), TypeError), (("betas", (0.9, 1.5)), ValueError),
    (("eps", float("nan")), ValueError), (("weight_decay", None), TypeError),
    (("differentiable", True), ValueError), (("capturable", True), ValueError),
])
def test_bad_value_written_between_steady_steps_raises_before_any_write(write, error):
    """A value written into ``param_groups`` is seen by the next step: the plan's
    identity check of every value in the group sends it to validation, which raises
    before anything is written; after the value is put back, training goes on as if
    nothing had happened."""
    key, value = write
    fast, expected = train("Adam", steps=5), train("Adam", steps=5)
    group = fast.param_groups[1]
    previous = group.get(key)
    group[key] = value
    before = snapshot(fast)
    params = [p for g in fast.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(error):
        fast.step()
    assert_unchanged(fast, before)
    group[key] = previous
    for opt in (fast, expected):
        for p in (p for g in opt.param_groups for p in g["params"]):
            p.grad = torch.ones_like(p)
        opt.step()
    assert_identical(fast, expected)


def test_tensor_learning_rate_filled_in_place_is_followed():
    """A tensor ``lr`` may change without being replaced: such a group is validated
    at every step, and the value filled in is the one used."""
    def run(fill):
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 9))
        opt = fdt.Adam([p], lr=torch.tensor(0.01))
        for step in range(6):
            p.grad = torch.linspace(0.5, -0.3, 9) * (step + 1)
            if fill and step == 3:
                opt.param_groups[0]["lr"].fill_(0.5)
            opt.step()
        return p.detach().clone()

    def expected():
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 9))
        opt = fdt.Adam([p], lr=0.01)
        general_way(opt)
        for step in range(6):
            p.grad = torch.linspace(0.5, -0.3, 9) * (step + 1)
            if step == 3:
                opt.param_groups[0]["lr"] = 0.5
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(True), expected())
    assert not torch.equal(run(False), expected())


def test_group_keys_added_and_parameters_replaced_are_seen():
    """A key added to a group (validated again), a parameter replaced in the list and a
    parameter whose storage moved: each goes the general way once, with the same results."""
    def edit(opt, step):
        group = opt.param_groups[1]
        if step == 4:
            group["note"] = "a key torch.optim ignores"
        if step == 6:
            p = group["params"][1]
            p.data = p.data.clone()
        if step == 8:
            q = torch.nn.Parameter(group["params"][0].detach() * 0.5)
            q.grad = group["params"][0].grad
            group["params"][0] = q
    assert_identical(train("Adam", edit=edit), train("Adam", edit=edit, general=True))


# (Adagrad makes its state eagerly, so this model's late parameter sits in the bucket
# with step count 0: the bucket is stepped in one call per count, which takes the def entry.)
@pytest.mark.parametrize("rule", ["Adam", "AdamW", "SGD", "RMSprop", "Adadelta", "Adamax", "Rprop", "RAdam",
                                  "NAdam", "ASGD"])
def test_whole_buckets_go_through_the_kernels_direct_entry(rule):
    """Where the backend has a direct entry for the rule's kernel, the plan's call of
    a whole bucket goes through it (a backend whose ``def`` entry raises shows it),
    with the results of the general way, bit for bit."""
    from fastdescent._config import resolve_backend

    backend = resolve_backend("kernel")  # (whatever the default: the reference has no direct entries)
    kernel = fdt.optimizers.CLASSES[rule].spec.kernel
    if kernel not in backend.direct_entries():
        pytest.skip(f"{kernel} has no direct entry")

    def refused(*args, **kwargs):
        raise AssertionError("the def entry was called")

    direct_only = type("Backend", (), {"direct_entries": staticmethod(backend.direct_entries),
                                       kernel: staticmethod(refused)})()
    fast, expected = train(rule, steps=4), train(rule, steps=4, general=True)
    for opt in (fast, expected):
        for p in (p for g in opt.param_groups for p in g["params"] if p.grad is not None):  # (not the late one)
            p.grad = torch.empty_like(p).copy_(torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape))  # its layout
    assert fast._fd_step_plan.run(fast.param_groups, fast.state, direct_only, 1, fast._refresh_group)
    expected.step()
    assert_identical(fast, expected)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rule", STATEFUL)
def test_scalar_states_take_the_plan_as_the_general_way(rule, default_dtype):
    """NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``: kept in the plan, bit for bit
    as the general way keeps them, in torch's dtype (float64 tensors under a float64
    default dtype, which NAdam multiplies in float64), after the first step."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        fast, expected = train(rule, dtype=default_dtype), train(rule, general=True, dtype=default_dtype)
        calls = counting_general_steps(fast)
        for opt in (fast, expected):
            for step in range(3):
                for p in (p for g in opt.param_groups for p in g["params"]):  # (in its layout)
                    p.grad = torch.empty_like(p).copy_(torch.linspace(-1.0, 0.5 + step, p.numel()).reshape(p.shape))
                opt.step()
    finally:
        torch.set_default_dtype(previous)
    assert not calls
    assert_identical(fast, expected)
    for state in fast.state.values():
        for name in fast.spec.scalar_state_names:
            assert state[name].dtype == default_dtype and state[name].shape == ()


@pytest.mark.parametrize("how", ["filled", "replaced"])
@pytest.mark.parametrize("rule", STATEFUL)
def test_scalar_state_of_one_parameter_edited_between_steps(rule, how):
    """One parameter's scalar states written in place or replaced between steps (its
    count the others'): it is stepped with its own, by the plan as by the general way
    and as torch.optim does (which keeps them per parameter)."""
    names = fdt.optimizers.CLASSES[rule].spec.scalar_state_names

    def edit(opt, step):
        if step == 5:
            state = opt.state[opt.param_groups[0]["params"][0]]
            for name in names:
                value = 0.5 * state[name].item()
                if how == "filled":
                    state[name].fill_(value)
                else:
                    state[name] = torch.tensor(value)
    assert_identical(train(rule, edit=edit), train(rule, edit=edit, general=True))

    def edited(opt):
        generator = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(6, generator=generator)) for _ in range(3)]
        optimizer = opt(params, **CONFIGS[rule])
        for step in range(8):
            for p in params:
                p.grad = torch.randn(6, generator=generator)
            edit(optimizer, step)
            optimizer.step()
        return params
    for mine, theirs in zip(edited(getattr(fdt, rule)), edited(getattr(torch.optim, rule))):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
