"""fastdescent.torch.step_in_backward: ``backward()`` alone updates the parameters,
bit for bit as ``backward(); step()`` does, with or without the worker thread."""

import pytest

torch = pytest.importorskip("torch")

import fastdescent.torch as fdt  # noqa: E402
from test_torch import FULL, RULES  # noqa: E402
from test_torch_layouts import LATE, Layouts  # noqa: E402
from torch_support import one_torch_thread, takes, trained  # noqa: E402, F401

STEPS = 12


def train(rule, kwargs, mode, dtype=torch.float32, steps=STEPS):
    """Train the every-layout model; ``mode``: "step", "backward" or "overlap"."""
    model = Layouts(dtype)
    opt = getattr(fdt, rule)(trained(rule, model), **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    handle = None if mode == "step" else fdt.step_in_backward(opt, overlap=mode == "overlap")
    g = torch.Generator().manual_seed(1)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    for step in range(steps):
        x = torch.randn(8, 6, generator=g, dtype=dtype)
        y = torch.randn(8, 3, generator=g, dtype=dtype)
        loss = sign * torch.nn.functional.mse_loss(model(x, step), y)
        if handle is None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            loss.backward()
            assert all(p.grad is None for p in trained(rule, model)), "every gradient is freed"
        scheduler.step()
    if handle is not None:
        handle.remove()
    return model, opt


@pytest.mark.parametrize("mode", ["backward", "overlap"])
@pytest.mark.parametrize("rule", RULES)
def test_step_in_backward_equals_step_bit_for_bit(rule, mode):
    _, kwargs = FULL[rule]
    expected_model, expected_opt = train(rule, kwargs, "step")
    model, opt = train(rule, kwargs, mode)
    for (name, a), b in zip(model.named_parameters(), expected_model.parameters()):
        assert torch.equal(a, b), name
        assert list(opt.state[a]) == list(expected_opt.state[b])
        for key, value in expected_opt.state[b].items():
            assert torch.equal(opt.state[a][key], value), f"{name} {key}"
    if opt.spec.counts_steps and takes(rule, model.late):
        assert opt.state[model.late]["step"].item() == STEPS - LATE


@pytest.mark.parametrize("overlap", [False, True])
def test_backward_returns_with_every_parameter_updated(overlap):
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 2))
    opt = fdt.AdamW(model.parameters(), lr=0.1)
    handle = fdt.step_in_backward(opt, overlap=overlap)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 20)).square().sum().backward()
    handle.wait()  # backward already waited: nothing left
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert all(s["step"].item() == 1 for s in opt.state.values())
    handle.remove()


def test_remove_restores_the_plain_step():
    model = torch.nn.Linear(3, 2)
    opt = fdt.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fdt.step_in_backward(opt, overlap=True).remove()
    model(torch.randn(5, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_global_norm_clipping_is_refused():
    opt = fdt.Adam(torch.nn.Linear(3, 2).parameters())
    opt.clip_grad_norm = 1.0
    with pytest.raises(ValueError, match="global gradient norm"):
        fdt.step_in_backward(opt)


def test_torch_optimizer_is_refused():
    with pytest.raises(TypeError, match="fastdescent.torch optimizer"):
        fdt.step_in_backward(torch.optim.Adam(torch.nn.Linear(3, 2).parameters()))


@pytest.mark.parametrize("overlap", [False, True])
def test_error_in_an_update_is_raised_by_backward(overlap):
    """A bad hyperparameter: backward raises, naming it; the handle stays usable."""
    model = torch.nn.Linear(3, 2)
    opt = fdt.Adam(model.parameters(), lr=0.1)
    handle = fdt.step_in_backward(opt, overlap=overlap)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        model(torch.randn(5, 3)).sum().backward()
    opt.param_groups[0]["lr"] = 0.1
    for p in model.parameters():
        p.grad = None
    model(torch.randn(5, 3)).sum().backward()
    assert all(s["step"].item() == 1 for s in opt.state.values())
    handle.remove()


def test_benchmark_reports_time_and_peak_gradient_memory():
    """Only that it runs and measures (the figures live in BENCHMARKS.md)."""
    from fastdescent.torch import benchmark

    rows = benchmark.benchmark_step_in_backward(width=16, layers=3, batch=4, rounds=3, n_threads=1)
    assert [r["mode"] for r in rows] == list(benchmark.BACKWARD_MODES)
    assert all(r["median"] > 0 and r["tensors"] == 6 for r in rows)
    everything = rows[0]["parameters"] * 4
    assert rows[0]["peak_gradient_bytes"] == everything
    assert rows[1]["peak_gradient_bytes"] < everything
    assert "peak gradients MB" in benchmark.format_backward_rows(rows)


def test_group_added_later_is_stepped_too():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = fdt.SGD(model[0].parameters(), lr=0.1)
    handle = fdt.step_in_backward(opt)
    model(torch.randn(3, 4)).sum().backward()
    opt.add_param_group({"params": model[1].parameters()})
    before = [p.detach().clone() for p in model[1].parameters()]
    for p in model[1].parameters():
        p.grad = None
    model(torch.randn(3, 4)).sum().backward()
    assert all(not torch.equal(b, p) and p.grad is None for b, p in zip(before, model[1].parameters()))
    handle.remove()
