"""A gradient may share no byte with anything a step of fastdescent.torch writes:
not only its own parameter and state, but every other parameter, state buffer,
int8 block scale and master copy of the optimizer. Such a gradient raises a
ValueError naming both before anything is written, on the step plan and on the
general way; a gradient that only lies next to written memory is taken."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastdescent.torch as fdt  # noqa: E402
from fastdescent.optim.lowprec import MASTER, scales_name  # noqa: E402
from fastdescent.torch import _layout  # noqa: E402
from test_torch_step_plan import counting_general_steps, general_way  # noqa: E402

#: (parameter dtype, storage options, the state keys besides Adam's buffers) of each mode.
MODES = {
    "native": (torch.float32, {}, ()),
    "f32-bf16": (torch.float32, dict(state_dtype="bfloat16"), ()),
    "f32-int8": (torch.float32, dict(state_dtype="int8"), (scales_name("exp_avg"), scales_name("exp_avg_sq"))),
    "bf16-master": (torch.bfloat16, dict(master_weights=True), (MASTER,)),
}
#: (mode, what the bad gradient of the first parameter aliases: the second parameter
#: ("param") or one of its state tensors).
CASES = [(mode, key) for mode, (_, _, extra) in MODES.items() for key in ("param", "exp_avg", "exp_avg_sq", *extra)]
PATHS = ("plan", "general")


def byte_copy(t):
    """The bytes of ``t``'s elements, in logical order."""
    return _layout.flat_view(t.detach().contiguous()).view(np.uint8).copy()


def snapshot(opt):
    """The bytes of every parameter and state tensor of ``opt``."""
    params = [byte_copy(p) for g in opt.param_groups for p in g["params"]]
    state = [{k: byte_copy(v) for k, v in s.items() if isinstance(v, torch.Tensor)} for s in opt.state.values()]
    return params, state


def assert_same_bytes(a, b):
    (params_a, state_a), (params_b, state_b) = a, b
    assert all(np.array_equal(x, y) for x, y in zip(params_a, params_b)), "a parameter was written"
    assert [s.keys() for s in state_a] == [s.keys() for s in state_b], "state keys changed"
    for s, t in zip(state_a, state_b):
        for key in s:
            assert np.array_equal(s[key], t[key]), f"state {key!r} was written"


def assert_step_refused(opt, match):
    """``opt.step()`` raises a ValueError matching ``match`` and writes no byte."""
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_same_bytes(before, snapshot(opt))


def setup(mode, path, seed=0):
    """Three parameters (a small one first, whose gradient the tests bend onto the
    others' memory) and an Adam that took two steps: its next one takes the plan
    (``path`` "plan") or the general way."""
    dtype, options, _ = MODES[mode]
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(8, dtype=dtype)), torch.nn.Parameter(torch.randn(64, 64, dtype=dtype)),
              torch.nn.Parameter(torch.randn(3, 5, dtype=dtype))]
    opt = fdt.Adam(params, lr=1e-2, **options)
    if path == "general":
        general_way(opt)
    for _ in range(2):
        give_gradients(params)
        opt.step()
    assert (opt.__dict__.get("_fd_step_plan") is not None) == (path == "plan")
    give_gradients(params)
    return params, opt


def give_gradients(params):
    for p in params:
        p.grad = torch.randn_like(p)


def inside(target, like):
    """A tensor shaped and typed as ``like`` over the last bytes of ``target``'s memory."""
    need = like.numel() * like.element_size()
    raw = target.detach().reshape(-1).view(torch.uint8)
    assert raw.numel() >= need
    return raw[raw.numel() - need:].view(like.dtype).view(like.shape)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode, key", CASES)
def test_gradient_sharing_written_memory_raises_and_writes_nothing(mode, key, path):
    params, opt = setup(mode, path)
    twin_params, twin = setup(mode, path)
    other = params[1]
    good = params[0].grad
    params[0].grad = inside(other if key == "param" else opt.state[other][key], params[0])
    named = r"parameter \(param_groups\[0\]\['params'\]\[1\]" if key == "param" else (
        rf"state\['{key}'\] of parameter \(param_groups\[0\]\['params'\]\[1\]")
    assert_step_refused(opt, rf"^parameter \(param_groups\[0\]\['params'\]\[0\].*: its gradient shares memory with "
                             rf"{named}.*, which the step writes$")
    # The error changed nothing: a right step gives what an optimizer that never saw it gives.
    params[0].grad = good
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert_same_bytes(snapshot(twin), snapshot(opt))


def two_groups(rule, path, **options):
    """A parameter in each of two groups and ``rule`` after two steps (the next on ``path``)."""
    first, second = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    opt = getattr(fdt, rule)([{"params": [first]}, {"params": [second], "lr": 0.5}], lr=0.1, **options)
    if path == "general":
        general_way(opt)
    for _ in range(2):
        give_gradients([first, second])
        opt.step()
    return first, second, opt


@pytest.mark.parametrize("path", PATHS)
def test_gradient_of_a_parameter_is_another_parameter_in_another_group(path):
    first, second, opt = two_groups("SGD", path, momentum=0.9)
    second.grad = first.detach()
    assert_step_refused(opt, r"^parameter \(param_groups\[1\]\['params'\]\[0\].*: its gradient shares memory with "
                             r"parameter \(param_groups\[0\]\['params'\]\[0\]")


def test_own_parameter_as_gradient_still_raises_as_before():
    params, opt = setup("native", "plan")
    params[1].grad = params[1].detach()
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*: grad shares memory with param"):
        opt.step()


@pytest.mark.parametrize("mode", ["native", "f32-int8"])
def test_update_of_one_parameter_checks_every_written_array(mode):
    """step_in_backward updates each parameter alone (``_parameter_update``): its
    gradient is checked against every parameter's arrays too."""
    params, opt = setup(mode, "general")
    params[0].grad = inside(opt.state[params[1]]["exp_avg"], params[0])
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\].*: its gradient shares memory with "
                                         r"state\['exp_avg'\] of parameter \(param_groups\[0\]\['params'\]\[1\]"):
        opt._parameter_update(opt._locate(), params[0])
    assert_same_bytes(before, snapshot(opt))


@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_next_to_written_memory_are_taken(mode):
    """Parameters and gradients as neighbouring views of one buffer, sharing no byte:
    the plan takes them, with the bits of gradients that lie apart."""
    dtype, options, _ = MODES[mode]
    torch.manual_seed(1)
    buffer = torch.randn(5, 40, dtype=dtype)
    params = [torch.nn.Parameter(buffer[1]), torch.nn.Parameter(buffer[3])]
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, twin = (fdt.Adam(ps, lr=1e-2, **options) for ps in (params, twin_params))
    general = counting_general_steps(opt)
    for step in range(4):
        for k, (p, q) in enumerate(zip(params, twin_params)):
            p.grad = buffer[2 * k + (step % 2) * 2]  # rows 0, 2 and 2, 4: each next to a parameter
            p.grad.copy_(torch.randn_like(p))
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    assert len(general) == 1  # the first step; then the plan
    assert_same_bytes(snapshot(twin), snapshot(opt))


@pytest.mark.parametrize("path", PATHS)
def test_gradient_in_the_gaps_of_a_gapped_parameter_is_taken(path):
    """A column of a matrix is a parameter: a gradient in the rest of a row lies within
    its extent but shares none of its elements (the general way looks closer)."""
    torch.manual_seed(2)
    matrix = torch.randn(10, 12)
    column, other = torch.nn.Parameter(matrix[:, 0]), torch.nn.Parameter(torch.randn(11))
    opt = fdt.Adam([column, other], lr=1e-2)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in (column, other)]
    twin = fdt.Adam(twin_params, lr=1e-2)
    if path == "general":
        general_way(opt)
    for _ in range(3):
        column.grad = torch.randn(10)
        other.grad = matrix[4, 1:]
        other.grad.copy_(torch.randn(11))
        for p, q in zip((column, other), twin_params):
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    assert_same_bytes(snapshot(twin), snapshot(opt))
    other.grad = matrix[3:, :].reshape(-1)[11:22]  # row 3's last element and row 4's first: the column's
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*: its gradient shares memory with parameter "
                                         r"\(param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


@pytest.mark.parametrize("path", PATHS)
def test_gradient_aliasing_a_parameter_moved_since_the_last_step_raises(path):
    """The first group's gradients are read before the second group's moved parameter
    is found (its plan built again): they are read again against the new spans."""
    first, second, opt = two_groups("Adam", path)
    second.data = torch.randn(6)
    first.grad = second.detach()
    assert_step_refused(opt, r"\['params'\]\[0\].*: its gradient shares memory with parameter "
                             r"\(param_groups\[1\]\['params'\]\[0\]")
