"""ShardedOptimizer equals one process, bit for bit, on any number of ranks.

The single-process twin steps with the ranks' gradients added in rank order and
divided by N (``mpi_support.reduced``); with reduce_order="rank" and N a power of
two the sharded run must give the same bits (parameters and every state buffer).
Run under ``mpiexec -n 1, 2, 4``.
"""

import math

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="needs the distributed extra: pip install '.[distributed]'")

import fastdescent as fd
from fastdescent.distributed import ShardedOptimizer
from mpi_support import (
    COMM, RANK, SIZE, as_groups, assert_everywhere, bitwise_equal, first_difference, model_params, needs_ranks,
    optimizer_classes, rank_grads, reduced, same_state,
)

STEPS = 6

CONFIGS = {
    "sgd-nesterov": (fd.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                     {1: dict(momentum=0.5, dampening=0.1, nesterov=False)}),
    "sgd-plain": (fd.SGD, dict(lr=0.1), {}),
    "adagrad": (fd.Adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1), {}),
    "rmsprop-centered": (fd.RMSprop, dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.01), {}),
    "adam-amsgrad": (fd.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01), {1: dict(lr=0.003)}),
    "adamw": (fd.AdamW, dict(lr=0.01, maximize=True), {1: dict(weight_decay=0.0)}),
}


def run_pair(optimizer_class, kwargs, group_options, *, steps=STEPS, reduce="mean", reduce_order="rank",
             grad_scale=1.0, nonfinite=None, use_views=False, options=None):
    """Train a sharded optimizer and its single-process twin side by side; return both."""
    options = options or {}
    groups = model_params()
    twin_groups = [[p.copy() for p in group] for group in groups]
    opt = ShardedOptimizer(as_groups(groups, group_options), optimizer_class, COMM, reduce=reduce,
                           reduce_order=reduce_order, **kwargs, **options)
    twin = optimizer_class(as_groups(twin_groups, group_options), **kwargs, **options)
    results = []
    for t in range(1, steps + 1):
        mine = rank_grads(opt.params, t, RANK, nonfinite=nonfinite)
        if use_views:
            for view, g in zip(opt.grads, mine):
                view[...] = g
            results.append(opt.step(grad_scale=grad_scale))
        else:
            results.append(opt.step(mine, grad_scale=grad_scale))
        twin.step(reduced(twin.params, t, SIZE, mean=reduce == "mean", nonfinite=nonfinite), grad_scale=grad_scale)
    return opt, twin, results


def compare(opt, twin):
    """None if parameters and state are bit for bit the twin's, else what differs."""
    sd = opt.state_dict(to=None)
    return first_difference(opt.params, twin.params) or same_state(sd, twin.state_dict())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_rule_equals_one_process(config):
    optimizer_class, kwargs, group_options = CONFIGS[config]
    opt, twin, _ = run_pair(optimizer_class, kwargs, group_options)
    assert_everywhere(compare(opt, twin), config)


@pytest.mark.parametrize("optimizer_class", optimizer_classes(), ids=lambda c: c.__name__)
def test_any_exported_optimizer_class(optimizer_class):
    # Whatever rules fastdescent exports, with their defaults: none is special-cased.
    opt, twin, _ = run_pair(optimizer_class, {}, {}, steps=3)
    assert_everywhere(compare(opt, twin), optimizer_class.__name__)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_reductions_and_grad_scale(reduce):
    opt, twin, _ = run_pair(fd.Adam, dict(lr=0.01), {}, reduce=reduce, grad_scale=0.25)
    assert_everywhere(compare(opt, twin), reduce)


def test_gradient_views_and_options():
    # Filling opt.grads and stepping with no argument; threads and the reference backend pass through.
    problems = []
    for options in ({"n_threads": 1}, {"n_threads": 2}, {"backend": "reference"}):
        opt, twin, _ = run_pair(fd.SGD, dict(lr=0.05, momentum=0.9), {}, use_views=True, options=options)
        problems.append(compare(opt, twin))
    assert_everywhere(next((p for p in problems if p), None))


@needs_ranks(2)
def test_mpi_reduce_order():
    # MPI's Reduce_scatter_block: the same bits on 2 ranks (a + b == b + a); with more
    # ranks each element is within the summation bound of the rank-ordered sum.
    opt, twin, _ = run_pair(fd.SGD, dict(lr=0.1), {}, reduce_order="mpi", steps=1)
    if SIZE == 2:
        problem = first_difference(opt.params, twin.params)
    else:
        problem = None
        u = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}
        groups = model_params()
        initial = [p for group in groups for p in group]
        per_rank = [rank_grads(initial, 1, r) for r in range(SIZE)]
        for i, (p, q, p0) in enumerate(zip(opt.params, twin.params, initial)):
            gamma = (SIZE - 1) * u[p.dtype] / (1 - (SIZE - 1) * u[p.dtype])
            # lr * |sum - ordered sum| / N, plus one rounding of the update itself
            bound = 0.1 * gamma * sum(np.abs(g[i].astype(float)) for g in per_rank) / SIZE \
                + 2 * u[p.dtype] * np.maximum(np.abs(p0), np.abs(q))
            if np.any(np.abs(p.astype(float) - q) > bound):
                problem = f"parameter {i} outside the summation bound"
    assert_everywhere(problem)


def clipped_difference(opt, reference):
    """None if the ranks agree on the norm, it matches one process's to double
    rounding, float32 parameters are bit for bit the same and float64 ones within
    1e-12 relative (the clip factor, a double, may differ in its last bits)."""
    norms = COMM.allgather(opt.last_grad_norm)
    if len(set(norms)) != 1:
        return f"ranks disagree on the norm: {norms}"
    if not math.isclose(opt.last_grad_norm, reference.last_grad_norm, rel_tol=1e-13):
        return f"norm {opt.last_grad_norm!r} vs one process {reference.last_grad_norm!r}"
    for i, (p, q) in enumerate(zip(opt.params, reference.params)):
        if p.dtype == np.float32 and not bitwise_equal(p, q):
            return f"float32 parameter {i} differs"
        if not np.allclose(p, q, rtol=1e-12, atol=0):
            return f"float64 parameter {i} differs by more than 1e-12"
    return None


@pytest.mark.parametrize("clipping", [dict(clip_grad_norm=1.0), dict(clip_grad_value=0.5, clip_grad_norm=2.0)],
                         ids=["norm", "value-then-norm"])
def test_clipping_is_global(clipping):
    # Each rank's shard norm, all-gathered and combined in rank order: the same norm
    # on every rank, equal to one process's up to the order of its double sums.
    groups = model_params()
    opt = ShardedOptimizer(as_groups(groups), fd.Adam, COMM, lr=0.01, **clipping)
    reference = fd.Adam(as_groups([[p.copy() for p in g] for g in groups]), lr=0.01, **clipping)
    for t in range(1, STEPS + 1):
        opt.step(rank_grads(opt.params, t, RANK))
        reference.step(reduced(reference.params, t, SIZE))
    problem = None if reference.last_grad_norm > clipping["clip_grad_norm"] else "the test should clip"
    assert_everywhere(problem or clipped_difference(opt, reference))


@pytest.mark.parametrize("bad_rank", [0, -1], ids=["rank0", "last-rank"])
def test_nonfinite_guard_skips_on_every_rank(bad_rank):
    # One rank's NaN gradient at step 3: every rank skips that step, and the run
    # equals the twin's, which skips it too.
    bad_rank = bad_rank % SIZE
    opt, twin, results = run_pair(fd.Adam, dict(lr=0.01), {}, nonfinite=(3, bad_rank),
                                  options=dict(skip_nonfinite=True))
    expected = [t != 3 for t in range(1, STEPS + 1)]
    problem = None if results == expected and opt.skipped_steps == 1 == twin.skipped_steps else \
        f"steps taken {results}, skipped {opt.skipped_steps}"
    assert_everywhere(problem or compare(opt, twin))


def test_nonfinite_guard_with_value_clipping():
    opt, twin, results = run_pair(fd.SGD, dict(lr=0.1, momentum=0.9), {}, nonfinite=(2, SIZE - 1),
                                  options=dict(skip_nonfinite=True, clip_grad_value=1.0))
    problem = None if results.count(False) == 1 and not results[1] else f"steps taken {results}"
    assert_everywhere(problem or compare(opt, twin))


def test_nonfinite_norm_without_guard_zeroes_like_one_process():
    # (a limit no finite step reaches: only the NaN step is scaled, by 0)
    opt, twin, _ = run_pair(fd.SGD, dict(lr=0.1), {}, nonfinite=(2, 0), options=dict(clip_grad_norm=1e6), steps=2)
    problem = None
    for p, q in zip(opt.params, twin.params):
        if not np.array_equal(p, q, equal_nan=True):
            problem = "parameters differ after a non-finite clipped step"
    assert_everywhere(problem)


def test_scheduler_and_averaging():
    # A Scheduler writes the rate into the sharded optimizer's groups; an EMA of its
    # (replicated) parameters equals the twin's.
    groups = model_params()
    opt = ShardedOptimizer(as_groups(groups), fd.Adam, COMM, lr=0.1)
    twin = fd.Adam(as_groups([[p.copy() for p in g] for g in groups]), lr=0.1)
    runs = []
    for o in (opt, twin):
        runs.append((o, fd.Scheduler(o, fd.schedules.cosine(0.1, T_max=STEPS, eta_min=0.01)),
                     fd.Scheduler(o, fd.schedules.linear(0.9, 0.8, STEPS), "beta1"), fd.EMA(o, decay=0.9)))
    for t in range(1, STEPS + 1):
        for o, lr, beta1, ema in runs:
            o.step(rank_grads(o.params, t, RANK) if o is opt else reduced(o.params, t, SIZE))
            lr.step(), beta1.step(), ema.step()
    problem = compare(opt, twin) or first_difference(runs[0][3].averages, runs[1][3].averages)
    if opt.param_groups[0]["lr"] != twin.param_groups[0]["lr"]:
        problem = "the schedule differs"
    assert_everywhere(problem)


def test_state_is_sharded():
    groups = model_params()
    opt = ShardedOptimizer(as_groups(groups), fd.Adam, COMM, lr=0.01)
    opt.step(rank_grads(opt.params, 1, RANK))
    sizes = COMM.allgather(opt.state_bytes())
    whole = sum(2 * p.nbytes for group in groups for p in group)  # exp_avg and exp_avg_sq
    ranges = opt.shard_ranges()
    problem = None
    if sum(sizes) != whole:
        problem = f"the ranks' state adds up to {sum(sizes)} bytes, one process keeps {whole}"
    elif SIZE > 1 and max(sizes) >= whole:
        problem = "a rank keeps the whole state"
    for group, dtype, start, stop, size in ranges:
        if start < stop and start * np.dtype(dtype).itemsize % 64:
            problem = f"group {group} {dtype}: the shard starts at element {start}, not on a cache line"
    assert_everywhere(problem)


def test_parameters_identical_on_every_rank():
    # Rank 0's initial values are broadcast; after steps every rank holds the same bits.
    groups = model_params(seed=RANK)  # different on purpose
    opt = ShardedOptimizer(as_groups(groups), fd.SGD, COMM, lr=0.1, momentum=0.9)
    for t in range(1, 3):
        opt.step(rank_grads(opt.params, t, RANK))
    everyone = COMM.allgather([p.copy() for p in opt.params])
    problem = next((f"rank {r} differs" for r, theirs in enumerate(everyone)
                    if not all(bitwise_equal(a, b) for a, b in zip(theirs, opt.params))), None)
    assert_everywhere(problem)
