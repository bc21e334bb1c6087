"""Errors across ranks: a bad argument on any rank raises on every rank (the others
raise RankError) and changes nothing; a failure inside a collective step aborts
the job instead of hanging it."""

import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="needs the distributed extra: pip install '.[distributed]'")

import fastdescent as fd
from fastdescent.distributed import RankError, ShardedOptimizer
from mpi_support import (
    COMM, RANK, SIZE, as_groups, assert_everywhere, expect_everywhere, first_difference, launch, launches,
    model_params, needs_ranks, rank_grads,
)


def adam():
    return ShardedOptimizer(as_groups(model_params()), fd.Adam, COMM, lr=0.01)


def test_bad_construction_arguments():
    expect_everywhere(TypeError, ShardedOptimizer, model_params()[0], fd.Adam, COMM, flat=True)
    expect_everywhere(TypeError, ShardedOptimizer, model_params()[0], fd.Adam, COMM, accumulate_steps=2)
    expect_everywhere(TypeError, ShardedOptimizer, model_params()[0], "Adam", COMM)
    expect_everywhere(ValueError, ShardedOptimizer, model_params()[0], fd.Adam, COMM, reduce="max")
    expect_everywhere(ValueError, ShardedOptimizer, model_params()[0], fd.Adam, COMM, lr=-1.0)
    expect_everywhere(TypeError, ShardedOptimizer, [np.zeros(3, np.int64)], fd.Adam, COMM)
    # A rule that sees whole tensors (Adafactor's norms and factors) cannot run on shards.
    expect_everywhere(TypeError, ShardedOptimizer, model_params()[0], fd.Adafactor, COMM)


@needs_ranks(2)
def test_ranks_with_different_shapes():
    params = model_params()[0]
    if RANK == SIZE - 1:
        params[1] = np.zeros(14, params[1].dtype)
    caught = expect_everywhere(ValueError, ShardedOptimizer, params, fd.Adam, COMM, lr=0.01)
    assert "parameter shapes" in str(caught) and f"rank {SIZE - 1}" in str(caught), caught


@needs_ranks(2)
def test_ranks_with_different_hyperparameters():
    caught = expect_everywhere(ValueError, ShardedOptimizer, model_params()[0], fd.SGD, COMM, lr=0.1 + RANK)
    assert "hyperparameters" in str(caught), caught


@needs_ranks(2)
def test_bad_argument_on_one_rank():
    params = model_params()[0]
    if RANK == 1:
        params[0] = params[0].astype(np.int32)
    caught = expect_everywhere((TypeError, RankError), ShardedOptimizer, params, fd.Adam, COMM)
    assert isinstance(caught, TypeError if RANK == 1 else RankError), caught
    if RANK != 1:
        assert "rank 1" in str(caught) and "float32 or float64" in str(caught), caught


def test_bad_gradients_on_one_rank_then_the_run_goes_on():
    opt = adam()
    opt.step(rank_grads(opt.params, 1, RANK))
    before = [p.copy() for p in opt.params], opt.state_bytes()
    grads = rank_grads(opt.params, 2, RANK)
    if RANK == SIZE - 1:
        grads = grads[:-1]
    caught = expect_everywhere((ValueError, RankError), opt.step, grads)
    problem = first_difference(opt.params, before[0])
    if RANK == SIZE - 1 and "gradients for" not in str(caught):
        problem = f"unclear error {caught}"
    opt.step(rank_grads(opt.params, 2, RANK))  # every rank goes on together
    steps = COMM.allgather(opt.shard_optimizer.state[0]["step"])
    assert_everywhere(problem or (None if steps == [2] * SIZE else f"steps {steps}"))


def test_bad_hyperparameter_raises_before_any_collective():
    opt = adam()
    opt.step(rank_grads(opt.params, 1, RANK))
    before = [p.copy() for p in opt.params]
    opt.param_groups[1]["lr"] = -0.5
    caught = expect_everywhere(ValueError, opt.step, rank_grads(opt.params, 2, RANK))
    assert "param_groups[1]" in str(caught) and "lr" in str(caught), caught
    problem = first_difference(opt.params, before)
    opt.param_groups[1]["lr"] = 0.01
    opt.step(rank_grads(opt.params, 2, RANK))
    assert_everywhere(problem)


@needs_ranks(2)
def test_bad_hyperparameter_on_one_rank():
    opt = adam()
    if RANK == 0:
        opt.param_groups[0]["betas"] = (0.9, 1.5)
    caught = expect_everywhere((ValueError, RankError), opt.step, rank_grads(opt.params, 1, RANK))
    assert isinstance(caught, ValueError if RANK == 0 else RankError), caught


def test_bad_grad_scale():
    opt = adam()
    expect_everywhere(ValueError, opt.step, rank_grads(opt.params, 1, RANK), grad_scale=0.0)


def test_state_dict_target_rank():
    opt = adam()
    with pytest.raises(ValueError):
        opt.state_dict(to=SIZE)


# -- a failure past the agreement point: abort, do not hang --------------------------

ABORTING_SCRIPT = textwrap.dedent("""
    import numpy as np
    from mpi4py import MPI
    import fastdescent as fd
    from fastdescent.distributed import ShardedOptimizer

    comm = MPI.COMM_WORLD
    opt = ShardedOptimizer([np.ones(1000, np.float32)], fd.Adam, comm, lr=0.1)
    if comm.rank == 1:
        def broken(*args, **kwargs):
            raise RuntimeError("simulated failure inside the rule")
        opt.shard_optimizer.step = broken
    opt.step([np.ones(1000, np.float32)])      # rank 0 waits in the all-gather
    opt.step([np.ones(1000, np.float32)])
    print("finished normally", flush=True)
""")


@launches
def test_a_rank_failing_inside_a_step_aborts_the_job(tmp_path):
    script = tmp_path / "abort.py"
    script.write_text(ABORTING_SCRIPT)
    started = time.monotonic()
    result = launch(2, script)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "finished normally" not in result.stdout
    assert "simulated failure inside the rule" in result.stderr and "aborted" in result.stderr, result.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
