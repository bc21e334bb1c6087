"""What is special about Adafactor (the derived grids cover the rest): one step by
hand, agreement with torch.optim.Adafactor over 50 steps on a real model (the bound
below), the reductions' fixed order, the state torch keeps, empty parameters, the
per-dtype eps1, and the private kernels' own checks."""

import math

import numpy as np
import pytest

import fastdescent as fd
from fastdescent import _dispatch
from fastdescent.reference import adafactor as twin
from support import DTYPES, assert_bitwise_equal, random_array


def random(rng, shape, dtype=np.float64, positive=False):
    return random_array(rng, math.prod(shape), dtype, positive=positive).reshape(shape)


@pytest.fixture
def serial_torch():
    """torch on one thread for the test (the models are tiny), restored after: the
    thread count is OpenMP's, which fastdescent's default follows."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(previous)


def step_by_hand(p, g, state, t, *, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                 maximize=False):
    """torch.optim.Adafactor's equations in plain float64 NumPy (the docstring's)."""
    eps1 = np.finfo(p.dtype).eps if eps[0] is None else eps[0]
    g = -g if maximize else g
    weight = t**beta2_decay  # 1 - beta2_t
    rho = min(lr, 1 / math.sqrt(t))
    alpha = max(eps[1], math.sqrt(np.mean(p**2))) * rho
    p = p * (1 - lr * weight_decay)
    if p.ndim >= 2:
        r = state["row_var"] + weight * (np.mean(g**2, axis=-1, keepdims=True) - state["row_var"])
        c = state["col_var"] + weight * (np.mean(g**2, axis=-2, keepdims=True) - state["col_var"])
        v = r * c / np.maximum(np.mean(r, axis=-2, keepdims=True), eps1)
        state = {"row_var": r, "col_var": c}
    else:
        v = state["variance"] + weight * (g**2 - state["variance"])
        state = {"variance": v}
    u = g / np.maximum(np.sqrt(v), eps1)
    return p - alpha / max(1.0, math.sqrt(np.mean(u**2)) / d) * u, state


@pytest.mark.parametrize("options", [{}, dict(weight_decay=0.1, maximize=True, lr=0.3),
                                     dict(beta2_decay=-0.5, d=1.2, eps=(0.5, 3.0))],
                         ids=["defaults", "decay-maximize", "floors-clipping"])
@pytest.mark.parametrize("shape", [(6, 9), (2, 3, 5), (11,), ()])
def test_two_steps_by_hand(shape, options, rng):
    """Steps 1 and 2 from the equations, float64, to a few roundings."""
    p = random(rng, shape)
    state = ({"row_var": np.zeros(shape[:-1] + (1,)), "col_var": np.zeros(shape[:-2] + (1, shape[-1]))}
             if len(shape) >= 2 else {"variance": np.zeros(shape)})
    ours = {k: v.copy() for k, v in state.items()}
    param = p.copy()
    for t in (1, 2):
        g = random(rng, shape)
        p, state = step_by_hand(p, g, state, t, **options)
        fd.adafactor_step(param, g, ours.get("row_var"), ours.get("col_var"), ours.get("variance"), step=t,
                          **options)
        np.testing.assert_allclose(param, p, rtol=1e-13, atol=1e-15)
        for k in state:
            np.testing.assert_allclose(ours[k], state[k], rtol=1e-13, atol=0)


def test_first_step_takes_the_means_whole_and_moves_by_rho_times_rms(rng):
    """At t = 1 the averages are the means of g^2 (weight 1), rho = min(lr, 1) and the
    update's RMS is 1 for a vector (u = g / |g|), so each element moves by
    alpha = max(eps2, RMS(p)) * lr exactly."""
    p = random(rng, (50,))
    g = random(rng, (50,))
    v = np.zeros(50)
    expected = p - max(1e-3, math.sqrt(np.mean(p**2))) * 1e-2 * np.sign(g)
    fd.adafactor_step(p, g, None, None, v, step=1)
    np.testing.assert_array_equal(v, g * g)
    np.testing.assert_allclose(p, expected, rtol=1e-15)


# -- agreement with torch.optim.Adafactor on a real model --------------------------

def test_fifty_steps_on_a_real_model_agree_with_torch(serial_torch):
    """fastdescent.torch.Adafactor and torch.optim.Adafactor (for-loop) train a small
    convolutional network (4-D, 2-D and 1-D parameters) for 50 steps. Bound: every
    parameter and state tensor within 16 epsilons of its dtype, relative to its
    largest magnitude (measured over the examples, MLP and convnet: at most 3 for
    parameters, 5 for row_var, col_var and variance; the sums differ only in
    rounding, see fastdescent.adafactor_step)."""
    torch = serial_torch
    import fastdescent.torch as fdt
    from torch_support import batches, convnet, max_relative_error, train

    for dtype in (torch.float32, torch.float64):
        ours, theirs = convnet(dtype), convnet(dtype)
        opt = fdt.Adafactor(ours.parameters(), weight_decay=0.01)
        reference = torch.optim.Adafactor(theirs.parameters(), weight_decay=0.01, foreach=False)
        data = batches((2, 8, 8), steps=50, dtype=dtype)
        train(ours, opt, data)
        train(theirs, reference, data)
        bound = 16 * torch.finfo(dtype).eps
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert max_relative_error(a.detach(), b.detach()) <= bound
            assert list(opt.state[a]) == list(reference.state[b])
            for key, value in reference.state[b].items():
                if key == "step":
                    assert opt.state[a][key].item() == value.item() == 50
                else:
                    assert opt.state[a][key].shape == value.shape
                    assert max_relative_error(opt.state[a][key], value) <= bound, key


# -- the reductions -------------------------------------------------------------------

def test_twin_adds_in_order():
    """The twin's sequential sums (np.add.accumulate) are a loop's, on values whose sum
    depends on the order."""
    rng = np.random.default_rng(5)
    x = np.exp(rng.standard_normal((7, 300, 3)) * 8)
    by_loop = np.zeros((7, 3))
    for i in range(300):
        by_loop += x[:, i, :]
    assert_bitwise_equal(twin._in_order(x, 1), by_loop)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sums_do_not_depend_on_threads_or_chunks(dtype, rng, tiny_parts, kernel_variant):
    """Tiles cut at any point and stolen by any thread: the same bits; the twin too."""
    shapes = [(300, 8200), (3, 16500), (7,), (3, 4, 5), (), (0, 3), (1000,)]
    params = [random(rng, s, dtype) for s in shapes]
    grads = [random(rng, s, dtype) for s in shapes]

    def state():
        return ([np.ones(s[:-1] + (1,), dtype) if len(s) >= 2 else None for s in shapes],
                [np.ones(s[:-2] + (1, s[-1]), dtype) if len(s) >= 2 else None for s in shapes],
                [None if len(s) >= 2 else np.ones(s, dtype) for s in shapes])

    results = []
    for backend, n_threads in (("kernel", 1), ("kernel", 2), ("reference", 1)):
        module = _dispatch.kernels if backend == "kernel" else twin
        rows, cols, variances = state()
        sums = module.adafactor_statistics(params, grads, rows, cols, variances, weight=0.3, eps1=1e-6,
                                           grad_scale=0.5, n_threads=n_threads)
        results.append((sums, rows, cols, variances))
    for sums, rows, cols, variances in results[1:]:
        assert_bitwise_equal(sums, results[0][0], "sums")
        for a, b in zip(rows + cols + variances, results[0][1] + results[0][2] + results[0][3]):
            if a is not None:
                assert_bitwise_equal(a, b)
    assert np.all(results[0][0][[0, 1, 2, 3, 4, 6]] > 0) and np.all(results[0][0][5] == 0)


# -- state, shapes, options -------------------------------------------------------------

def test_state_is_torchs(rng):
    """row_var (..., rows, 1) and col_var (..., 1, cols) for 2 or more dimensions,
    variance for fewer, as torch.optim.Adafactor keeps them; step an int."""
    torch = pytest.importorskip("torch")
    shapes = [(), (4,), (3, 5), (2, 3, 5)]
    params = [random(rng, s) for s in shapes]
    opt = fd.Adafactor([p.copy() for p in params])
    tensors = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    reference = torch.optim.Adafactor(tensors, foreach=False)
    for _ in range(3):
        grads = [random(rng, s) for s in shapes]
        opt.step(grads)
        for tensor, g in zip(tensors, grads):
            tensor.grad = torch.tensor(g)
        reference.step()
    for k, tensor in enumerate(tensors):
        theirs = reference.state[tensor]
        assert set(opt.state[k]) == set(theirs) and opt.state[k]["step"] == 3
        for key, value in theirs.items():
            if key != "step":
                assert opt.state[k][key].shape == tuple(value.shape)
                np.testing.assert_allclose(opt.state[k][key], value.numpy(), rtol=1e-13)


def test_a_state_dict_of_the_wrong_shapes_is_refused(rng):
    params = [random(rng, (3, 5)), random(rng, (4,))]
    opt = fd.Adafactor(params)
    opt.step([random(rng, (3, 5)), random(rng, (4,))])
    sd = opt.state_dict()
    cases = [(0, "row_var", np.zeros((3, 5)), "keeps"), (0, "variance", np.zeros((3, 5)), "keeps none"),
             (1, "row_var", np.zeros((4, 1)), "keeps none"), (0, "col_var", np.zeros((5, 1)), "keeps")]
    for index, key, value, match in cases:
        bad = opt.state_dict()
        bad["state"][index][key] = value
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
    bad = opt.state_dict()
    del bad["state"][0]["col_var"]
    with pytest.raises(ValueError, match=r"lacks \[.col_var.\]"):
        opt.load_state_dict(bad)
    opt.load_state_dict(sd)


@pytest.mark.parametrize("flat", [False, True])
def test_empty_parameters_are_left_alone(flat, rng):
    """torch.optim.Adafactor divides by an empty parameter's size (ZeroDivisionError);
    here it keeps its zero state and the others step as if it were not there."""
    shapes = [(0, 4), (3, 0), (0,), (5, 6)]
    params = [random(rng, s) for s in shapes]
    opt = fd.Adafactor([p.copy() for p in params], flat=flat)
    alone = fd.Adafactor([params[3].copy()])
    for _ in range(2):
        grads = [random(rng, s) for s in shapes]
        if flat:
            for view, g in zip(opt.grads, grads):
                view[...] = g
            opt.step()
        else:
            opt.step(grads)
        alone.step(grads[3:])
    assert_bitwise_equal(opt.params[3], alone.params[0])
    assert np.all(opt.state[0]["col_var"] == 0) and opt.state[0]["col_var"].shape == (1, 4)
    assert np.all(opt.state[1]["row_var"] == 0) and opt.state[1]["row_var"].shape == (3, 1)


def test_eps1_none_is_each_dtypes_machine_epsilon(rng):
    """A group of float32 and float64 parameters: each gets its own dtype's epsilon
    (torch.optim.Adafactor takes the first parameter's for all)."""
    a, b = random(rng, (4, 3), np.float32), random(rng, (4, 3), np.float64)
    grads = [np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float64)]  # zero variance: eps1 decides
    grads[0][0, 0], grads[1][0, 0] = 1.0, 1.0
    together = fd.Adafactor([a.copy(), b.copy()])
    together.step(grads)
    for k, (p, dtype) in enumerate(((a, np.float32), (b, np.float64))):
        alone = fd.Adafactor([p.copy()], eps=(float(np.finfo(dtype).eps), 1e-3))
        alone.step([grads[k]])
        assert_bitwise_equal(together.params[k], alone.params[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_and_multi_tensor_steps_see_each_parameter_whole(dtype, rng, tiny_parts):
    """The flat arena hands Adafactor each parameter's view: the same bits as
    separate optimizers (its norms are per parameter)."""
    shapes = [(10, 13), (7,), (2, 3, 40), (), (300,)]
    params = [random(rng, s, dtype) for s in shapes]
    flat = fd.Adafactor([p.copy() for p in params], flat=True, n_threads=2)
    alone = [fd.Adafactor([p.copy()]) for p in params]
    for _ in range(3):
        grads = [random(rng, s, dtype) for s in shapes]
        for view, g in zip(flat.grads, grads):
            view[...] = g
        flat.step()
        for opt, g in zip(alone, grads):
            opt.step([g])
    for k, opt in enumerate(alone):
        assert_bitwise_equal(flat.params[k], opt.params[0])
        for key, value in opt.state[0].items():
            if key != "step":
                assert_bitwise_equal(flat.state[k][key], value, key)


# -- the private kernels' own checks ---------------------------------------------------

@pytest.mark.parametrize("fault", ["row too long", "cols of another batch", "both kinds", "neither", "variance short",
                                   "mixed dtypes", "list lengths", "step sizes"])
def test_direct_kernel_calls_refuse_inconsistent_buffers(fault, rng):
    """A direct call of a private kernel with buffers that do not fit raises instead
    of reading or writing out of bounds."""
    p, g = random(rng, (2, 3, 4), np.float32), random(rng, (2, 3, 4), np.float32)
    rows, cols, variance = np.ones((2, 3, 1), np.float32), np.ones((2, 1, 4), np.float32), None
    lists = {"params": [p], "grads": [g]}
    if fault == "row too long":
        rows = np.ones((2, 4, 1), np.float32)
    elif fault == "cols of another batch":
        cols = np.ones((3, 1, 4), np.float32)
    elif fault == "both kinds":
        variance = np.ones((2, 3, 4), np.float32)
    elif fault == "neither":
        rows = cols = None
    elif fault == "variance short":
        rows, cols, variance = None, None, np.ones(23, np.float32)
    elif fault == "mixed dtypes":
        cols = cols.astype(np.float64)
    elif fault == "list lengths":
        lists["grads"] = [g, g]
    before = p.copy()
    for kernel in (_dispatch.kernels.adafactor_statistics, _dispatch.kernels.adafactor_update):
        extra = dict(weight=0.5) if kernel is _dispatch.kernels.adafactor_statistics else dict(
            step_sizes=np.zeros(2 if fault == "step sizes" else 1), param_decay=1.0)
        if fault == "step sizes" and "weight" in extra:
            continue
        with pytest.raises(ValueError):
            kernel(lists["params"], lists["grads"], [rows], [cols], [variance], eps1=1e-7, grad_scale=1.0,
                   n_threads=1, **extra)
    assert_bitwise_equal(p, before)


def test_the_tensorwise_rule_refuses_complex_parameters_in_fastdescent_torch():
    torch = pytest.importorskip("torch")
    import fastdescent.torch as fdt

    with pytest.raises(TypeError, match=r"\['params'\]\[1\].*does not support complex"):
        fdt.Adafactor([torch.nn.Parameter(torch.randn(3)),
                       torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))])


def test_factors_may_share_no_memory_with_any_array_of_the_call(rng):
    """A row_var or col_var, written by the step, overlapping another array of the
    call (of any parameter and role) is refused before anything is written."""
    shapes = [(4, 6), (5, 3)]
    params = [random(rng, s, np.float32) for s in shapes]
    grads = [random(rng, s, np.float32) for s in shapes]
    rows = [np.ones(s[:-1] + (1,), np.float32) for s in shapes]
    cols = [np.ones(s[:-2] + (1, s[-1]), np.float32) for s in shapes]
    every = params + grads + rows + cols
    before = [a.copy() for a in every]
    block = np.ones(8, np.float32)  # two factors' memory, overlapping by one element
    cases = [
        ("row_vars[1] inside params[0]", [rows[0], params[0].reshape(-1)[:5].reshape(5, 1)], cols),
        ("col_vars[0] inside grads[1]", rows, [grads[1].reshape(-1)[:6].reshape(1, 6), cols[1]]),
        ("row_vars[0] overlaps row_vars[1]", [block[:4].reshape(4, 1), block[3:8].reshape(5, 1)], cols),
        ("col_vars[1] overlaps row_vars[0]", [block[:4].reshape(4, 1), rows[1]], [cols[0], block[1:4].reshape(1, 3)]),
    ]
    for description, row_vars, col_vars in cases:
        with pytest.raises(ValueError, match="shares memory"):
            fd.adafactor_step(params, grads, row_vars, col_vars, None, step=1)
        for a, b in zip(every + [block], before + [np.ones(8, np.float32)]):
            assert_bitwise_equal(a, b, description)


# -- small and narrow matrices ---------------------------------------------------------

#: Rows narrower than a vector of lanes (1 to 17 columns), convolution kernels, and
#: enough small matrices that threads claim several tiles at a time.
SMALL_SHAPES = [(5, w) for w in range(1, 18)] + [(8, 4, 3, 3), (6, 2, 1, 1), (3, 1, 7), (1, 1)] + [(40, 15)] * 60


@pytest.mark.parametrize("min_elements", [1, 2000], ids=["one-tile-claims", "several-tile-claims"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_and_narrow_matrices_match_the_twin(dtype, min_elements, rng, kernel_variant):
    """Kernel on 1 and 2 threads (cut into parts of ``min_elements``, claimed a tile
    or several tiles at a time) and the twin: the same bits over four steps."""
    kernels = [_dispatch.load_variant(name) for name in _dispatch.supported_variants()]
    previous = (kernels[0].get_min_elements_per_thread(), kernels[0].get_min_elements_per_thread(cold=True))
    params = [random(rng, s, dtype) for s in SMALL_SHAPES]
    runs = {}
    try:
        for module in kernels:
            module.set_min_elements_per_thread(min_elements, cold=min_elements)
        for backend, n_threads in (("kernel", 1), ("kernel", 2), ("reference", 1)):
            steps = np.random.default_rng(3)
            opt_params = [p.copy() for p in params]
            rows = [np.zeros(s[:-1] + (1,), dtype) for s in SMALL_SHAPES]
            cols = [np.zeros(s[:-2] + (1, s[-1]), dtype) for s in SMALL_SHAPES]
            for t in range(1, 5):
                grads = [random(steps, s, dtype) for s in SMALL_SHAPES]
                fd.adafactor_step(opt_params, grads, rows, cols, None, step=t, weight_decay=0.1,
                                  n_threads=n_threads, backend=backend)
            runs[backend, n_threads] = opt_params + rows + cols
    finally:
        for module in kernels:
            module.set_min_elements_per_thread(*previous)
    expected = runs["reference", 1]
    for key, arrays in runs.items():
        for k, (a, b) in enumerate(zip(arrays, expected)):
            assert_bitwise_equal(a, b, f"{key} array {k}")
    assert not np.array_equal(expected[0], params[0])


# -- torch.optim's own error inputs and checkpoints ------------------------------------

def test_optim_db_error_inputs_raise_as_torch_says():
    """Every error input of torch's optimizer test database for Adafactor raises the
    error torch's own test expects (or warns), with its message. Two differences, by
    the adapter's design (it checks every parameter when it is added): a complex
    parameter is refused then (TypeError), not at the first step (RuntimeError); a
    parameter given twice in a group, which torch warns of and steps twice, is
    warned of and then refused as two parameters sharing memory."""
    torch = pytest.importorskip("torch")
    common = pytest.importorskip("torch.testing._internal.common_optimizers")
    import fastdescent.torch as fdt

    info = next(i for i in common.optim_db if i.name == "Adafactor")
    inputs = info.optim_error_inputs_func("cpu", torch.float32)
    assert len(inputs) >= 8
    for error in inputs:
        given = error.optimizer_error_input
        expect = pytest.warns if issubclass(error.error_type, Warning) else pytest.raises
        if "duplicate parameters" in str(error.error_regex) and issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex), pytest.raises(ValueError, match="share"):
                fdt.Adafactor(given.params, **given.kwargs)
        elif error.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with expect(error.error_type, match=error.error_regex):
                fdt.Adafactor(given.params, **given.kwargs)
        elif any(p.is_complex() for p in given.params):
            with pytest.raises(TypeError, match=error.error_regex):
                fdt.Adafactor(given.params, **given.kwargs)
        else:
            opt = fdt.Adafactor(given.params, **given.kwargs)
            with expect(error.error_type, match=error.error_regex):
                opt.step()


@pytest.mark.parametrize("first", ["torch", "fastdescent"])
def test_convnet_checkpoints_move_between_torch_and_fastdescent(first, serial_torch):
    """A convolutional network's state (4-D row_var (o, i, k, 1) and col_var
    (o, i, 1, k), 2-D, 1-D variance) saved by one implementation is loaded by the
    other as is, and training on agrees with the first within the bound of
    ``test_fifty_steps_on_a_real_model_agree_with_torch``."""
    torch = serial_torch
    import fastdescent.torch as fdt
    from torch_support import batches, convnet, max_relative_error, roundtrip, train

    kinds = {"torch": lambda ps: torch.optim.Adafactor(ps, weight_decay=0.01, foreach=False),
             "fastdescent": lambda ps: fdt.Adafactor(ps, weight_decay=0.01)}
    then = "fastdescent" if first == "torch" else "torch"
    data = batches((2, 8, 8), steps=20)
    model = convnet()
    opt = kinds[first](model.parameters())
    train(model, opt, data[:10])
    resumed_model = convnet(seed=1)
    resumed_model.load_state_dict(model.state_dict())
    resumed = kinds[then](resumed_model.parameters())
    saved = opt.state_dict()
    assert saved["state"][0]["row_var"].shape == (6, 2, 3, 1) and saved["state"][0]["col_var"].shape == (6, 2, 1, 3)
    resumed.load_state_dict(roundtrip(saved))  # test_torch.py checks that it loads as saved
    train(model, opt, data[10:])
    train(resumed_model, resumed, data[10:])
    bound = 16 * torch.finfo(torch.float32).eps
    for a, b in zip(resumed_model.parameters(), model.parameters()):
        assert max_relative_error(a.detach(), b.detach()) <= bound
        for key, value in opt.state[b].items():
            assert max_relative_error(resumed.state[a][key], value) <= bound, key


# Low-precision storage (issue 16) is refused: the stored pass runs one elementwise
# float32 kernel per block, and Adafactor is two kernels over whole tensors.
LOW_PRECISION = {"bfloat16 state": ("float32", dict(state_dtype="bfloat16")),
                 "int8 state": ("float32", dict(state_dtype="int8")),
                 "stochastic bfloat16 state": ("float32", dict(state_dtype="bfloat16", rounding="stochastic", seed=1)),
                 "bfloat16 params, master": ("bfloat16", dict(master_weights=True)),
                 "bfloat16 params, stochastic": ("bfloat16", dict(rounding="stochastic", seed=1)),
                 "float16 params, master": ("float16", dict(master_weights=True))}


@pytest.mark.parametrize("dtype, options", LOW_PRECISION.values(), ids=LOW_PRECISION)
def test_low_precision_storage_is_refused_before_any_write(dtype, options, rng):
    from fastdescent import precision

    dtype = precision.bfloat16_dtype() if dtype == "bfloat16" else np.dtype(dtype)
    params = [random(rng, (6, 9)).astype(dtype), random(rng, (5,)).astype(dtype)]
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match="Adafactor runs more than one elementwise kernel"):
        fd.Adafactor(params, lr=0.1, **options)
    for p, q in zip(params, before):
        assert p.tobytes() == q.tobytes()


@pytest.mark.parametrize("dtype, options", LOW_PRECISION.values(), ids=LOW_PRECISION)
def test_low_precision_storage_is_refused_by_the_torch_class(dtype, options, serial_torch):
    torch = serial_torch
    import fastdescent.torch as fdt

    params = [torch.nn.Parameter(torch.randn(6, 9).to(getattr(torch, dtype))),
              torch.nn.Parameter(torch.randn(5).to(getattr(torch, dtype)))]
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="Adafactor runs more than one elementwise kernel"):
        fdt.Adafactor(params, lr=0.1, **options)
    for p, q in zip(params, before):
        assert torch.equal(p, q)
