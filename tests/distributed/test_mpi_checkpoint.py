"""Checkpoints of a ShardedOptimizer: sharded (a file per rank and an index) and
consolidated (the single-process format), resumed on as many ranks, on fewer
ranks (sub-communicators of this job: 4 -> 2 -> 1) and in one plain process, all
continuing bit for bit alike; and every way a load can fail, failing on every
rank with nothing changed."""

import os

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="needs the distributed extra: pip install '.[distributed]'")
from mpi4py import MPI

import fastdescent as fd
from fastdescent.distributed import RankError, ShardedOptimizer, is_sharded, load_checkpoint
from fastdescent.distributed import checkpoint as sharded_format
from mpi_support import (
    COMM, RANK, SIZE, as_groups, assert_everywhere, expect_everywhere, first_difference, model_params, rank_grads,
    reduced, same_state, shared_directory,
)

GROUP_OPTIONS = {1: dict(lr=0.003, weight_decay=0.0)}
KWARGS = dict(lr=0.01, amsgrad=True, weight_decay=0.01)
STEPS = 3


def sharded(comm=COMM, reduce="mean", seed=0, **options):
    groups = model_params(seed)
    return ShardedOptimizer(as_groups(groups, GROUP_OPTIONS), fd.Adam, comm, reduce=reduce, **KWARGS, **options)


def plain(seed=0):
    return fd.Adam(as_groups(model_params(seed), GROUP_OPTIONS), **KWARGS)


def with_companions(opt):
    """A schedule and a weight average registered with ``opt``."""
    schedule = fd.Scheduler(opt, fd.schedules.cosine(0.01, T_max=4 * STEPS, eta_min=0.001))
    ema = fd.EMA(opt, decay=0.9)
    opt.register_state("lr", schedule)
    opt.register_state("ema", ema)
    return schedule, ema


def train(opt, companions, first, last, rank, n_ranks):
    """Steps ``first..last``; rank ``rank`` of ``n_ranks`` (None: one process)."""
    for t in range(first, last + 1):
        if rank is None:
            opt.step(reduced(opt.params, t, n_ranks))
        else:
            opt.step(rank_grads(opt.params, t, rank))
        for c in companions:
            c.step()


def continuation(opt, companions, first, last, in_job):
    """Steps whose reduced gradient is the same on any number of ranks: rank 0 (or the
    single process) gives G_t, the others zeros, and the optimizers add them
    (reduce="sum"); G_t + 0 + ... + 0 == G_t exactly."""
    for t in range(first, last + 1):
        grads = rank_grads(opt.params, 100 + t, 0)
        if in_job and opt.rank != 0:
            grads = [np.zeros_like(g) for g in grads]
        opt.step(grads)
        for c in companions:
            c.step()


def snapshot(opt, companions):
    """Parameters, EMA averages and learning rate after a run."""
    return [p.copy() for p in opt.params], [a.copy() for a in companions[1].averages], opt.param_groups[0]["lr"]


def snapshot_difference(a, b):
    if a[2] != b[2]:
        return f"learning rate {a[2]} != {b[2]}"
    return first_difference(a[0], b[0]) or first_difference(a[1], b[1])


@pytest.mark.parametrize("kind", ["sharded", "consolidated"])
def test_resume_on_the_same_ranks(kind):
    with shared_directory() as directory:
        path = os.path.join(directory, "ckpt" if kind == "sharded" else "ckpt.npz")
        opt = sharded()
        companions = with_companions(opt)
        train(opt, companions, 1, STEPS, RANK, SIZE)
        opt.save(path, sharded=kind == "sharded")
        train(opt, companions, STEPS + 1, 2 * STEPS, RANK, SIZE)
        resumed = sharded(seed=7)
        resumed_companions = with_companions(resumed)
        resumed.load(path)
        train(resumed, resumed_companions, STEPS + 1, 2 * STEPS, RANK, SIZE)
        problem = snapshot_difference(snapshot(resumed, resumed_companions), snapshot(opt, companions)) \
            or same_state(resumed.state_dict(to=None), opt.state_dict(to=None))
        assert_everywhere(problem)


def test_resume_on_fewer_ranks_and_in_one_process():
    # Saved on all ranks of this job (4 under mpiexec -n 4), resumed on every
    # smaller power of two (sub-communicators: 2, then 1) and in one plain process,
    # from both kinds of checkpoint: every continuation equals the one on all ranks.
    with shared_directory() as directory:
        paths = {True: os.path.join(directory, "sharded"), False: os.path.join(directory, "whole.npz")}
        opt = sharded()
        train(opt, with_companions(opt), 1, STEPS, RANK, SIZE)
        for is_sharded_kind, path in paths.items():
            opt.save(path, sharded=is_sharded_kind)

        truth = sharded(reduce="sum", seed=3)
        truth_companions = with_companions(truth)
        truth.load(paths[True])
        continuation(truth, truth_companions, STEPS + 1, 2 * STEPS, in_job=True)
        expected = COMM.bcast(snapshot(truth, truth_companions) if RANK == 0 else None, root=0)

        problems = []
        n_ranks = SIZE
        while n_ranks >= 1:
            sub = COMM.Split(0 if RANK < n_ranks else MPI.UNDEFINED, key=RANK)
            if sub != MPI.COMM_NULL:
                for is_sharded_kind, path in paths.items():
                    resumed = sharded(sub, reduce="sum", seed=5)
                    companions = with_companions(resumed)
                    resumed.load(path)
                    continuation(resumed, companions, STEPS + 1, 2 * STEPS, in_job=True)
                    difference = snapshot_difference(snapshot(resumed, companions), expected)
                    if difference:
                        problems.append(f"{n_ranks} ranks from {'sharded' if is_sharded_kind else 'one file'}: "
                                        f"{difference}")
                sub.Free()
            n_ranks //= 2
        if RANK == 0:  # one plain process, no MPI involved
            for is_sharded_kind, path in paths.items():
                single = plain(seed=9)
                companions = with_companions(single)
                load_checkpoint(single, path)
                continuation(single, companions, STEPS + 1, 2 * STEPS, in_job=False)
                difference = snapshot_difference(snapshot(single, companions), expected)
                if difference:
                    problems.append(f"plain fd.Adam from {'sharded' if is_sharded_kind else 'one file'}: {difference}")
        assert_everywhere("; ".join(problems) or None)


def test_consolidated_file_is_the_single_process_format():
    with shared_directory() as directory:
        path = os.path.join(directory, "whole.npz")
        opt = sharded()
        train(opt, (), 1, STEPS, RANK, SIZE)
        opt.save(path)
        problem = None
        if RANK == 0:
            single = plain(seed=2)
            single.load(path)  # the plain optimizer's own loader
            problem = first_difference(single.params, opt.params) \
                or same_state(single.state_dict(), opt.state_dict(to=RANK) or {})
        else:
            opt.state_dict(to=0)
        assert_everywhere(problem)


def test_state_dict_round_trip_and_plain_optimizer():
    opt = sharded()
    train(opt, (), 1, STEPS, RANK, SIZE)
    sd = opt.state_dict(to=None)
    other = sharded(seed=4)
    other.load_state_dict(sd)
    single = plain()
    single.load_state_dict(sd)  # the same layout as a plain optimizer's
    problem = same_state(other.state_dict(to=None), sd) or same_state(single.state_dict(), sd)
    assert_everywhere(problem)


def test_sharded_directory_layout_and_stale_files():
    with shared_directory() as directory:
        path = os.path.join(directory, "ckpt")
        opt = sharded()
        opt.step(rank_grads(opt.params, 1, RANK))
        opt.save(path, sharded=True)
        first = sorted(os.listdir(path))
        opt.step(rank_grads(opt.params, 2, RANK))
        # A later save that dies before its index: its rank files exist, the index
        # still names the first save's files, which load whole.
        sharded_format.write_rank_file(path, "0123abcd", RANK, SIZE, {})
        COMM.Barrier()
        half_saved = sharded(seed=1)
        half_saved.load(path)
        opt.save(path, sharded=True)
        second = sorted(os.listdir(path))
        problem = None
        if len(first) != SIZE + 1 or "index.npz" not in first or not is_sharded(path):
            problem = f"first save wrote {first}"
        elif len(second) != SIZE + 1 or set(first) & set(second) != {"index.npz"}:
            problem = f"second save left {second} (first {first})"
        elif half_saved.shard_optimizer.state[0]["step"] != 1:
            problem = "the half-written save was loaded"
        assert_everywhere(problem)


# -- errors: raised on every rank, nothing changed ---------------------------------

def trained_and_saved(directory, kind="sharded"):
    path = os.path.join(directory, kind if kind == "sharded" else "whole.npz")
    opt = sharded()
    train(opt, (), 1, 2, RANK, SIZE)
    opt.save(path, sharded=kind == "sharded")
    return path


def unchanged_after_failed_load(target, path, exception, **load_options):
    before = target.state_dict(to=None), [p.copy() for p in target.params], dict(target.param_groups[1])
    caught = expect_everywhere(exception, target.load, path, **load_options)
    after = target.state_dict(to=None)
    problem = same_state(after, before[0]) or first_difference(target.params, before[1])
    if {k: v for k, v in target.param_groups[1].items() if k != "params"} != \
            {k: v for k, v in before[2].items() if k != "params"}:
        problem = "hyperparameters changed"
    assert_everywhere(problem)
    return caught


@pytest.mark.parametrize("kind", ["sharded", "consolidated"])
def test_load_into_different_shapes_fails_everywhere(kind):
    with shared_directory() as directory:
        path = trained_and_saved(directory, kind)
        groups = model_params()
        groups[1][0] = np.zeros(130, groups[1][0].dtype)
        target = ShardedOptimizer(as_groups(groups, GROUP_OPTIONS), fd.Adam, COMM, **KWARGS)
        target.step(rank_grads(target.params, 1, RANK))
        caught = unchanged_after_failed_load(target, path, (fd.CheckpointError, RankError))
        if kind == "sharded" or RANK == 0:
            assert isinstance(caught, fd.CheckpointError) and "(130,)" in str(caught), caught


@pytest.mark.parametrize("kind", ["sharded", "consolidated"])
def test_load_into_another_rule_fails_everywhere(kind):
    with shared_directory() as directory:
        path = trained_and_saved(directory, kind)
        target = ShardedOptimizer(as_groups(model_params(), GROUP_OPTIONS), fd.RMSprop, COMM, lr=0.01)
        unchanged_after_failed_load(target, path, (fd.CheckpointError, RankError))


def test_corrupted_rank_file_fails_everywhere():
    with shared_directory() as directory:
        path = trained_and_saved(directory)
        if RANK == 0:
            victim = next(os.path.join(path, f) for f in sorted(os.listdir(path)) if "-rank0-" in f)
            with open(victim, "r+b") as f:
                f.seek(os.path.getsize(victim) // 2)
                f.write(b"\xff" * 64)
        COMM.Barrier()
        target = sharded(seed=1)
        target.step(rank_grads(target.params, 1, RANK))
        caught = unchanged_after_failed_load(target, path, (fd.CheckpointError, RankError))
        assert "rank0" in str(caught) or "rank 0" in str(caught), caught


def test_missing_rank_file_fails_everywhere():
    with shared_directory() as directory:
        path = trained_and_saved(directory)
        if RANK == 0:
            os.unlink(next(os.path.join(path, f) for f in os.listdir(path) if f"-rank{SIZE - 1}-" in f))
        COMM.Barrier()
        target = sharded(seed=1)
        caught = unchanged_after_failed_load(target, path, (fd.CheckpointError, RankError))
        assert "missing" in str(caught), caught


def test_registered_objects_must_match():
    with shared_directory() as directory:
        path = os.path.join(directory, "ckpt")
        opt = sharded()
        with_companions(opt)
        opt.step(rank_grads(opt.params, 1, RANK))
        opt.save(path, sharded=True)
        target = sharded(seed=1)
        unchanged_after_failed_load(target, path, fd.CheckpointError)
        target.load(path, strict=False)  # loads what is common: nothing registered here
        assert_everywhere(first_difference(target.params, opt.params))


def test_load_state_dict_wrong_shapes_fails_everywhere():
    opt = sharded()
    opt.step(rank_grads(opt.params, 1, RANK))
    sd = opt.state_dict(to=None)
    sd["state"][3]["exp_avg"] = sd["state"][3]["exp_avg"][:-1]
    before = opt.state_dict(to=None)
    expect_everywhere(ValueError, opt.load_state_dict, sd)
    assert_everywhere(same_state(opt.state_dict(to=None), before))
