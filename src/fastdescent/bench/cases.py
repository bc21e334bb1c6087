"""What the benchmarks run: prepared buffers, one step of each method, and its timing.

Shared by ``python -m fastdescent bench`` and the asv suite (``asv_bench/``), so
both measure the same thing the same way:

* a :class:`Problem` holds the buffers of one case (parameters, gradients and the
  rule's state), random, already touched;
* :func:`stepper` turns a method name into a zero-argument callable taking one
  in-place step, with its kernel variant and thread count in force;
* :func:`time_step` times that callable: warm-up, then repeated samples.

Methods: ``ceiling`` (the bandwidth kernel with the rule's access pattern, run on the
rule's own buffers, once per memory pass of a rule of several passes: Adafactor's
reductions, then its update), ``kernel`` (the rule's functional face on a kernel variant),
``reference`` (the NumPy twin) and, when torch is importable, ``torch-forloop``,
``torch-foreach`` and ``torch-fused`` (``torch.optim`` on tensors sharing memory
with the NumPy buffers; torch allocates its own state) and ``torch-adapter``
(``fastdescent.torch``'s drop-in optimizer of the same name, where it exists);
``bnb-8bit``: bitsandbytes' 8-bit blockwise optimizer of the rule, on the CPU,
when it is installed.

A problem may keep its state in low precision (``state_dtype``,
:mod:`fastdescent.precision`): the kernel and the reference then run the rule's
stored pass, the ceiling streams the same arrays at their own widths, and the
torch and bitsandbytes methods keep their own state as they do.

A rule of several kernel passes (a spec with a ``runner``: Muon) is measured by its
passes: ``kernel`` and ``reference`` replay the kernel calls recorded from one step,
and ``ceiling`` runs the bandwidth kernel once per pass, with that pass's pattern.
The rest of such a step (Muon's matrix products in NumPy) is not timed there; the
torch methods time whole steps.
"""

import functools
import importlib
import inspect
import statistics
import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .. import _config, _dispatch, precision

METHODS = ("ceiling", "kernel", "reference", "torch-forloop", "torch-foreach", "torch-fused", "torch-adapter",
           "bnb-8bit")
#: bitsandbytes' 8-bit optimizer of each rule it has.
BNB_CLASSES = {"adam": "Adam8bit", "adamw": "AdamW8bit", "sgd": "SGD8bit", "rmsprop": "RMSprop8bit",
               "adagrad": "Adagrad8bit", "lion": "Lion8bit"}
TORCH_MODES = {
    "torch-forloop": {"foreach": False},
    "torch-foreach": {"foreach": True},
    "torch-fused": {"fused": True},
    "torch-adapter": {},
}

# Step number passed to every timed step: past the first, whose PyTorch-style
# special cases (a momentum buffer taking the gradient) are not the steady state.
STEADY_STEP = 10


class Unavailable(NotImplementedError):
    """This method cannot run this case here (asv skips a benchmark on it)."""


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


@dataclass
class Problem:
    """The buffers of one case: per role, one array or a list of arrays (one per tensor)."""

    params: object
    grads: object
    state: list
    #: None, or the state's low-precision dtype: ``state`` then holds the stored
    #: arrays as the kernels take them (bfloat16 as uint16 bits, int8/uint8 codes)
    state_dtype: str | None = None
    #: buffer name -> the block scales of its int8/uint8 arrays (like ``params``)
    scales: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return as_list(self.params)[0].dtype

    @property
    def n_elements(self):
        return sum(p.size for p in as_list(self.params))

    @property
    def nbytes(self):
        arrays = [self.params, self.grads, *self.state, *self.scales.values()]
        return sum(a.nbytes for role in arrays for a in as_list(role) if a is not None)


def as_list(role):
    return role if isinstance(role, list) else [role]


def make_problem(rule, n, dtype, *, n_tensors=1, seed=0, state_dtype=None):
    """Random buffers for ``rule``: ``n_tensors`` tensors of ``n`` elements each (one
    array per role if ``n_tensors`` is 1, else lists), in the rule's sample shape
    (``spec.sample_shape``: 1-D, or a matrix for a tensorwise rule). Gradients are
    small and nonzero, second-moment state positive, so repeated steps stay finite;
    a buffer that shape keeps none of is None. ``state_dtype``: the state stored in
    it (from the same random values)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    shape = rule.spec.sample_shape(n)

    def tensors(make):
        arrays = [make() for _ in range(n_tensors)]
        return arrays[0] if n_tensors == 1 else arrays

    def gradient():
        g = rng.standard_normal(shape, dtype=dtype)
        g *= 0.1
        return g

    params = tensors(lambda: rng.standard_normal(shape, dtype=dtype))
    grads = tensors(gradient)
    per_tensor = [rule.make_state(rng, n, dtype) for _ in range(n_tensors)]
    scales = {}
    if state_dtype is not None:
        storage = precision.Storage.of(state_dtype)
        buffers = rule.spec.needed(rule.hyper)
        stored = [[_stored(storage, storage.buffer_kind(b, dtype), values) for b, values in zip(buffers, arrays)]
                  for arrays in per_tensor]
        per_tensor = [[array for array, _ in arrays] for arrays in stored]
        for k, b in enumerate(buffers):
            if stored[0][k][1] is not None:
                scales[b.name] = stored[0][k][1] if n_tensors == 1 else [arrays[k][1] for arrays in stored]
    state = [per_tensor[0][k] if n_tensors == 1 else [s[k] for s in per_tensor]
             for k in range(len(rule.state))]
    return Problem(params, grads, state, state_dtype, scales)


def _stored(storage, kind, values, chunk=1 << 20):
    """``(array the kernel takes, scales or None)`` of float32 ``values`` stored as
    ``kind``, encoded a whole number of blocks at a time (bounded temporaries)."""
    if kind == precision.NATIVE:
        return values, None
    parts = [storage.encoded(kind, values[i:i + chunk]) for i in range(0, values.size, chunk)] or \
        [storage.encoded(kind, values)]
    stored = precision.kernel_view(np.concatenate([array for array, _ in parts]))
    scales = None if parts[0][1] is None else np.concatenate([s for _, s in parts])
    return stored, scales


def stored_call(rule, problem, backend, n_threads):
    """A zero-argument step of the rule's stored pass on ``problem`` (the steady
    step's scalars computed once, as the optimizers cache them)."""
    spec = rule.spec
    storage = precision.Storage.of(problem.state_dtype)
    params, grads = as_list(problem.params), as_list(problem.grads)
    buffers = {b.name: None for b in spec.buffers}
    buffers.update((name, as_list(array)) for name, array in zip(rule.state, problem.state))
    scales = {name: as_list(s) for name, s in problem.scales.items()}
    params, grads, formats = precision.kernel_call(storage, spec, STEADY_STEP, params, grads, buffers, None, scales)
    kwargs = spec.kernel_arguments(rule.hyper, step=STEADY_STEP if spec.uses_step else None, grad_scale=1.0,
                                   scalar_state=rule.scalar_state_at(STEADY_STEP))
    ids = list(range(len(params)))
    return lambda: spec.call(backend, params, grads, buffers, kwargs, n_threads, formats, ids)


def state_memory(rule, n, dtype, state_dtype=None):
    """Peak bytes per parameter element allocated by an optimizer's first step on
    one parameter of ``n`` elements (its state and any temporaries of the step),
    traced by :mod:`tracemalloc` (NumPy reports its allocations to it). The step
    runs the kernels whatever the default backend: the NumPy reference's
    temporaries are not the optimizer's memory."""
    import fastdescent

    rng = np.random.default_rng(0)
    param = rng.standard_normal(n).astype(dtype)
    grad = (rng.standard_normal(n) * 0.1).astype(dtype)
    cls = getattr(fastdescent, rule.spec.title)
    precision.bfloat16_dtype()  # its first import is not the optimizer's memory
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        optimizer = cls([param], **rule.options, state_dtype=state_dtype, backend="kernel")
        optimizer.step([grad])
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    return peak / n


def ceiling_passes(rule, problem):
    """``[(roles, n_written)]``: for each memory pass of ``rule`` (``rule.passes``),
    the buffers the bandwidth kernel reads with that pass's pattern, written ones
    first, taken from ``problem``'s arrays (the read-only ones: the gradients, then
    the parameters). A stored problem's roles have several widths (``stream_mixed``
    takes them)."""
    writable = [problem.params, *(s for s in problem.state if s is not None)]
    passes = []
    for reads, writes in rule.passes:
        read_only = ([problem.grads] + writable[writes:])[:reads - writes]
        if writes > len(writable) or len(read_only) != reads - writes or not (
                len(read_only) <= 1 or (writes == 0 and len(read_only) <= 2)):
            raise Unavailable(f"no bandwidth pattern for {reads} reads / {writes} writes")
        passes.append((writable[:writes] + read_only, writes))
    return passes


def kernel_calls(step, backend):
    """The calls that one ``step()`` makes to the ``backend`` module ("kernel" or
    "reference"), each as a callable that makes it again on the same arrays: the
    kernel passes of a multi-pass rule without its work in NumPy (Muon's matrix
    products), which the benchmarks time apart from it."""
    module = _config.resolve_backend(backend)
    calls = []

    class Recorder:
        def __getattr__(self, name):
            function = getattr(module, name)

            def record(*args, **kwargs):
                calls.append(functools.partial(function, *args, **kwargs))
                return function(*args, **kwargs)
            return record

    _config._BACKEND_MODULES[backend] = Recorder()
    try:
        step()
    finally:
        _config._BACKEND_MODULES[backend] = module
    return calls


def _kernel_part(rule, step, backend):
    """``step``, or for a multi-pass rule the replay of its kernel calls."""
    if rule.spec.runner is None:
        return step
    calls = kernel_calls(step, backend)
    return lambda: [call() for call in calls]


def ceiling_variant():
    """The bandwidth kernel always comes from the widest variant: the machine's limit."""
    return _dispatch.supported_variants()[-1]


@contextmanager
def kernels_of_variant(variant):
    """Route ``backend="kernel"`` to the kernels of ``variant`` (None: the dispatched one)."""
    if variant is None or variant == _dispatch.variant:
        yield _dispatch.kernels
        return
    try:
        module = _dispatch.load_variant(variant)
    except ValueError as error:
        raise Unavailable(str(error)) from None
    _config.resolve_backend("reference")  # fill the backend cache before patching it
    previous = _config._BACKEND_MODULES["kernel"]
    _config._BACKEND_MODULES["kernel"] = module
    try:
        yield module
    finally:
        _config._BACKEND_MODULES["kernel"] = previous


@contextmanager
def torch_threads(torch, n_threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def stepper(method, rule, problem, n_threads=1, variant=None):
    """Yield a zero-argument callable taking one step of ``method`` on ``problem``.

    The kernel variant (``kernel``; ``ceiling`` always uses the widest) and the
    thread count stay in force until the block exits. Raises :class:`Unavailable`
    when the method cannot run the case (no torch, no torch peer, a torch mode that
    refuses the dtype, the reference with more than one thread...).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "kernel" and variant is not None:
        raise Unavailable("only the kernel method has variants")
    if n_threads > _config.max_threads():
        raise Unavailable(f"{n_threads} threads asked, {_config.max_threads()} available")
    state, t = problem.state, STEADY_STEP
    scalars = rule.scalar_state_at(t)
    if method == "ceiling":
        passes = ceiling_passes(rule, problem)
        module = _dispatch.load_variant(ceiling_variant())
        stream = module.stream if problem.state_dtype is None else module.stream_mixed
        if len(passes) == 1:
            (roles, writes), = passes
            yield lambda: stream(roles, writes, n_threads)
        else:
            yield lambda: [stream(roles, writes, n_threads) for roles, writes in passes]
    elif method == "bnb-8bit":
        with _bnb_step(rule, problem, n_threads) as step:
            yield step
    elif problem.state_dtype is not None and method in ("kernel", "reference"):
        if method == "reference" and n_threads != 1:
            raise Unavailable("the reference is single-threaded")
        with kernels_of_variant(variant if method == "kernel" else None) as module:
            yield stored_call(rule, problem, module if method == "kernel" else _config.resolve_backend("reference"),
                              n_threads)
    elif method == "kernel":
        with kernels_of_variant(variant):
            yield _kernel_part(rule, lambda: rule.step(problem.params, problem.grads, *state, t=t,
                                                       scalar_state=scalars, backend="kernel",
                                                       n_threads=n_threads), "kernel")
    elif method == "reference":
        if n_threads != 1:
            raise Unavailable("the reference is single-threaded")
        yield _kernel_part(rule, lambda: rule.step(problem.params, problem.grads, *state, t=t,
                                                   scalar_state=scalars, backend="reference"), "reference")
    else:
        with _torch_step(method, rule, problem, n_threads) as step:
            yield step


def _torch_mode(torch_class, method):
    """The options that select ``method``'s path of ``torch_class``: none for the
    for-loop path of a class that has no other (torch.optim.Muon has no foreach)."""
    if method == "torch-forloop" and "foreach" not in inspect.signature(torch_class).parameters:
        return {}
    return TORCH_MODES[method]


@contextmanager
def _torch_step(method, rule, problem, n_threads):
    torch = torch_or_none()
    if torch is None:
        raise Unavailable("torch is not installed")
    if rule.torch_peer is None:
        raise Unavailable(f"torch has no peer for {rule.name}")
    name, hyper = rule.torch_peer
    library = torch.optim
    if method == "torch-adapter":
        try:
            library = importlib.import_module("fastdescent.torch")
        except ImportError as error:
            raise Unavailable(f"no torch adapter: {error}") from None
        if not hasattr(library, name):
            raise Unavailable(f"fastdescent.torch has no {name}")
    # fastdescent.torch keeps the problem's state dtype; torch.optim its float32 state
    storage = {"state_dtype": problem.state_dtype} if method == "torch-adapter" and problem.state_dtype else {}
    cls = getattr(library, name)
    with _optimizer_step(torch, lambda tensors: cls(tensors, **hyper, **_torch_mode(cls, method), **storage),
                         problem, n_threads, method) as step:
        yield step


@contextmanager
def _optimizer_step(torch, make, problem, n_threads, label):
    """Yield ``optimizer.step`` of ``make(tensors)``, a torch optimizer over tensors
    sharing the problem's parameters and gradients, its state made by a first step."""
    tensors = [torch.from_numpy(p) for p in as_list(problem.params)]
    for tensor, grad in zip(tensors, as_list(problem.grads)):
        tensor.grad = torch.from_numpy(grad)
    with torch_threads(torch, n_threads):
        try:
            optimizer = make(tensors)
            optimizer.step()  # creates the optimizer's state: not part of the steady step
        except (RuntimeError, ValueError, TypeError) as error:
            raise Unavailable(f"{label} refused: {error}") from None
        try:
            yield optimizer.step
        finally:
            optimizer.state.clear()


@contextmanager
def _bnb_step(rule, problem, n_threads):
    """bitsandbytes' 8-bit optimizer of the rule (its own state), on CPU tensors."""
    torch = torch_or_none()
    if torch is None:
        raise Unavailable("torch is not installed")
    try:
        import bitsandbytes
    except ImportError:
        raise Unavailable("bitsandbytes is not installed (pip install --no-deps bitsandbytes)") from None
    name = BNB_CLASSES.get(rule.spec.name)
    if name is None or rule.torch_peer is None:
        raise Unavailable(f"bitsandbytes has no 8-bit {rule.name}")
    with _optimizer_step(torch, lambda tensors: getattr(bitsandbytes.optim, name)(tensors, **rule.torch_peer[1]),
                         problem, n_threads, "bitsandbytes") as step:
        yield step


@dataclass
class Timing:
    """Seconds per step: median, fastest and slowest sample of ``samples`` samples,
    each averaging ``calls`` back-to-back calls."""

    median: float
    min: float
    max: float
    calls: int
    samples: int


def busy_wait(seconds):
    """Keep the calling thread busy for ``seconds`` (a stand-in for a forward and
    backward pass between two optimizer steps)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def time_step(step, repeats=7, min_time=0.05, max_calls=100_000, idle=0.0):
    """Time ``step()``: one warm-up call, then ``repeats`` samples of enough calls
    to last ``min_time`` seconds each (at least one call).

    With ``idle`` > 0, each sample is one call after ``idle`` seconds of busy
    waiting, as in a training loop: an OpenMP thread team has gone back to sleep
    by then, and the sample includes waking it.
    """
    calls, samples = time_samples(step, repeats, min_time, max_calls, idle)
    return timing_of(samples, calls)


def timing_of(samples, calls):
    """The :class:`Timing` of per-call ``samples`` (seconds)."""
    return Timing(statistics.median(samples), min(samples), max(samples), calls, len(samples))


def time_samples(step, repeats=7, min_time=0.05, max_calls=100_000, idle=0.0, calls=None):
    """``(calls, samples)``: the seconds per call of each sample, as :func:`time_step` takes them.
    ``calls`` given: each sample averages that many calls (after the warm-up call),
    as in the earlier samples of the same measurement, instead of as many as last
    ``min_time``."""
    if idle > 0:
        step()
        samples = []
        for _ in range(repeats):
            busy_wait(idle)
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
        return 1, samples
    start = time.perf_counter()
    step()  # warm-up: caches, lazily created state, the thread team
    elapsed = time.perf_counter() - start
    if calls is None:
        calls = _calibrated(step, elapsed, min_time, max_calls)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        samples.append((time.perf_counter() - start) / calls)
    return calls, samples


def _calibrated(step, elapsed, min_time, max_calls):
    """How many back-to-back calls of ``step`` (which took ``elapsed`` seconds once)
    last ``min_time`` (at most ``max_calls``, at least one)."""
    calls = 1
    while elapsed * calls < min_time and calls < max_calls:
        calls = min(max_calls, max(2 * calls, int(min_time / max(elapsed, 1e-9))))
        start = time.perf_counter()
        for _ in range(calls):
            step()
        elapsed = (time.perf_counter() - start) / calls
    return calls
