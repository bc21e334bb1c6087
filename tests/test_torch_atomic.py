"""All or nothing: a ``step()`` that raises leaves every parameter, state tensor
and step counter byte-identical, whichever group the problem is in; once the
problem is removed, training goes on exactly as ``torch.optim``'s."""

import pytest

torch = pytest.importorskip("torch")

import fastdescent.torch as fdt  # noqa: E402
from rule_cases import for_loop  # noqa: E402
from test_torch import FULL, RULES  # noqa: E402
from torch_support import (  # noqa: E402, F401
    assert_same_training_state, assert_unchanged, batches, loss_fn, mlp, one_torch_thread, snapshot, takes,
    torch_computes_as_fastdescent,
)


def groups(model, rule):
    """One group per linear layer (three), named: the parameters ``rule`` takes."""
    layers = [(f"{i}", m) for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)]
    return [{"params": [(f"{name}.{n}", p) for n, p in layer.named_parameters() if takes(rule, p)]}
            for name, layer in layers]


def last_bias(model, opt):
    """The last layer's bias, or its weight for a rule of matrices (Muon)."""
    return model[4].bias if takes(type(opt).__name__, model[4].bias) else model[4].weight


def backward(model, x, y, maximize, first_grad):
    """Gradients of every parameter but the first layer's weight, unless ``first_grad``
    (so that the failing step is that weight's first: its state gets created then)."""
    loss_fn(model, x, y, maximize).backward()
    if not first_grad:
        model[0].weight.grad = None


def first_buffer_name(opt, p):
    """The first state buffer of ``p`` (not ``step`` nor a scalar state such as NAdam's ``mu_product``)."""
    return next(k for k in opt.state[p] if k in type(opt).spec.buffer_names)


def first_buffer(opt, p):
    return opt.state[p][first_buffer_name(opt, p)]


# Each failure: how to cause it in the fastdescent optimizer (returns how to undo
# it), and the error it must raise.
def grad_shares_state(model, opt):
    p = last_bias(model, opt)
    grad = p.grad
    p.grad = first_buffer(opt, p)
    return lambda: setattr(p, "grad", grad)


def bad_hyperparameter(model, opt):
    opt.param_groups[1]["lr"] = -1.0
    return lambda: opt.param_groups[1].__setitem__("lr", opt.param_groups[0]["lr"])


def wrong_dtype_gradient(model, opt):
    p = model[4].weight
    grad = p.grad
    p.grad.data = grad.data.double()  # .data may change what the .grad setter checks
    return lambda: setattr(p.grad, "data", grad.data.float())


def wrong_shape_gradient(model, opt):
    p = model[4].weight
    grad = p.grad.detach().clone()
    p.grad.data = grad[:1]
    return lambda: setattr(p.grad, "data", grad)


def state_of_wrong_dtype(model, opt):
    p = model[4].weight
    name = first_buffer_name(opt, p)
    kept = opt.state[p][name]
    opt.state[p][name] = kept.double()
    return lambda: opt.state[p].__setitem__(name, kept)


def option_switched_on(model, opt):
    opt.param_groups[2]["differentiable"] = True
    return lambda: opt.param_groups[2].__setitem__("differentiable", False)


def sparse_gradient(model, opt):
    p = last_bias(model, opt)
    grad = p.grad
    p.grad = grad.to_sparse()
    return lambda: setattr(p, "grad", grad)


FAILURES = {
    "gradient-shares-memory-with-state": (grad_shares_state, ValueError, r"'4\.(bias|weight)'.*shares memory"),
    "bad-hyperparameter-in-second-group": (bad_hyperparameter, ValueError, "lr"),
    "wrong-dtype-gradient-in-last-group": (wrong_dtype_gradient, TypeError, r"'4\.weight'.*dtype torch.float64"),
    "wrong-shape-gradient-in-last-group": (wrong_shape_gradient, ValueError, r"'4\.weight'.*shape \(1, 16\)"),
    "state-of-wrong-dtype-in-last-group": (state_of_wrong_dtype, ValueError, r"'4\.weight'.*state\["),
    "option-switched-on-in-last-group": (option_switched_on, ValueError, "differentiable=True"),
    "sparse-gradient-in-last-group": (sparse_gradient, TypeError, "sparse"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("rule", RULES)
def test_failed_step_changes_nothing_and_training_goes_on(rule, failure):
    cause, error, match = FAILURES[failure]
    _, kwargs = FULL[rule]
    maximize = kwargs.get("maximize", False)
    if rule in ("SGD", "RMSprop"):
        kwargs = dict(kwargs, momentum=0.9)  # a state buffer in every group
    models = [mlp(), mlp()]
    peer = getattr(torch.optim, rule)
    opts = [getattr(fdt, rule)(groups(models[0], rule), **kwargs),
            peer(groups(models[1], rule), **for_loop(peer), **kwargs)]
    data = batches((10,), steps=5)
    for step, (x, y) in enumerate(data):
        failing = step == 3
        for model, opt in zip(models, opts):
            opt.zero_grad()
            backward(model, x, y, maximize, first_grad=failing)
        if failing:
            undo = cause(models[0], opts[0])
            before = snapshot(opts[0])
            with pytest.raises(error, match=match):
                opts[0].step()
            assert_unchanged(opts[0], before)
            assert models[0][0].weight not in opts[0].state or rule == "Adagrad"
            undo()
        for opt in opts:
            opt.step()
    assert_same_training_state(models[0], opts[0], models[1], opts[1])


@pytest.mark.parametrize("rule", RULES)
def test_face_path_checks_first_and_equals_the_kernel_path(rule):
    """A class without ``_kernel`` steps through its face (``_update``): the same
    results bit for bit, and a bad hyperparameter still writes nothing."""
    _, kwargs = FULL[rule]
    through_face = type(f"Face{rule}", (getattr(fdt, rule),), {"_kernel": None})
    maximize = kwargs.get("maximize", False)
    models = [mlp(), mlp()]
    opts = [getattr(fdt, rule)(groups(models[0], rule), **kwargs), through_face(groups(models[1], rule), **kwargs)]
    for x, y in batches((10,), steps=6):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            backward(model, x, y, maximize, first_grad=True)
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    opts[1].param_groups[1]["lr"] = -1.0
    before = snapshot(opts[1])
    with pytest.raises(ValueError, match="lr"):
        opts[1].step()
    assert_unchanged(opts[1], before)
