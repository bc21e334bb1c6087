"""Low-precision storage in fastdescent.torch (issue 16): bfloat16/float16 parameters
with and without master copies, bfloat16 and int8 state, on every layout, equal to
the NumPy optimizers bit for bit; step_in_backward; state dicts, conversions and
torch.optim; bad combinations."""

import copy
import pickle
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

import fastdescent as fd
import fastdescent.torch as fdt
from fastdescent import precision
from fastdescent.torch import _layout
from torch_support import MODELS, batches, convnet, loss_fn, mlp

#: (parameter dtype, storage options) of the modes every class runs in.
MODES = {
    "f32-int8-stochastic": (torch.float32, dict(state_dtype="int8", rounding="stochastic", seed=4)),
    "f32-bf16": (torch.float32, dict(state_dtype="bfloat16")),
    "bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "bf16-master-int8": (torch.bfloat16, dict(master_weights=True, state_dtype="int8")),
    "bf16-stochastic": (torch.bfloat16, dict(rounding="stochastic", seed=2)),
    "f16-master-bf16": (torch.float16, dict(master_weights=True, state_dtype="bfloat16")),
}
CLASSES = {"Adam": dict(lr=1e-2), "AdamW": dict(lr=1e-2), "SGD": dict(lr=0.05, momentum=0.9),
           "RMSprop": dict(lr=1e-3), "Adagrad": dict(lr=0.05), "Lion": dict(lr=1e-3)}
STEPS = 6


def numpy_of(t):
    """A NumPy array sharing ``t``'s memory (bfloat16 as ml_dtypes.bfloat16), in its memory order."""
    view = _layout.flat_view(t)
    return view.view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else view


def bits(t):
    return _layout.flat_view(t.detach()).view(np.uint8) if isinstance(t, torch.Tensor) else np.asarray(t).view(np.uint8)


def trained(name, mode, model_name="mlp", steps=STEPS, memory_format=torch.contiguous_format):
    dtype, options = MODES[mode]
    make, shape = MODELS[model_name]
    model = make(dtype, memory_format=memory_format) if model_name == "conv" else make(dtype)
    opt = getattr(fdt, name)(model.parameters(), **CLASSES[name], **options)
    data = batches(shape, steps=steps, dtype=dtype)
    grads = []
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).float().backward()
        grads.append([numpy_of(p.grad).copy() for p in model.parameters()])
        opt.step()
    return model, opt, grads


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CLASSES))
def test_torch_equals_the_numpy_optimizer(name, mode):
    """The same gradients through fastdescent.torch and through the NumPy optimizer
    (on the parameters' memory, in memory order): the same bits everywhere."""
    dtype, options = MODES[mode]
    model = mlp(dtype)
    start = [numpy_of(p.detach()).copy() for p in model.parameters()]
    model, opt, grads = trained(name, mode)
    arrays = [a.copy() for a in start]
    numpy_opt = getattr(fd, name)(arrays, **CLASSES[name], **options)
    for g in grads:
        numpy_opt.step(g)
    for k, (p, a) in enumerate(zip(model.parameters(), arrays)):
        assert np.array_equal(bits(p), a.view(np.uint8)), f"param {k}"
        for key, value in opt.state[p].items():
            if key == "step":
                assert float(value) == numpy_opt.state[k][key]
            else:
                assert np.array_equal(bits(value), np.ascontiguousarray(numpy_opt.state[k][key]).view(np.uint8)), key


@pytest.mark.parametrize("mode", ["f32-int8-stochastic", "bf16-master-int8", "bf16-stochastic"])
def test_channels_last_and_gapped_parameters(mode):
    """A channels_last conv net (blocks follow the memory order) and a gapped
    parameter (stepped in a scratch copy) equal the NumPy optimizer on the same
    memory-order arrays."""
    dtype, options = MODES[mode]
    model = convnet(dtype, memory_format=torch.channels_last)
    weight = torch.nn.Parameter(torch.randn(6, 10, dtype=dtype)[:, ::2])  # gapped
    params = [*model.parameters(), weight]
    start = [numpy_of(p.detach().contiguous() if p is weight else p.detach()).copy() for p in params]
    opt = fdt.Adam(params, lr=1e-2, **options)
    data = batches((2, 8, 8), steps=4, dtype=dtype)
    grads = []
    for x, y in data:
        opt.zero_grad()
        (loss_fn(model, x, y) + (weight.float() ** 2).sum() * 1e-3).float().backward()
        grads.append([numpy_of(p.grad.contiguous() if p is weight else p.grad).copy() for p in params])
        opt.step()
    arrays = [a.copy() for a in start]
    numpy_opt = fd.Adam(arrays, lr=1e-2, **options)
    for g in grads:
        numpy_opt.step(g)
    for k, (p, a) in enumerate(zip(params, arrays)):
        actual = p.detach().contiguous() if p is weight else p.detach()
        assert np.array_equal(bits(actual), a.view(np.uint8)), f"param {k}"


@pytest.mark.parametrize("mode", list(MODES))
def test_plan_steps_equal_general_steps(mode):
    """Low-precision buckets take the C step plan (through a StoredCall per bucket)
    from the second step on, with the general way's bits (the other optimizer's plan
    is dropped before each step); after cached steps a gradient the plan cannot take
    as it is (sparse, or its own parameter) still raises, with nothing written."""
    dtype, options = MODES[mode]
    models = [mlp(dtype), mlp(dtype)]
    opts = [fdt.Adam(m.parameters(), **CLASSES["Adam"], **options) for m in models]
    for x, y in batches((10,), steps=4, dtype=dtype):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss_fn(model, x, y).float().backward()
        opts[1].__dict__["_fd_step_plan"] = None
        for opt in opts:
            opt.step()
    steady, general = opts
    assert steady.__dict__.get("_fd_step_plan") is not None
    for p, q in zip(*(m.parameters() for m in models)):
        assert np.array_equal(bits(p), bits(q))
        assert steady.state[p].keys() == general.state[q].keys()
        for key, value in steady.state[p].items():
            assert np.array_equal(bits(value), bits(general.state[q][key])), key
    p = next(models[0].parameters())
    before = [bits(p).copy()] + [bits(v).copy() for v in steady.state[p].values()]
    for grad, error, match in [(p.detach(), ValueError, "shares memory"),
                               (torch.zeros_like(p).to_sparse(), TypeError, "sparse")]:
        p.grad = grad
        with pytest.raises(error, match=match):
            steady.step()
    after = [bits(p)] + [bits(v) for v in steady.state[p].values()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("mode", ["f32-int8-stochastic", "bf16-master-int8", "bf16-stochastic"])
def test_step_in_backward_equals_step(mode):
    """Per-parameter updates from the backward hooks draw the same random bits
    (keys are per parameter, not per call)."""
    dtype, options = MODES[mode]
    stepped, opt, _ = trained("Adam", mode)
    model = mlp(dtype)
    hooked = fdt.Adam(model.parameters(), **CLASSES["Adam"], **options)
    handle = fdt.step_in_backward(hooked)
    for x, y in batches((10,), steps=STEPS, dtype=dtype):
        loss_fn(model, x, y).float().backward()
    handle.remove()
    for p, q in zip(model.parameters(), stepped.parameters()):
        assert np.array_equal(bits(p), bits(q))


@pytest.mark.parametrize("mode", list(MODES))
def test_state_dict_round_trip_and_torch_optim(mode):
    dtype, options = MODES[mode]
    model, opt, _ = trained("Adam", mode, steps=3)
    sd = opt.state_dict()
    assert sd.get("storage", precision.Storage().as_dict()) == precision.Storage.of(**options).as_dict()
    again = mlp(dtype)
    again.load_state_dict(model.state_dict())
    resumed = fdt.Adam(again.parameters(), **CLASSES["Adam"], **options)
    resumed.load_state_dict(copy.deepcopy(sd))
    for p, q in zip(model.parameters(), again.parameters()):
        for key, value in opt.state[p].items():
            assert resumed.state[q][key].dtype == value.dtype and np.array_equal(bits(resumed.state[q][key]),
                                                                                 bits(value)), key
    for x, y in batches((10,), steps=2, dtype=dtype, seed=5):
        for m, o in ((model, opt), (again, resumed)):
            o.zero_grad()
            loss_fn(m, x, y).float().backward()
            o.step()
    for p, q in zip(model.parameters(), again.parameters()):
        assert np.array_equal(bits(p), bits(q))
    torch_model = mlp(dtype)
    torch_opt = torch.optim.Adam(torch_model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", precision.StateConversion)
        torch_opt.load_state_dict(fdt.upcast_state_dict(sd))
    for p, q in zip(model.parameters(), torch_model.parameters()):
        entry = torch_opt.state[q]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        saved = opt.state[p]["exp_avg"]
        if saved.dtype == torch.bfloat16:
            assert torch.equal(entry["exp_avg"].float(), saved.float().to(q.dtype).float())
    x, y = batches((10,), steps=1, dtype=dtype)[0]
    loss_fn(torch_model, x, y).float().backward()
    torch_opt.step()  # it runs


def test_loading_another_storage_needs_convert():
    model, opt, _ = trained("Adam", "f32-int8-stochastic", steps=2)
    sd = opt.state_dict()
    plain = fdt.Adam(mlp().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="convert=True"):
        plain.load_state_dict(sd)
    assert not plain.state
    with pytest.warns(precision.StateConversion, match="'exp_avg' int8 -> float32"):
        plain.load_state_dict(sd, convert=True)
    p = next(iter(plain.state))
    assert plain.state[p]["exp_avg"].dtype == torch.float32 and "exp_avg_scales" not in plain.state[p]
    master = fdt.Adam(mlp(torch.bfloat16).parameters(), lr=1e-2, master_weights=True)
    bf16_model, bf16_opt, _ = trained("Adam", "bf16-stochastic", steps=2)
    with pytest.warns(precision.StateConversion, match="master copies made from the parameters"):
        master.load_state_dict(bf16_opt.state_dict(), convert=True)


def test_pickled_optimizer_keeps_its_storage():
    model, opt, _ = trained("Adam", "bf16-master-int8", steps=1)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone._fd_storage == opt._fd_storage


def test_bad_combinations_raise_before_anything_changes():
    with pytest.raises(ValueError, match="their own master"):
        fdt.Adam(mlp().parameters(), master_weights=True)
    with pytest.raises(ValueError, match="needs a seed"):
        fdt.Adam(mlp().parameters(), state_dtype="int8", rounding="stochastic")
    with pytest.raises(ValueError, match="float64 parameters"):
        fdt.Adam(mlp(torch.float64).parameters(), state_dtype="bfloat16")
    with pytest.raises(ValueError, match="stochastic rounding into float16"):
        fdt.Adam(mlp(torch.float16).parameters(), rounding="stochastic", seed=1)
    with pytest.raises(ValueError, match="centered RMSprop"):
        fdt.RMSprop(mlp().parameters(), centered=True, state_dtype="int8")
    with pytest.raises(ValueError, match="'z' may only be kept"):
        fdt.ScheduleFreeSGD(mlp().parameters(), lr=0.1, state_dtype="bfloat16")
    with pytest.raises(TypeError, match="real parameters"):
        fdt.Adam([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))], state_dtype="bfloat16")
    model = mlp(torch.bfloat16)
    opt = fdt.RMSprop(model.parameters(), lr=1e-2, state_dtype="int8", rounding="nearest")
    x, y = batches((10,), steps=1, dtype=torch.bfloat16)[0]
    loss_fn(model, x, y).float().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["centered"] = True
    with pytest.raises(ValueError, match="centered RMSprop"):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
