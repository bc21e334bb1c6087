"""The lean ``step()``: torch.optim's wrapper (profiler range, hook loops) runs only
when something listens, and then behaves as torch's."""

import pytest

torch = pytest.importorskip("torch")

import fastdescent.torch as fdt  # noqa: E402
from torch.optim import optimizer as optimizer_module  # noqa: E402
from torch_support import one_torch_thread  # noqa: E402, F401


def stepped(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


def test_step_is_not_wrapped_twice():
    opt = fdt.Adam([torch.nn.Parameter(torch.randn(3))])
    assert type(opt).step is fdt.Adam.step and getattr(fdt.Adam.step, "hooked", False)
    assert getattr(fdt.Adam.step, "__wrapped__", None) is None  # torch did not wrap it


def test_profiler_sees_the_step_under_torch_name():
    opt = fdt.Adam([torch.nn.Parameter(torch.randn(3))])
    with torch.profiler.profile() as profile:
        stepped(opt)
    assert "Optimizer.step#Adam.step" in {event.name for event in profile.events()}


def test_global_hooks_run_and_may_replace_the_arguments():
    calls = []
    opt = fdt.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)

    def pre(optimizer, args, kwargs):
        calls.append(("pre", optimizer is opt, len(args)))

    def post(optimizer, args, kwargs):
        calls.append(("post", optimizer is opt, len(args)))

    handles = [optimizer_module.register_optimizer_step_pre_hook(pre),
               optimizer_module.register_optimizer_step_post_hook(post)]
    try:
        stepped(opt)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("pre", True, 1), ("post", True, 1)]  # args hold self, as torch passes them
    stepped(opt)
    assert len(calls) == 2


def test_pre_hook_replacing_the_closure():
    opt = fdt.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: 42.0}))
    assert opt.step() == 42.0


def test_overhead_benchmark_runs():
    """Only that it runs and reports (the figures live in BENCHMARKS.md)."""
    from fastdescent.torch import benchmark

    rows = benchmark.benchmark_step_overhead(n_tensors=(1, 3), size=10, rounds=30)
    assert [r["n_tensors"] for r in rows] == [1, 3]
    assert all(r["ratio"] > 0 and r["reach"] > 0 and r["reach_new"] >= 0 for r in rows)
    assert "torch fused" in benchmark.format_overhead_rows(rows)
