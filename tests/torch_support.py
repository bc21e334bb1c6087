"""Shared helpers of the PyTorch adapter tests: models, data, training, comparison."""

import functools
import io

import pytest
import torch

import fastdescent.torch as fdt
from rule_cases import torch_as_fastdescent, torch_examples

#: Every example of every rule that torch.optim can run (derived from the rule
#: specs), each run with torch.optim and fastdescent.torch: name -> (class, options).
CONFIGS = torch_examples()

STEPS = 50


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def convnet(dtype=torch.float32, seed=0, memory_format=torch.contiguous_format):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3), torch.nn.Tanh(), torch.nn.Conv2d(6, 4, 3, padding=1),
                              torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    return net.to(dtype=dtype, memory_format=memory_format)


MODELS = {"mlp": (mlp, (10,)), "conv": (convnet, (2, 8, 8))}


def takes(rule, p):
    """True if ``rule`` (a class name) updates parameter ``p``: if torch.optim's peer
    takes it (:func:`torch_steps`; torch.optim.Muon only real matrices)."""
    return not hasattr(torch.optim, rule) or torch_steps(rule, tuple(p.shape), p.dtype)


def trained(rule, model):
    """The parameters of ``model`` that ``rule`` trains; the others keep their values."""
    return [p for p in model.parameters() if takes(rule, p)]


def batches(input_shape, steps=STEPS, batch=16, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *input_shape, generator=generator, dtype=dtype),
             torch.randn(batch, 3, generator=generator, dtype=dtype)) for _ in range(steps)]


def loss_fn(model, x, y, maximize=False):
    loss = torch.nn.functional.mse_loss(model(x), y)
    return -loss if maximize else loss  # maximizing -loss trains the same way


def train(model, optimizer, data, maximize=False, scheduler=None):
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model, x, y, maximize).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@functools.cache
def torch_steps(rule, shape, dtype):
    """True if ``torch.optim.<rule>`` takes and can step a parameter of ``shape`` and
    ``dtype`` (torch.optim.Adafactor refuses complex ones and divides by an empty
    one's size; torch.optim.Muon takes real matrices only)."""
    p = torch.nn.Parameter(torch.ones(shape, dtype=dtype))
    try:
        opt = getattr(torch.optim, rule)([p])
        p.grad = torch.ones_like(p)
        opt.step()
    except (RuntimeError, ValueError, ZeroDivisionError):
        return False
    return True


def tolerance(dtype):
    """The bound the tests assert, relative to a tensor's largest magnitude."""
    return 2.0**-16 if dtype in (torch.float32, torch.complex64) else 2.0**-40


def max_relative_error(actual, expected):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if scale == 0.0:
        return (actual - expected).abs().max().item() if actual.numel() else 0.0
    return ((actual - expected).abs().max() / scale).item()


def assert_close(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    error = max_relative_error(actual, expected)
    assert error <= tolerance(expected.dtype), f"{what}: relative error {error:.3g}"


def assert_same_training_state(fast_model, fast_opt, torch_model, torch_opt):
    """Parameters, and every state entry of every parameter, within the bound."""
    for (name, a), b in zip(fast_model.named_parameters(), torch_model.parameters()):
        assert_close(a.detach(), b.detach(), f"parameter {name}")
    fast, ref = fast_opt.state_dict(), torch_opt.state_dict()
    assert fast["state"].keys() == ref["state"].keys()
    for index, ref_state in ref["state"].items():
        assert list(fast["state"][index]) == list(ref_state), f"state keys of parameter {index}"
        for key, value in ref_state.items():
            got = fast["state"][index][key]
            if key == "step":
                assert got.dtype == value.dtype and got.shape == () and got.item() == value.item(), key
            else:
                assert_close(got, value, f"state[{index}][{key!r}]")


def snapshot(opt):
    """Copies of every parameter, state tensor and step counter of ``opt``."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def assert_unchanged(opt, before):
    """Every parameter, state tensor and step counter is byte-identical to ``before``
    (a ``snapshot``), and no state entry was added or removed."""
    params, state = before
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    for a, b in zip(now, params):
        assert a.dtype == b.dtype and torch.equal(a, b), "a parameter was written"
    assert {id(p) for p in opt.state} == set(state), "state entries were added or removed"
    for p, s in opt.state.items():
        assert list(s) == list(state[id(p)]), "state keys changed"
        for k, v in state[id(p)].items():
            if isinstance(v, torch.Tensor):
                assert s[k].dtype == v.dtype and torch.equal(s[k], v), f"state {k} was written"
            else:
                assert s[k] == v, f"state {k} was written"


def roundtrip(state_dict):
    """Through torch.save and torch.load, as a checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.fixture(autouse=True)
def torch_computes_as_fastdescent():
    """See rule_cases.torch_as_fastdescent (Muon's iteration in the parameter's dtype)."""
    with torch_as_fastdescent(torch):
        yield


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Serial torch ops: the models are tiny, and on a shared machine torch's
    thread pool makes them hundreds of times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
