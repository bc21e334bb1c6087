"""Every input fastdescent.torch does not run raises a clear error naming the
parameter, before any parameter or state is written."""

import inspect

import pytest

torch = pytest.importorskip("torch")

import fastdescent.torch as fdt  # noqa: E402
from test_torch import RULES  # noqa: E402
from torch_support import (  # noqa: E402, F401
    assert_unchanged, batches, loss_fn, mlp, one_torch_thread, snapshot, takes,
)

#: The classes whose torch.optim peer has a ``capturable`` (``differentiable``) option.
CAPTURABLE = tuple(r for r in RULES if "capturable" in inspect.signature(getattr(fdt, r).__init__).parameters)
DIFFERENTIABLE = tuple(r for r in RULES if "differentiable" in inspect.signature(getattr(fdt, r).__init__).parameters)


def assert_step_raises(opt, error, match):
    """``opt.step()`` raises ``error`` and writes no parameter and no state."""
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(opt, before)


def backward(model):
    loss_fn(model, *batches((10,), steps=1)[0]).backward()


def trained(rule, steps=3, **kwargs):
    """A model and an optimizer with state, from named parameters."""
    model = mlp()
    opt = getattr(fdt, rule)(model.named_parameters(), lr=0.01, **kwargs)
    for x, y in batches((10,), steps=steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return model, opt


# -- options ----------------------------------------------------------------------

@pytest.mark.parametrize("rule", DIFFERENTIABLE)
def test_differentiable_raises(rule):
    with pytest.raises(ValueError, match="differentiable=True"):
        getattr(fdt, rule)(mlp().parameters(), differentiable=True)


@pytest.mark.parametrize("rule", CAPTURABLE)
def test_capturable_raises(rule):
    with pytest.raises(ValueError, match="capturable=True"):
        getattr(fdt, rule)(mlp().parameters(), capturable=True)


@pytest.mark.parametrize("option", ["differentiable", "capturable"])
def test_option_switched_on_later_raises_at_step(option):
    """E.g. a state dict saved by a capturable torch.optim.Adam (on a GPU)."""
    model, opt = trained("Adam")
    opt.param_groups[0][option] = True
    backward(model)
    assert_step_raises(opt, ValueError, f"{option}=True")


def test_invalid_hyperparameter_set_later_raises_and_writes_nothing():
    model, opt = trained("Adam")
    opt.param_groups[0]["lr"] = -0.1
    backward(model)
    assert_step_raises(opt, ValueError, "lr")
    assert all(s["step"].item() == 3 for s in opt.state.values())


def test_state_option_switched_on_later_raises_as_torch():
    """amsgrad turned on after the state exists: no max_exp_avg_sq (KeyError, as torch.optim)."""
    model, opt = trained("Adam")
    opt.param_groups[0]["amsgrad"] = True
    backward(model)
    with pytest.raises(KeyError, match="max_exp_avg_sq"):
        opt.step()


# -- parameters -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("rule", RULES)
def test_half_precision_parameters_raise_naming_them(rule, dtype):
    """Unless told how to update them (a master copy, or a rounding: issue 16)."""
    model = mlp()
    model[2].to(dtype)
    with pytest.raises(TypeError, match=r"'2\.weight'.*master_weights=True"):
        getattr(fdt, rule)([(n, p) for n, p in model.named_parameters() if takes(rule, p)])


def test_integer_parameter_raises():
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\].*torch.int64"):
        fdt.SGD([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.arange(3), requires_grad=False)])


def test_parameter_on_another_device_raises():
    with pytest.raises(ValueError, match="device meta.*CPU tensors only"):
        fdt.Adam([torch.nn.Parameter(torch.empty(3, device="meta"))])


def test_parameter_overlapping_itself_raises():
    expanded = torch.nn.Parameter(torch.randn(3).expand(4, 3))
    with pytest.raises(ValueError, match=r"\['params'\]\[0\].*elements that share memory \(strides \(0, 1\)\)"):
        fdt.Adam([expanded])


@pytest.mark.parametrize("second_group", [False, True], ids=["one-group", "two-groups"])
def test_overlapping_parameters_raise_naming_both(second_group):
    base = torch.randn(10)
    first, second = torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])
    groups = [{"params": [first]}, {"params": [second]}] if second_group else [first, second]
    where = r"param_groups\[1\]\['params'\]\[0\]" if second_group else r"param_groups\[0\]\['params'\]\[1\]"
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['params'\]\[0\].* and parameter .*{where}.*share memory"):
        fdt.SGD(groups, lr=0.1)


def test_interleaved_parameters_of_one_storage_are_accepted():
    """Columns 0, 2, 4 and 1, 3, 5 of one matrix share a storage, not an element."""
    base = torch.randn(4, 6)
    fdt.SGD([torch.nn.Parameter(base[:, ::2]), torch.nn.Parameter(base[:, 1::2])], lr=0.1)
    with pytest.raises(ValueError, match="share memory"):
        fdt.SGD([torch.nn.Parameter(base[:, ::2]), torch.nn.Parameter(base[:, 2:])], lr=0.1)


def test_parameter_moved_onto_another_raises_at_step():
    """``bias.data`` becomes a column of the weight: found when the plan is rebuilt."""
    model, opt = trained("SGD")
    model[0].bias.data = model[0].weight.data[:, 0]
    backward(model)
    assert_step_raises(opt, ValueError, r"'0\.weight'.* and parameter '0\.bias'.*share memory")


def test_added_group_with_a_bad_parameter_raises():
    opt = fdt.Adam(mlp().parameters())
    with pytest.raises(TypeError, match=r"param_groups\[1\]"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float16))]})


def test_parameter_cast_to_half_after_construction_raises_at_step():
    model, opt = trained("AdamW")
    model[0].half()
    model[0].weight.grad = torch.randn_like(model[0].weight)
    assert_step_raises(opt, TypeError, r"'0\.weight'.*float16")


def test_state_of_another_dtype_raises_naming_parameter_and_key():
    model, opt = trained("Adam")
    weight = model[2].weight
    opt.state[weight]["exp_avg"] = opt.state[weight]["exp_avg"].double()
    backward(model)
    assert_step_raises(opt, ValueError, r"'2\.weight'.*state\['exp_avg'\] is torch.float64")


# -- gradients --------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_sparse_gradient_raises_and_no_group_is_written(rule):
    """The bad gradient is in the second group: the first is not updated either."""
    model = mlp()
    params = {n: p for n, p in model.named_parameters() if takes(rule, p)}
    names = list(params)
    opt = getattr(fdt, rule)([{"params": [(n, params[n]) for n in names[:2]]},
                              {"params": [(n, params[n]) for n in names[2:]]}], lr=0.01,
                             **({"momentum": 0.9} if rule in ("SGD", "RMSprop") else {}))
    for x, y in batches((10,), steps=2):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    p = model[2].bias if takes(rule, model[2].bias) else model[2].weight  # Muon: matrices only
    p.grad = p.grad.to_sparse()
    assert_step_raises(opt, TypeError, rf"'2\.(bias|weight)'.*fastdescent.torch.{rule} does not support sparse")


def test_failed_first_sgd_step_leaves_no_momentum_buffer():
    """torch.optim.SGD creates the buffer from the first gradient; a step that
    fails must not leave a buffer behind that a later step would take as real."""
    model = mlp()
    opt = fdt.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                  lr=0.1, momentum=0.9, dampening=0.5)
    x, y = batches((10,), steps=1)[0]
    loss_fn(model, x, y).backward()
    model[2].bias.grad = model[2].bias.grad.to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert all(len(s) == 0 for s in opt.state.values())
    model[2].bias.grad = model[2].bias.grad.to_dense()
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    reference = torch.optim.SGD([{"params": twin[0].parameters()}, {"params": twin[2].parameters()}],
                                lr=0.1, momentum=0.9, dampening=0.5)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    opt.step()
    reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        if p in opt.state:
            assert torch.allclose(opt.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])
