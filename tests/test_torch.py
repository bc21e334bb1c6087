"""fastdescent.torch against torch.optim: the same training, to float rounding.

Bound (``torch_support.tolerance``): every parameter and state tensor after 50
steps is within 128 machine epsilons of its dtype, relative to the tensor's
largest magnitude (float32 2**-16, float64 2**-45). Measured on these models the
worst case is about 30 epsilons; typical is 2-10. Exact bit-identity is not
expected: PyTorch's CPU kernels contract ``a + alpha * b`` (add, lerp, addcmul,
addcdiv) into fused multiply-adds, which the fastdescent kernels deliberately do
not (they match their NumPy reference twins bit for bit instead).
"""

import copy
import inspect

import pytest

torch = pytest.importorskip("torch")

import fastdescent  # noqa: E402
import fastdescent.torch as fdt  # noqa: E402
from rule_cases import RICHEST, for_loop  # noqa: E402
from torch_support import (  # noqa: E402
    CONFIGS, MODELS, STEPS, assert_close, assert_same_training_state, batches, convnet, loss_fn,
    mlp, one_torch_thread, roundtrip, takes, torch_computes_as_fastdescent, torch_steps, train, trained,
)

#: Every fastdescent.torch class of a rule torch.optim has (the others are tested with their own peers).
RULES = tuple(name for name, cls in fdt.optimizers.CLASSES.items() if cls.spec.torch is not None)
#: One configuration per rule with every state buffer in use, for the tests of
#: mechanics (state dicts, schedulers, skipped parameters...).
FULL = {rule.spec.title: rule.torch_peer for rule in RICHEST.values() if rule.torch_peer is not None}


def pair(rule, kwargs, make=mlp, dtype=torch.float32, **model_kwargs):
    """(model, fastdescent optimizer, twin model, torch optimizer) from the same weights,
    the optimizers training the parameters the rule takes."""
    fast_model, torch_model = make(dtype, **model_kwargs), make(dtype, **model_kwargs)
    peer = getattr(torch.optim, rule)
    return (fast_model, getattr(fdt, rule)(trained(rule, fast_model), **kwargs),
            torch_model, peer(trained(rule, torch_model), **for_loop(peer), **kwargs))


def train_both(fast_model, fast_opt, torch_model, torch_opt, data, maximize=False, schedulers=(None, None)):
    train(fast_model, fast_opt, data, maximize, schedulers[0])
    train(torch_model, torch_opt, data, maximize, schedulers[1])


# -- the same training ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_matches_torch(config, model, dtype):
    rule, kwargs = CONFIGS[config]
    make, input_shape = MODELS[model]
    models = pair(rule, kwargs, make, dtype)
    initial = [p.detach().clone() for p in trained(rule, models[0])]
    train_both(*models, batches(input_shape, dtype=dtype), kwargs.get("maximize", False))
    assert_same_training_state(*models)
    moved = [not torch.equal(a, p) for a, p in zip(initial, trained(rule, models[0]))]
    assert all(moved), "every trained parameter must have changed"


@pytest.mark.parametrize("rule", RULES)
def test_channels_last_parameters_are_updated_in_place(rule):
    """A channels_last conv net: same results, state in the parameters' layout, no copies."""
    _, kwargs = FULL[rule]
    if not takes(rule, torch.empty(1, 1, 1, 1)):
        pytest.skip(f"{rule} takes no convolution weights")
    models = pair(rule, kwargs, convnet, memory_format=torch.channels_last)
    weight = models[0][0].weight
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    address = weight.data_ptr()
    train_both(*models, batches((2, 8, 8), steps=20), kwargs.get("maximize", False))
    assert weight.data_ptr() == address
    assert_same_training_state(*models)
    like_param = {b.name for b in models[1].spec.buffers if b.shape is None}  # not Adafactor's row_var...
    for name, value in models[1].state[weight].items():
        if name in like_param:
            assert value.stride() == weight.stride(), name


@pytest.mark.parametrize("rule", RULES)
def test_complex_and_mixed_dtype_parameters(rule):
    """One group holding float32, float64, complex64 and complex128 parameters,
    scalars and an empty one (one kernel call per dtype; complex numbers as real
    pairs, as torch.optim treats them), less those torch.optim's class refuses
    (torch.optim.Adafactor: complex and empty parameters)."""
    _, kwargs = FULL[rule]
    generator = torch.Generator().manual_seed(3)
    shapes_dtypes = [((5, 3), torch.float32), ((7,), torch.float64), ((4, 2), torch.complex64),
                     ((3,), torch.float32), ((6,), torch.complex128), ((), torch.float64),
                     ((0, 4), torch.float32), ((), torch.complex64), ((2, 3, 4), torch.float64)]
    shapes_dtypes = [(s, d) for s, d in shapes_dtypes if torch_steps(rule, s, d)]

    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, dtype=d)) for s, d in shapes_dtypes]

    targets = [torch.randn(s, dtype=d, generator=generator) for s, d in shapes_dtypes]
    fast, ref = make(), make()
    fast_opt = getattr(fdt, rule)(fast, **kwargs)
    peer = getattr(torch.optim, rule)
    torch_opt = peer(ref, **for_loop(peer), **kwargs)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    for step in range(30):
        for params, opt in ((fast, fast_opt), (ref, torch_opt)):
            opt.zero_grad()
            loss = sum(((p - t).abs() ** 2).sum() * (1 + step % 3) for p, t in zip(params, targets))
            (sign * loss).backward()
            opt.step()
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert_close(a.detach(), b.detach(), f"parameter {i}")
        for key, value in torch_opt.state[b].items():
            got = fast_opt.state[a][key]
            if key == "step":
                assert got.item() == value.item()
            else:
                assert_close(got, value, f"state {i} {key}")


# -- state dicts ----------------------------------------------------------------

@pytest.mark.parametrize("direction", ["torch-to-fastdescent", "fastdescent-to-torch"])
@pytest.mark.parametrize("rule", RULES)
def test_state_dict_round_trip(rule, direction):
    """Train with one implementation, checkpoint, resume with the other: the same
    as training on with the first one."""
    _, kwargs = FULL[rule]
    maximize = kwargs.get("maximize", False)
    data = batches((10,), steps=40)
    first, then = (torch.optim, fdt) if direction == "torch-to-fastdescent" else (fdt, torch.optim)
    model = mlp()
    opt = getattr(first, rule)(trained(rule, model), **kwargs)
    train(model, opt, data[:20], maximize)

    resumed_model = copy.deepcopy(model)
    resumed = getattr(then, rule)(trained(rule, resumed_model), **kwargs)
    train(resumed_model, resumed, data[:3], maximize)  # any state it had is overwritten
    resumed_model.load_state_dict(model.state_dict())
    saved = opt.state_dict()
    resumed.load_state_dict(roundtrip(saved))
    loaded = resumed.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for index, state in saved["state"].items():
        assert list(loaded["state"][index]) == list(state)
        for key, value in state.items():
            assert loaded["state"][index][key].dtype == value.dtype
            assert torch.equal(loaded["state"][index][key], value), key

    train(model, opt, data[20:], maximize)
    train(resumed_model, resumed, data[20:], maximize)
    fast = (resumed_model, resumed) if then is fdt else (model, opt)
    ref = (model, opt) if then is fdt else (resumed_model, resumed)
    assert_same_training_state(*fast, *ref)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("rule", ["Adagrad", "RMSprop", "Adam"])
def test_step_is_stored_as_torch_stores_it(rule, fused, default_dtype):
    """A scalar tensor per parameter, of torch's dtype (the default dtype; float32 if fused)."""
    if fused and rule == "RMSprop":
        pytest.skip("torch.optim.RMSprop has no fused argument")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        kwargs = {} if fused is None else {"fused": fused}
        models = pair(rule, kwargs)
        train_both(*models, batches((10,), steps=3))
    finally:
        torch.set_default_dtype(previous)
    for p, q in zip(models[0].parameters(), models[2].parameters()):
        step, expected = models[1].state[p]["step"], models[3].state[q]["step"]
        assert isinstance(step, torch.Tensor) and step.shape == () and step.dtype == expected.dtype
        assert step.item() == expected.item() == 3.0
    saved = roundtrip(models[1].state_dict())
    assert all(s["step"].item() == 3.0 for s in saved["state"].values())


def test_deep_copy_steps_its_own_tensors():
    """copy.deepcopy of (model, optimizer) trains on independently, identically."""
    model = mlp()
    opt = fdt.Adam(model.parameters(), lr=0.01)
    data = batches((10,), steps=10)
    train(model, opt, data[:3])
    model_copy, opt_copy = copy.deepcopy((model, opt))
    train(model, opt, data[3:])
    frozen = [p.detach().clone() for p in model.parameters()]
    train(model_copy, opt_copy, data[3:])
    for p, q, f in zip(model.parameters(), model_copy.parameters(), frozen):
        assert torch.equal(p, q) and torch.equal(p, f)


def test_grad_scaler_unscales_for_us():
    """torch.amp.GradScaler with a fused-flagged optimizer: the scaler unscales the
    gradients and skips steps with infinities itself, as for torch's for-loop path."""
    models = pair("Adam", dict(lr=0.01, fused=True))
    models = models[:3] + (torch.optim.Adam(models[2].parameters(), lr=0.01, foreach=False),)
    data = batches((10,), steps=8)
    for model, opt in (models[:2], models[2:]):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = loss_fn(model, x, y) * (float("inf") if step == 4 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert_same_training_state(*models)
    assert all(s["step"].item() == 7 for s in models[1].state.values())


# -- learning-rate schedulers -------------------------------------------------

SCHEDULERS = {
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.93),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.3),
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(  # also cycles momentum / beta1
        opt, max_lr=2 * opt.defaults["lr"], total_steps=STEPS),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("rule", RULES)
def test_scheduler_drives_the_learning_rate(rule, scheduler):
    _, kwargs = FULL[rule]
    hyper = {h.name for h in fdt.optimizers.CLASSES[rule].spec.hyper}
    if scheduler == "one-cycle" and not {"momentum", "betas"} & hyper:
        pytest.skip(f"OneCycleLR cycles momentum or beta1, which {rule} does not have")
    models = pair(rule, kwargs)
    schedulers = (SCHEDULERS[scheduler](models[1]), SCHEDULERS[scheduler](models[3]))
    first_lr = models[1].param_groups[0]["lr"]
    train_both(*models, batches((10,)), kwargs.get("maximize", False), schedulers)
    assert models[1].param_groups[0]["lr"] != first_lr
    assert models[1].param_groups[0]["lr"] == models[3].param_groups[0]["lr"]
    assert_same_training_state(*models)


# -- step semantics -------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_parameters_without_gradient_are_skipped(rule):
    """Grads set to None on some steps: those parameters keep their values and
    step counts (so the group's counts differ and it is stepped in several calls),
    and a parameter that never had a gradient gets no state (but Adagrad's initial one)."""
    _, kwargs = FULL[rule]
    maximize = kwargs.get("maximize", False)
    models = pair(rule, kwargs)
    data = batches((10,), steps=30)
    for model, opt in (models[:2], models[2:]):
        params = trained(rule, model)
        for step, (x, y) in enumerate(data):
            opt.zero_grad()
            loss_fn(model, x, y, maximize).backward()
            if step < 10:
                params[0].grad = None  # joins late
            if step % 3 == 1:
                params[len(params) // 2].grad = None  # intermittent
            params[-1].grad = None  # never
            opt.step()
    assert_same_training_state(*models)
    never = models[1].state.get(trained(rule, models[0])[-1], {})
    if rule == "Adagrad":  # creates its state in __init__
        assert never["step"].item() == 0
    else:
        assert len(never) == 0


@pytest.mark.parametrize("rule", RULES)
def test_zero_grad_without_set_to_none(rule):
    """Zeroed (not None) gradients still take a step, as in torch.optim."""
    _, kwargs = FULL[rule]
    models = pair(rule, kwargs)
    data = batches((10,), steps=10)
    for model, opt in (models[:2], models[2:]):
        for step, (x, y) in enumerate(data):
            opt.zero_grad(set_to_none=False)
            if step % 2 == 0:
                loss_fn(model, x, y, kwargs.get("maximize", False)).backward()
            opt.step()
    assert_same_training_state(*models)


def test_closure_runs_with_grad_enabled_and_returns_the_loss():
    models = pair("Adam", dict(lr=0.01))
    data = batches((10,), steps=5)
    for model, opt in (models[:2], models[2:]):
        for x, y in data:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss
            with torch.no_grad():  # step enables grad for the closure, as torch.optim does
                loss = opt.step(closure)
            assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert_same_training_state(*models)


def test_step_under_no_grad():
    model = mlp()
    opt = fdt.SGD(model.parameters(), lr=0.1)
    x, y = batches((10,), steps=1)[0]
    loss_fn(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert p.requires_grad and p.grad_fn is None
        assert_close(p.detach(), b - 0.1 * p.grad, "p - lr * grad")


def test_gradient_laid_out_unlike_its_parameter_is_read_correctly():
    """A transposed (non-contiguous) gradient and one that requires grad."""
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    fast, ref = make(), make()
    fast_opt, torch_opt = fdt.Adam(fast, lr=0.1), torch.optim.Adam(ref, lr=0.1, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        g0 = torch.randn(4, 6, generator=generator).t()
        g1 = torch.randn(5, generator=generator).requires_grad_()
        assert not g0.is_contiguous()
        for params, opt in ((fast, fast_opt), (ref, torch_opt)):
            params[0].grad, params[1].grad = g0.clone().t().contiguous().t(), g1
            assert not params[0].grad.is_contiguous()
            opt.step()
    for a, b in zip(fast, ref):
        assert_close(a.detach(), b.detach(), "parameter")


def test_several_groups_and_a_group_added_later():
    def make_groups(model):
        layers = [m for m in model if isinstance(m, torch.nn.Linear)]
        return [{"params": layers[0].parameters(), "lr": 0.02},
                {"params": layers[1].parameters(), "betas": (0.5, 0.9), "weight_decay": 0.1}]
    fast_model, torch_model = mlp(), mlp()
    fast_opt = fdt.Adam(make_groups(fast_model), lr=0.005)
    torch_opt = torch.optim.Adam(make_groups(torch_model), lr=0.005, foreach=False)
    data = batches((10,), steps=20)
    train(fast_model, fast_opt, data[:10])
    train(torch_model, torch_opt, data[:10])
    fast_opt.add_param_group({"params": fast_model[4].parameters(), "amsgrad": True})
    torch_opt.add_param_group({"params": torch_model[4].parameters(), "amsgrad": True})
    train(fast_model, fast_opt, data[10:])
    train(torch_model, torch_opt, data[10:])
    assert_same_training_state(fast_model, fast_opt, torch_model, torch_opt)


def test_moved_parameter_storage_and_replaced_state_are_followed():
    """``param.data = ...`` and a state tensor replaced by hand: the next step
    updates the new tensors (the cached views are rebuilt)."""
    models = pair("Adam", dict(lr=0.01))
    data = batches((10,), steps=12)
    for model, opt in (models[:2], models[2:]):
        train(model, opt, data[:4])
        first = model[0].weight
        first.data = first.data.clone()  # new storage
        opt.state[first]["exp_avg"] = opt.state[first]["exp_avg"].clone()
        train(model, opt, data[4:])
    assert_same_training_state(*models)


def test_backend_switch_is_followed():
    """The reference backend gives the same steps as the kernel, bit for bit."""
    results = []
    for backend in ("kernel", "reference"):
        fastdescent.set_backend(backend)
        model = mlp()
        opt = fdt.AdamW(model.parameters(), lr=0.01, amsgrad=True)
        train(model, opt, batches((10,), steps=5))
        results.append([p.detach().clone() for p in model.parameters()])
    fastdescent.set_backend(None)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_autograd_sees_the_in_place_update():
    """Like torch.optim, a step between forward and backward is detected by autograd."""
    for make_opt in (lambda p: torch.optim.SGD(p, lr=0.1), lambda p: fdt.SGD(p, lr=0.1)):
        w = torch.nn.Parameter(torch.randn(3))
        (w * w).sum().backward()
        opt = make_opt([w])
        loss = (w * w).sum()  # saves w for its backward
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# -- construction -----------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_same_signature_and_defaults_and_class(rule):
    ours, theirs = getattr(fdt, rule), getattr(torch.optim, rule)
    assert inspect.signature(ours) == inspect.signature(theirs)
    params = [torch.nn.Parameter(torch.randn(3, 2))]  # a matrix: every rule takes one
    opt = ours(params)
    assert isinstance(opt, theirs) and isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults == theirs([torch.nn.Parameter(torch.randn(3, 2))]).defaults


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)],
                         ids=["foreach", "no-foreach", "fused", "not-fused"])
@pytest.mark.parametrize("rule", RULES)
def test_foreach_and_fused_flags_are_accepted_and_kept(rule, flags):
    """The kernel is always the fused one; the flags stay in the groups for state_dict compatibility."""
    (name, value), = flags.items()
    if name not in inspect.signature(getattr(torch.optim, rule)).parameters:
        pytest.skip(f"torch.optim.{rule} has no {name} argument")
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = getattr(fdt, rule)(params, **flags)
    params[0].grad = torch.randn(3)
    before = params[0].detach().clone()
    opt.step()
    assert opt.param_groups[0][name] is value
    assert not torch.equal(params[0].detach(), before)
    assert not getattr(opt, "_step_supports_amp_scaling", False)  # GradScaler unscales for us


@pytest.mark.parametrize("rule", RULES)
def test_tensor_learning_rate(rule):
    """torch.optim accepts a one-element tensor as ``lr``."""
    _, kwargs = FULL[rule]
    kwargs = dict(kwargs, lr=torch.tensor(kwargs["lr"]))
    models = pair(rule, kwargs)
    train_both(*models, batches((10,), steps=10), kwargs.get("maximize", False))
    assert_same_training_state(*models)


def test_step_hooks_run():
    model = mlp()
    opt = fdt.SGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    train(model, opt, batches((10,), steps=2))
    assert calls == ["pre", "post"] * 2


def test_benchmark_runs_every_contender():
    """Only that it runs and reports (speed itself lives in the benchmarks)."""
    rows = fdt.benchmark_against_torch(totals=(1000,), n_tensors=10, steps=2, n_threads=1)
    assert [r["contender"] for r in rows] == ["torch for-loop", "torch foreach", "torch fused", "fastdescent"]
    assert all(r["seconds"] > 0 and r["total"] == 1000 and r["n_threads"] == 1 for r in rows)
    assert rows[-1]["speedup"] == 1.0
    assert "fastdescent" in fdt.benchmark.format_rows(rows)


def test_benchmark_command_prints_the_table(capsys):
    assert fdt.benchmark.main(["--totals", "500", "--tensors", "5", "--steps", "1", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "torch fused" in out and "fastdescent" in out and "500" in out
