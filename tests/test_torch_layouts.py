"""Parameters in any layout torch.optim takes: the same training as its for-loop
implementation, within the bound of ``torch_support.tolerance``.

Dense parameters (contiguous, channels_last, transposed) are stepped in place;
gapped ones (a ``[:, ::2]`` slice, a column of a matrix) through a scratch block;
parameters that share a storage but no element are both stepped.
"""

import pytest

torch = pytest.importorskip("torch")

import fastdescent.torch as fdt  # noqa: E402
from rule_cases import for_loop  # noqa: E402
from test_torch import FULL, RULES  # noqa: E402
from torch_support import (  # noqa: E402, F401
    assert_close, one_torch_thread, roundtrip, takes, torch_computes_as_fastdescent, trained,
)

STEPS = 20
LATE = 6  # the step at which ``late`` gets its first gradient


class Layouts(torch.nn.Module):
    """A small network whose parameters take every layout: gapped (a slice with
    stride 2, a column), transposed, channels_last, two interleaved halves of one
    matrix, a 0-d scale and one that joins the loss late."""

    def __init__(self, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=dtype)

        P = torch.nn.Parameter
        self.halves = randn(6, 10)  # one storage, two parameters sharing no element
        self.even, self.odd = P(self.halves[:, ::2]), P(self.halves[:, 1::2])
        self.column = P(randn(5, 7)[:, 2])
        self.transposed = P(randn(3, 5).t())
        self.conv = P(randn(3, 3, 2, 2).contiguous(memory_format=torch.channels_last))
        self.scale = P(randn(()))
        self.late = P(randn(3))

    def forward(self, x, step):
        h = torch.tanh(x @ self.even + x @ self.odd)               # (B, 5)
        h = h * self.column                                       # (B, 5)
        out = h @ self.transposed * self.scale                    # (B, 3)
        image = x[:, :3, None, None] * x[:, None, 2:6].reshape(-1, 1, 2, 2)     # (B, 3, 2, 2)
        out = out + torch.nn.functional.conv2d(image, self.conv).reshape(len(x), 3)
        if step >= LATE:
            out = out + self.late
        return out


def test_the_layouts_are_what_they_claim():
    model = Layouts(torch.float32)
    assert model.even.stride() == (10, 2) and model.odd.data_ptr() == model.even.data_ptr() + 4
    assert model.column.stride() == (7,)
    assert model.transposed.stride() == (1, 5)
    assert model.conv.is_contiguous(memory_format=torch.channels_last) and not model.conv.is_contiguous()
    assert model.scale.dim() == 0


def train_layouts(rule, kwargs, library, dtype):
    model = Layouts(dtype)
    if library is torch.optim:
        kwargs = dict(kwargs, **for_loop(getattr(torch.optim, rule)))
    opt = getattr(library, rule)(trained(rule, model), **kwargs)
    g = torch.Generator().manual_seed(1)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    for step in range(STEPS):
        x = torch.randn(8, 6, generator=g, dtype=dtype)
        y = torch.randn(8, 3, generator=g, dtype=dtype)
        opt.zero_grad()
        (sign * torch.nn.functional.mse_loss(model(x, step), y)).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rule", RULES)
def test_every_layout_trains_as_torch_optim(rule, dtype):
    _, kwargs = FULL[rule]
    fast_model, fast_opt = train_layouts(rule, kwargs, fdt, dtype)
    torch_model, torch_opt = train_layouts(rule, kwargs, torch.optim, dtype)
    for (name, a), b in zip(fast_model.named_parameters(), torch_model.parameters()):
        assert a.stride() == b.stride(), name
        assert_close(a.detach(), b.detach(), name)
        for key, value in torch_opt.state[b].items():
            got = fast_opt.state[a][key]
            if key == "step":
                assert got.item() == value.item(), name
            else:
                assert_close(got, value, f"{name} state {key}")
    # The parameters are still views of their storage, and the gaps between them untouched.
    assert fast_model.even.data_ptr() == fast_model.halves.data_ptr()
    torch.testing.assert_close(fast_model.halves[:, ::2], fast_model.even.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fast_model.halves[:, 1::2], fast_model.odd.detach(), rtol=0, atol=0)


def test_gapped_parameter_leaves_the_rest_of_its_storage_alone():
    """Only the elements of the view change, unlike torch 2.13's fused CPU Adam on
    such a view (which wrote rows 0-1 of a 4x6 tensor whole and left rows 2-3)."""
    base = torch.randn(4, 6)
    original = base.clone()
    p = torch.nn.Parameter(base[:, ::2])
    opt = fdt.Adam([p], lr=0.1)
    p.grad = torch.ones(4, 3)
    opt.step()
    twin = torch.nn.Parameter(original.clone()[:, ::2])
    reference = torch.optim.Adam([twin], lr=0.1, foreach=False)
    twin.grad = torch.ones(4, 3)
    reference.step()
    assert torch.equal(base[:, 1::2], original[:, 1::2])
    assert_close(p.detach(), twin.detach(), "gapped parameter")


@pytest.mark.parametrize("rule", RULES)
def test_complex_gapped_parameter(rule):
    _, kwargs = FULL[rule]
    if not takes(rule, torch.zeros(4, 3, dtype=torch.complex64)):
        pytest.skip(f"{rule} takes no complex parameters (neither does torch.optim.{rule})")

    def make():
        g = torch.Generator().manual_seed(4)
        return torch.nn.Parameter(torch.randn(5, 8, dtype=torch.complex64, generator=g)[1:, ::3])

    fast, ref = make(), make()
    fast_opt = getattr(fdt, rule)([fast], **kwargs)
    torch_opt = getattr(torch.optim, rule)([ref], foreach=False, **kwargs)
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        grad = torch.randn(4, 3, dtype=torch.complex64, generator=g)
        for p, opt in ((fast, fast_opt), (ref, torch_opt)):
            p.grad = grad.clone()
            opt.step()
    assert_close(fast.detach(), ref.detach(), "complex gapped parameter")


def test_gapped_parameter_with_a_gradient_laid_out_otherwise():
    """A transposed gradient of a gapped parameter is copied into the scratch layout."""
    def make():
        return torch.nn.Parameter(torch.arange(24.0).reshape(4, 6)[:, 1::2] / 10)

    fast, ref = make(), make()
    fast_opt, torch_opt = fdt.RMSprop([fast], lr=0.01), torch.optim.RMSprop([ref], lr=0.01, foreach=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        grad = torch.randn(3, 4, generator=g).t()
        fast.grad, ref.grad = grad, grad.clone()
        fast_opt.step()
        torch_opt.step()
    assert_close(fast.detach(), ref.detach(), "gapped parameter")


def test_parameter_carved_from_one_buffer():
    """Parameters that are consecutive slices of one flat buffer (no gaps, no overlap)."""
    def make():
        flat = torch.linspace(-1, 1, 30)
        return [torch.nn.Parameter(flat[0:12].view(3, 4)), torch.nn.Parameter(flat[12:30].view(6, 3))]

    fast, ref = make(), make()
    fast_opt, torch_opt = fdt.AdamW(fast, lr=0.01), torch.optim.AdamW(ref, lr=0.01, foreach=False)
    for step in range(8):
        for params, opt in ((fast, fast_opt), (ref, torch_opt)):
            opt.zero_grad()
            (params[0].sum() * step + (params[1] ** 2).sum()).backward()
            opt.step()
    for a, b in zip(fast, ref):
        assert_close(a.detach(), b.detach(), "carved parameter")


def test_misaligned_parameter_and_gradient():
    """Tensors made from a byte buffer at an odd offset: stepped through copies."""
    def misaligned(values):
        raw = bytearray(4 * values.numel() + 1)
        t = torch.frombuffer(raw, dtype=torch.float32, offset=1, count=values.numel())
        t.copy_(values)
        assert t.data_ptr() % 4
        return t

    start = torch.linspace(-1, 1, 7)
    fast, ref = torch.nn.Parameter(misaligned(start)), torch.nn.Parameter(start.clone())
    fast_opt, torch_opt = fdt.Adam([fast], lr=0.1), torch.optim.Adam([ref], lr=0.1, foreach=False)
    for step in range(4):
        grad = torch.linspace(0.5, -0.5, 7) * (step + 1)
        fast.grad, ref.grad = misaligned(grad), grad
        fast_opt.step()
        torch_opt.step()
    assert_close(fast.detach(), ref.detach(), "misaligned parameter")


def test_gradient_changed_in_place_between_steps_is_seen():
    """The same gradient objects from step to step (zero_grad(set_to_none=False)):
    transposed in place, then resized, the change is noticed (their version moved)."""
    def make():
        return torch.nn.Parameter(torch.arange(16.0).reshape(4, 4) / 10)

    fast, ref = make(), make()
    fast_opt, torch_opt = fdt.Adam([fast], lr=0.1), torch.optim.Adam([ref], lr=0.1, foreach=False)
    grad = torch.linspace(-1, 1, 16).reshape(4, 4)
    for p, opt in ((fast, fast_opt), (ref, torch_opt)):
        p.grad = grad.clone()
        opt.step()
        p.grad.t_()
        opt.step()
    assert_close(fast.detach(), ref.detach(), "after a transposed gradient")
    fast.grad.resize_(2)
    with pytest.raises(ValueError, match=r"its gradient has shape \(2,\)"):
        fast_opt.step()


@pytest.mark.parametrize("rule", RULES)
def test_state_dict_of_every_layout_moves_between_implementations(rule):
    """Trained by fastdescent, checkpointed, resumed by torch.optim on a copy of the
    model (and the other way round): the same as training on with the first."""
    _, kwargs = FULL[rule]
    fast_model, fast_opt = train_layouts(rule, kwargs, fdt, torch.float32)
    torch_model, torch_opt = train_layouts(rule, kwargs, torch.optim, torch.float32)
    for source_model, source_opt, library in ((fast_model, fast_opt, torch.optim), (torch_model, torch_opt, fdt)):
        resumed_model = Layouts(torch.float32)
        resumed_model.load_state_dict(source_model.state_dict())
        extra = for_loop(getattr(torch.optim, rule)) if library is torch.optim else {}
        resumed = getattr(library, rule)(trained(rule, resumed_model), **kwargs, **extra)
        resumed.load_state_dict(roundtrip(source_opt.state_dict()))  # not sharing its tensors
        g = torch.Generator().manual_seed(7)
        for step in range(3):
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
            for model, opt in ((source_model, source_opt), (resumed_model, resumed)):
                opt.zero_grad()
                sign = -1.0 if kwargs.get("maximize") else 1.0
                (sign * torch.nn.functional.mse_loss(model(x, STEPS + step), y)).backward()
                opt.step()
        for (name, a), b in zip(resumed_model.named_parameters(), source_model.parameters()):
            assert_close(a.detach(), b.detach(), name)
