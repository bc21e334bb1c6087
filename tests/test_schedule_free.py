"""Schedule-Free AdamW and SGD: the averaging and the warmup by hand, train()/eval()
(exact, in place, no allocation, steps refused in eval mode, groups, checkpoints),
kernel vs reference through mode switches bit for bit, and fastdescent.torch's
classes against the ``schedulefree`` package's reference classes (skipped when that
package is absent) on a real small model.

The kernel-vs-reference grid, bad input, the optimizers and the checkpoints are
derived from the specs (test_rule_grid.py and the others)."""

import contextlib
import copy
import io
import tracemalloc

import numpy as np
import pytest

import fastdescent as fd
from support import DTYPES, assert_bitwise_equal, random_array
from test_optim import make_grads, make_params, snapshot_optimizer, assert_same

CLASSES = {"adamw": fd.ScheduleFreeAdamW, "sgd": fd.ScheduleFreeSGD}
FACES = {"adamw": fd.schedule_free_adamw_step, "sgd": fd.schedule_free_sgd_step}


def zeros_state(kind, param):
    """The face's buffers as the optimizers start them: z and x copies of the parameter."""
    buffers = [param.copy(), param.copy()]
    if kind == "adamw":
        buffers.insert(1, np.zeros_like(param))  # (z, exp_avg_sq, x)
    return buffers


# -- the schedule and the average ---------------------------------------------------------

@pytest.mark.parametrize("kind", list(FACES))
def test_warmup_and_the_weights_of_the_average(kind, rng):
    """lr_max and weight_sum follow t -> lr*min(1, t/warmup) and w_t = t**r * lr_max**p."""
    lr, warmup, r, power = 0.4, 4, 0.5, 1.5
    p = random_array(rng, 9, np.float64)
    buffers, scalars = zeros_state(kind, p), {}
    weight_sum = 0.0
    for t in range(1, 9):
        scalars = FACES[kind](p, random_array(rng, 9, np.float64), *buffers, step=t, lr=lr, warmup_steps=warmup,
                              r=r, weight_lr_power=power, **scalars)
        lr_max = lr * min(1.0, t / warmup)
        weight_sum += t**r * lr_max**power
        assert scalars == {"weight_sum": pytest.approx(weight_sum, rel=1e-15), "lr_max": lr_max}


@pytest.mark.parametrize("kind", list(FACES))
def test_unweighted_x_is_the_running_mean_of_z(kind, rng):
    """weight_lr_power=0, r=0: every weight is 1, so x_t is the mean of z_1..z_t (in float64,
    to rounding), and y = beta*x + (1-beta)*z."""
    p = random_array(rng, 50, np.float64)
    buffers, scalars, zs = zeros_state(kind, p), {}, []
    z, x = buffers[0], buffers[-1]
    beta = 0.9
    for t in range(1, 21):
        scalars = FACES[kind](p, random_array(rng, 50, np.float64), *buffers, step=t, lr=0.05, weight_lr_power=0.0,
                              **scalars)
        zs.append(z.copy())
        np.testing.assert_allclose(x, np.mean(zs, axis=0), rtol=0, atol=1e-14)
        np.testing.assert_allclose(p, beta * x + (1 - beta) * z, rtol=0, atol=1e-15)
    assert scalars["weight_sum"] == 20.0


def test_sgd_z_takes_plain_sgd_steps_on_the_gradient_at_y(rng):
    p = random_array(rng, 30, np.float64)
    z, x, scalars = p.copy(), p.copy(), {}
    for t in range(1, 6):
        g = random_array(rng, 30, np.float64)
        y, z_before = p.copy(), z.copy()
        scalars = fd.schedule_free_sgd_step(p, g, z, x, step=t, lr=0.3, weight_decay=0.1, **scalars)
        np.testing.assert_allclose(z, z_before - 0.3 * (g + 0.1 * y), rtol=1e-15)


# -- train() and eval() -------------------------------------------------------------------

def trained(kind, rng, dtype=np.float32, steps=5, params=None, **options):
    params = make_params(rng, dtype, [(3, 7), (0,), (1000,)]) if params is None else params
    opt = CLASSES[kind]([p.copy() for p in params], lr=0.01, **options)
    for grads in make_grads(rng, params, steps):
        assert opt.step(grads)
    return opt


@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "flat"])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_eval_puts_x_and_train_puts_y_back_exactly(kind, backend, flat, rng):
    opt = trained(kind, rng, flat=flat, backend=backend)
    y = [p.copy() for p in opt.params]
    addresses = [p.__array_interface__["data"][0] for p in opt.params]
    opt.eval()
    assert [g["train_mode"] for g in opt.param_groups] == [False]
    for k, p in enumerate(opt.params):
        assert_bitwise_equal(p, opt.state[k]["x"], f"param {k}")
    opt.eval()  # a second eval changes nothing
    opt.train()
    opt.train()
    assert opt.param_groups[0]["train_mode"]
    for k, p in enumerate(opt.params):
        assert_bitwise_equal(p, y[k], f"param {k}")
    assert [p.__array_interface__["data"][0] for p in opt.params] == addresses


@pytest.mark.parametrize("kind", list(CLASSES))
def test_switching_modes_allocates_nothing(kind, rng):
    """eval() and train() of a million-parameter model allocate no array (NumPy reports
    its allocations to tracemalloc). The kernel backend: the NumPy twin allocates."""
    opt = CLASSES[kind]([random_array(rng, 10**6, np.float32)], lr=0.01, backend="kernel")
    opt.step([random_array(rng, 10**6, np.float32)])
    opt.eval()
    opt.train()  # the first calls may import or cache
    tracemalloc.start()
    try:
        for _ in range(3):
            opt.eval()
            opt.train()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, f"{peak} bytes allocated"


@pytest.mark.parametrize("kind", list(CLASSES))
def test_a_step_in_eval_mode_raises_and_changes_nothing(kind, rng):
    opt = trained(kind, rng)
    opt.eval()
    before = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step(make_grads(rng, opt.params, 1)[0])
    assert_same(opt, before)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_train_and_eval_before_the_first_step_change_nothing(kind, rng):
    params = make_params(rng, np.float64, [(4,), (5,)])
    opt = CLASSES[kind]([p.copy() for p in params])
    opt.eval()
    opt.train()
    for p, q in zip(opt.params, params):
        assert_bitwise_equal(p, q)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_groups_added_later_take_the_current_mode(kind, rng):
    a, b, c = make_params(rng, np.float32, [(5,), (6,), (7,)])
    opt = CLASSES[kind]([a], lr=0.1)
    assert opt.param_groups[0]["train_mode"]
    opt.eval()
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["train_mode"] is False
    opt.train()
    opt.add_param_group({"params": [c], "lr": 0.2})
    assert [g["train_mode"] for g in opt.param_groups] == [True, True, True]


@pytest.mark.parametrize("kind", list(CLASSES))
def test_kernel_and_reference_agree_through_mode_switches(kind, rng):
    """Mixed dtypes, two groups, 2 threads, warmup and decay; eval()/train() between steps."""
    params = make_params(rng, np.float32, [(65,), (3, 100)]) + make_params(rng, np.float64, [(4097,)])
    runs = []
    for backend in ("kernel", "reference"):
        groups = [{"params": [p.copy() for p in params[:2]]},
                  {"params": [params[2].copy()], "weight_decay": 0.05, "r": 1.0}]
        opt = CLASSES[kind](groups, lr=0.05, warmup_steps=3, backend=backend, n_threads=2)
        local = np.random.default_rng(5)
        for t in range(8):
            opt.step([random_array(local, p.size, p.dtype).reshape(p.shape) for p in opt.params])
            if t % 3 == 1:
                opt.eval()
                opt.train()
        opt.eval()
        runs.append(opt)
    assert_same(runs[0], runs[1])


@pytest.mark.parametrize("kind", list(CLASSES))
def test_a_checkpoint_saved_in_eval_mode_resumes_exactly(kind, tmp_path, rng):
    params = make_params(rng, np.float32, [(3, 7), (0,), (1000,)])
    uninterrupted, first = trained(kind, rng, steps=0, params=params), trained(kind, rng, steps=0, params=params)
    grad_steps = make_grads(rng, uninterrupted.params, 6)
    for grads in grad_steps:
        uninterrupted.step(grads)
    for grads in grad_steps[:3]:
        first.step(grads)
    first.eval()
    first.save(tmp_path / "sf.ckpt")
    resumed = CLASSES[kind]([np.zeros_like(p) for p in first.params], lr=0.01)
    resumed.load(tmp_path / "sf.ckpt")
    assert resumed.param_groups[0]["train_mode"] is False
    for p, q in zip(resumed.params, first.params):
        assert_bitwise_equal(p, q)
    resumed.train()
    for grads in grad_steps[3:]:
        resumed.step(grads)
    assert_same(resumed, uninterrupted)


# -- fastdescent.torch against the schedulefree package --------------------------------------

#: Bound: parameters (y, and x after eval()) and every state tensor after 50 steps on
#: the test MLP within 32 machine epsilons of the reference class's, relative to the
#: tensor's largest magnitude (float32 3.8e-6, float64 7.1e-15). The operations are
#: the reference's, in its order; torch fuses its add-with-alpha into multiply-adds,
#: which the kernels do not. Measured: at most 5.5e-7 (float32) and 1.6e-15 (float64),
#: and weight_sum equal.
EPS_FACTOR = 32
CONFIGS = {
    "adamw": ("ScheduleFreeAdamW", "AdamWScheduleFreeReference", dict(lr=0.01)),
    "adamw-warmup-wd-r": ("ScheduleFreeAdamW", "AdamWScheduleFreeReference",
                          dict(lr=0.01, warmup_steps=10, weight_decay=0.1, r=0.5, weight_lr_power=1.0)),
    "adamw-decay_at_z": ("ScheduleFreeAdamW", "AdamWScheduleFreeReference",
                         dict(lr=0.01, decay_at_z=True, weight_decay=0.5, betas=(0.8, 0.99), eps=1e-6)),
    "sgd": ("ScheduleFreeSGD", "SGDScheduleFreeReference", dict(lr=0.5)),
    "sgd-warmup-wd-r": ("ScheduleFreeSGD", "SGDScheduleFreeReference",
                        dict(lr=0.5, warmup_steps=10, weight_decay=0.01, momentum=0.7, r=1.0, weight_lr_power=3.0)),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_matches_the_schedulefree_reference(config, dtype):
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    import fastdescent.torch as fdt
    from torch_support import STEPS, batches, max_relative_error, mlp, train

    ours_name, theirs_name, options = CONFIGS[config]
    dtype = getattr(torch, dtype)
    bound = EPS_FACTOR * torch.finfo(dtype).eps
    ours, theirs = mlp(dtype), mlp(dtype)
    initial = [p.detach().clone() for p in ours.parameters()]
    ours_opt = getattr(fdt, ours_name)(ours.parameters(), **options)
    theirs_opt = getattr(schedulefree, theirs_name)(theirs.parameters(), **options)
    data = batches((10,), dtype=dtype)
    assert len(data) == STEPS == 50
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its mode switches
        ours_opt.train()
        theirs_opt.train()
        train(ours, ours_opt, data)
        train(theirs, theirs_opt, data)
        for mode in ("train", "eval"):
            getattr(ours_opt, mode)()
            getattr(theirs_opt, mode)()
            for (name, a), b, start in zip(ours.named_parameters(), theirs.parameters(), initial):
                assert max_relative_error(a.detach(), b.detach()) <= bound, f"{mode}: {name}"
                assert not torch.equal(a, start)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        state, reference = ours_opt.state[a], theirs_opt.state[b]
        for key in ("z", "x", "exp_avg_sq") if "AdamW" in ours_name else ("z", "x"):
            assert state[key].dtype == dtype and max_relative_error(state[key], reference[key]) <= bound, key
        assert state["step"].item() == theirs_opt.param_groups[0]["k"] == STEPS
        assert state["weight_sum"] == theirs_opt.param_groups[0]["weight_sum"]
        assert state["lr_max"] == theirs_opt.param_groups[0]["lr_max"]


@pytest.mark.parametrize("kind", ["ScheduleFreeAdamW", "ScheduleFreeSGD"])
def test_torch_classes_switch_modes_and_resume_from_state_dicts(kind):
    """eval() puts x in the tensors (autograd sees the in-place change), a step in eval
    mode raises, and a state dict saved in eval mode resumes exactly in a new optimizer."""
    torch = pytest.importorskip("torch")
    import fastdescent.torch as fdt
    from torch_support import batches, loss_fn, mlp, roundtrip, train

    data = batches((10,), steps=30)
    model = mlp()
    opt = getattr(fdt, kind)(model.parameters(), lr=0.01, warmup_steps=5)
    train(model, opt, data[:10])
    weight = model[0].weight
    version = weight._version
    opt.eval()
    assert weight._version > version
    assert torch.equal(weight.detach(), opt.state[weight]["x"])
    with pytest.raises(RuntimeError, match="eval mode"):
        loss_fn(model, *data[10]).backward()
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), roundtrip(opt.state_dict())
    assert all(not g["train_mode"] for g in saved_opt["param_groups"])
    opt.train()
    train(model, opt, data[10:])

    resumed_model = mlp(seed=1)
    resumed_model.load_state_dict(saved_model)
    resumed = getattr(fdt, kind)(resumed_model.parameters(), lr=0.01, warmup_steps=5)
    resumed.load_state_dict(saved_opt)
    assert all(type(s["weight_sum"]) is float for s in resumed.state.values())  # not cast to float32
    resumed.train()
    train(resumed_model, resumed, data[10:])
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel, names, scalars", [
    ("schedule_free_adamw", ("params", "grads", "z", "exp_avg_sq", "x"),
     dict(lr=0.1, weight_decay=0.0, decay_at_z=False, beta1=0.9, beta2=0.99, bias_correction2=0.1, eps=1e-8, ckp1=0.5,
          grad_scale=1.0)),
    ("schedule_free_sgd", ("params", "grads", "z", "x"), dict(lr=0.1, weight_decay=0.0, momentum=0.9, ckp1=0.5,
                                                              grad_scale=1.0)),
    ("schedule_free_y", ("params", "x", "z"), dict(beta=0.9)),
])
def test_private_kernels_refuse_a_missing_list(kernel, names, scalars, rng):
    from fastdescent import _dispatch

    for missing in names[1:]:
        lists = {name: [random_array(rng, 100, np.float32)] for name in names}
        lists[missing] = None
        before = lists["params"][0].copy()
        with pytest.raises(TypeError):
            getattr(_dispatch.kernels, kernel)(*lists.values(), **scalars, n_threads=1)
        assert_bitwise_equal(lists["params"][0], before)


@pytest.mark.parametrize("config", ["adamw-warmup-wd-r", "sgd-warmup-wd-r"])
def test_every_layout_as_the_reference_and_exact_mode_switches(config):
    """Gapped, transposed, channels_last, interleaved and 0-d parameters (test_torch_layouts'
    model, every parameter in the loss from the start: the package weighs the average
    of a parameter that joins late by the group's step count, fastdescent by its own):
    as the reference class, and eval()/train() exact on every layout."""
    torch = pytest.importorskip("torch")
    schedulefree = pytest.importorskip("schedulefree")
    import fastdescent.torch as fdt
    from test_torch_layouts import LATE, STEPS, Layouts
    from torch_support import max_relative_error

    ours_name, theirs_name, options = CONFIGS[config]
    models, optimizers = [Layouts(torch.float64) for _ in range(2)], []
    optimizers = [getattr(fdt, ours_name)(models[0].parameters(), **options),
                  getattr(schedulefree, theirs_name)(models[1].parameters(), **options)]
    with contextlib.redirect_stdout(io.StringIO()):
        for model, opt in zip(models, optimizers):
            opt.train()
            g = torch.Generator().manual_seed(1)
            for step in range(STEPS):
                x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g,
                                                                                       dtype=torch.float64)
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x, LATE + step), y).backward()
                opt.step()
        y_ours = {name: p.detach().clone() for name, p in models[0].named_parameters()}
        for mode in ("eval", "train"):
            for opt in optimizers:
                getattr(opt, mode)()
            for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
                assert max_relative_error(a.detach(), b.detach()) <= EPS_FACTOR * 2.0**-52, f"{mode}: {name}"
                if mode == "eval":
                    assert torch.equal(a, optimizers[0].state[a]["x"]), name
                else:
                    assert torch.equal(a, y_ours[name]), name
    assert models[0].even.stride() == (10, 2) and models[0].conv.stride() == models[1].conv.stride()


@pytest.mark.parametrize("kind", ["ScheduleFreeAdamW", "ScheduleFreeSGD"])
def test_step_in_backward_equals_the_plain_loop_and_refuses_eval_mode(kind):
    torch = pytest.importorskip("torch")
    import fastdescent.torch as fdt
    from torch_support import batches, loss_fn, mlp, train

    data = batches((10,), steps=12)
    plain, hooked = mlp(), mlp()
    plain_opt = getattr(fdt, kind)(plain.parameters(), lr=0.01, warmup_steps=3)
    hooked_opt = getattr(fdt, kind)(hooked.parameters(), lr=0.01, warmup_steps=3)
    train(plain, plain_opt, data)
    handle = fdt.step_in_backward(hooked_opt)
    for x, y in data:
        loss_fn(hooked, x, y).backward()
    for a, b in zip(plain.parameters(), hooked.parameters()):
        assert torch.equal(a, b)
        assert plain_opt.state[a]["weight_sum"] == hooked_opt.state[b]["weight_sum"]
    hooked_opt.eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        loss_fn(hooked, *data[0]).backward()
    handle.remove()
