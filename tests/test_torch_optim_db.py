"""PyTorch's own optimizer test database against fastdescent.torch.

For every class of ``fastdescent.torch`` that has an ``OptimizerInfo`` in
``torch.testing._internal.common_optimizers.optim_db`` (so a rule added to
``fastdescent.torch`` is picked up here without a change), every configuration
of its ``optim_inputs_func`` on the CPU, with each implementation flag it
supports there (none, ``foreach``, ``fused``), trains a set of parameters of
every layout for several steps, side by side with the ``torch.optim`` class's
for-loop implementation (never the fused one, which steps non-contiguous
parameters wrongly in torch 2.13); parameters and state must agree within
``torch_support.tolerance``.

The database needs PyTorch's test dependency ``expecttest``; without it this
module is skipped.
"""

import copy
import inspect

import pytest

torch = pytest.importorskip("torch")
common = pytest.importorskip("torch.testing._internal.common_optimizers",
                             reason="torch's optimizer test database needs expecttest")

import fastdescent.torch as fdt  # noqa: E402
from rule_cases import for_loop  # noqa: E402
from torch_support import assert_close, one_torch_thread, torch_computes_as_fastdescent  # noqa: E402, F401

STEPS = 10
DTYPES = {"float32": torch.float32, "float64": torch.float64}
IMPLEMENTATION_FLAGS = ("foreach", "fused")  # differentiable=True is refused by design


def our_classes():
    return {name: getattr(fdt, name) for name in fdt.__all__ if inspect.isclass(getattr(fdt, name))}


def configurations():
    """(test id, OptimizerInfo, kwargs, dtype) for every configuration we can run."""
    ours = our_classes()
    cases = []
    for info in common.optim_db:
        if info.name not in ours:
            continue
        for dtype_name, dtype in DTYPES.items():
            try:
                inputs = info.optim_inputs_func("cpu", dtype)
            except TypeError:  # some take the device only
                inputs = info.optim_inputs_func("cpu")
            flags = [None] + [f for f in IMPLEMENTATION_FLAGS if f in info.supported_impls
                              and (f != "fused" or "cpu" in info.supports_fused_on)]
            for optim_input in inputs:
                if optim_input.params is not None:
                    continue  # an input made for a particular error test
                for flag in flags:
                    kwargs = copy.deepcopy(optim_input.kwargs)
                    if flag is not None:
                        kwargs[flag] = True
                    label = f"{info.name}-{optim_input.desc}-{flag or 'plain'}-{dtype_name}".replace(" ", "_")
                    cases.append(pytest.param(info, kwargs, dtype, id=label))
    return cases


def parameters(dtype, complex_ok, seed=0):
    """Named parameters of every layout: contiguous, gapped (``[:, ::2]``, a
    column), transposed, 0-d, and complex ones if the rule takes them."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, kind=dtype):
        return torch.randn(*shape, generator=g, dtype=kind)

    made = {
        "weight": randn(6, 5),
        "bias": randn(6),
        "strided": randn(6, 10)[:, ::2],
        "column": randn(5, 3)[:, 1],
        "transposed": randn(5, 6).t(),
        "scalar": randn(()),
    }
    if complex_ok:
        kind = torch.complex64 if dtype == torch.float32 else torch.complex128
        made["complex"] = randn(4, kind=kind)
        made["complex_strided"] = randn(3, 6, kind=kind)[:, ::2]
    return {name: torch.nn.Parameter(t) for name, t in made.items()}


def loss(params, step, g):
    """A smooth loss that couples the matrices and gives every parameter a gradient
    that changes from step to step."""
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    total = 0.0
    for name, p in params.items():
        target = torch.randn(p.shape, generator=g, dtype=p.dtype)
        scale = 1.0 + (len(name) % 5) * 0.1 + step * 0.05
        total = total + scale * ((p - target).abs() ** 2).sum()
    x = x.to(params["weight"].dtype)
    mixed = params["weight"] @ x + params["transposed"] @ x
    return total + (torch.tanh(mixed) ** 2).sum()


def train(cls, kwargs, params, seed=1):
    opt = cls(list(params.values()), **kwargs)
    g = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        opt.zero_grad()
        loss(params, step, g).backward()
        opt.step()
    return opt


def accepted(info, params):
    """The parameters ``info``'s torch class takes (e.g. Muon: matrices only)."""
    try:
        info.optim_cls(list(params.values()))
        return params
    except ValueError:
        return {name: p for name, p in params.items() if p.dim() == 2}


@pytest.mark.parametrize(("info", "kwargs", "dtype"), configurations())
def test_optim_db_configuration_matches_torch_forloop(info, kwargs, dtype):
    # A tensor lr in the parameters' dtype: with a float32 one torch.optim.Muon computes
    # its step's scalars in float32 (fastdescent in double), 2e-7 apart for float64.
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    reference_kwargs = {k: v for k, v in kwargs.items() if k not in IMPLEMENTATION_FLAGS}
    reference_kwargs.update(for_loop(info.optim_cls))
    names = list(accepted(info, parameters(dtype, info.supports_complex)))
    ours = {n: p for n, p in parameters(dtype, info.supports_complex).items() if n in names}
    theirs = {n: p for n, p in parameters(dtype, info.supports_complex).items() if n in names}
    fast = train(our_classes()[info.name], copy.deepcopy(kwargs), ours)
    reference = train(info.optim_cls, reference_kwargs, theirs)
    for name in names:
        a, b = ours[name], theirs[name]
        assert a.stride() == b.stride(), name
        assert_close(a.detach(), b.detach(), f"parameter {name}")
        for key, value in reference.state[b].items():
            got = fast.state[a][key]
            if not isinstance(value, torch.Tensor):
                assert got == value, f"{name} state {key}"
            elif key == "step":
                assert got.item() == value.item(), f"{name} step"
            else:
                assert_close(got, value.to(got.dtype), f"{name} state {key}")


def test_every_class_with_an_optimizer_info_is_covered():
    covered = {info.name for info in common.optim_db} & set(our_classes())
    assert {"SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "ASGD", "Rprop", "Adadelta", "Adamax", "NAdam",
            "RAdam"} <= covered
