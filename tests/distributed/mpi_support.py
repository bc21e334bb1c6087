"""Helpers shared by the MPI tests: the ranks' gradients, the single-process twin,
and checks that every rank agrees on.

The tests in this folder run under plain pytest (one rank, plus the tests that
launch ``mpiexec`` or spawn processes themselves) and under ``mpiexec -n 2`` and
``-n 4`` (see .ci/run). Each module skips itself when mpi4py is not installed
(``pip install '.[distributed]'``). Every test runs on every rank and ends with a
collective check (:func:`assert_everywhere`), so a failure on any rank fails the
test on all of them and the ranks stay in step.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from functools import reduce

import numpy as np
import pytest
from mpi4py import MPI

import fastdescent as fd

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()


def needs_ranks(n):
    return pytest.mark.skipif(SIZE < n, reason=f"needs mpiexec -n {n} or more")


def model_params(seed=0, dtypes=(np.float32, np.float64)):
    """Two groups, odd lengths, mixed dtypes: [[arrays of group 0], [arrays of group 1]]."""
    rng = np.random.default_rng(seed)
    shapes = [[(7, 5), (13,), (3, 1, 3)], [(129,), (2, 33)]]
    groups = []
    for g, group_shapes in enumerate(shapes):
        groups.append([rng.standard_normal(shape).astype(dtypes[(g + k) % len(dtypes)])
                       for k, shape in enumerate(group_shapes)])
    return groups


def as_groups(groups, group_options=None):
    """Parameter-group dicts; ``group_options[g]`` (a dict) overrides group ``g``'s hyperparameters."""
    group_options = group_options or {}
    return [{"params": arrays, **group_options.get(g, {})} for g, arrays in enumerate(groups)]


def rank_grads(params, step, rank, seed=1, nonfinite=None):
    """Rank ``rank``'s gradients at ``step``: fresh normal data, different on every rank."""
    rng = np.random.default_rng((seed, step, rank))
    grads = [(rng.standard_normal(p.shape) * 2.0).astype(p.dtype) for p in params]
    if nonfinite is not None and nonfinite[0] == step and nonfinite[1] == rank:
        grads[-1].flat[0] = np.nan
    return grads


def reduced(params, step, n_ranks, mean=True, **options):
    """What one process steps with: the ranks' gradients added in rank order (and / N)."""
    per_rank = [rank_grads(params, step, r, **options) for r in range(n_ranks)]
    total = [reduce(np.add, [per_rank[r][i] for r in range(n_ranks)]) for i in range(len(params))]
    return [t / np.asarray(n_ranks, t.dtype) for t in total] if mean else total


def bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    kind = {4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return bool(np.array_equal(a.view(kind), b.view(kind)))


def same_state(sd_a, sd_b):
    """Two single-process state dicts hold the same buffers bit for bit and the same steps."""
    if sorted(sd_a["state"]) != sorted(sd_b["state"]):
        return f"state indices {sorted(sd_a['state'])} != {sorted(sd_b['state'])}"
    for i in sd_a["state"]:
        a, b = sd_a["state"][i], sd_b["state"][i]
        if sorted(a) != sorted(b):
            return f"state[{i}] names {sorted(a)} != {sorted(b)}"
        for name in a:
            same = a[name] == b[name] if name == "step" else bitwise_equal(a[name], b[name])
            if not same:
                return f"state[{i}][{name!r}] differs"
    return None


def first_difference(actual, expected):
    for i, (a, b) in enumerate(zip(actual, expected)):
        if not bitwise_equal(a, b):
            return f"parameter {i} differs (max abs {np.max(np.abs(a.astype(float) - b)):.3g})"
    return None


def assert_everywhere(problem, what=""):
    """Fail on every rank if ``problem`` (None or a message) is set on any rank."""
    problems = COMM.allgather(problem)
    bad = [(r, p) for r, p in enumerate(problems) if p]
    assert not bad, f"{what}: " + "; ".join(f"rank {r}: {p}" for r, p in bad)


@contextmanager
def shared_directory():
    """A temporary directory that every rank sees (rank 0 makes it and removes it)."""
    path = tempfile.mkdtemp(prefix="fd-mpi-") if RANK == 0 else None
    path = COMM.bcast(path, root=0)
    try:
        yield path
    finally:
        COMM.Barrier()
        if RANK == 0:
            shutil.rmtree(path, ignore_errors=True)


def expect_everywhere(exception, fn, *args, **kwargs):
    """Run a collective ``fn`` that must raise on every rank; return this rank's exception."""
    try:
        fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        caught = error
    else:
        caught = None
    assert_everywhere(None if isinstance(caught, exception) else f"raised {caught!r}, wanted {exception.__name__}")
    return caught


def optimizer_classes():
    """Every optimizer class fastdescent exports (new rules join automatically), but
    those of tensorwise rules (Adafactor), which cannot run on shards:
    test_mpi_errors checks that ShardedOptimizer refuses them."""
    classes = [getattr(fd, name) for name in sorted(fd.__all__)
               if isinstance(getattr(fd, name), type) and issubclass(getattr(fd, name), fd.optim.Optimizer)]
    return [c for c in classes if not getattr(getattr(c, "spec", None), "tensorwise", False)]


def mpiexec():
    """The mpiexec of this Python's environment (the MPICH wheel puts it beside python)."""
    candidates = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), shutil.which("mpiexec")]
    return next((c for c in candidates if c and os.path.exists(c)), None)


launches = pytest.mark.skipif(SIZE > 1 or mpiexec() is None,
                              reason="launches its own mpiexec: run by plain pytest, with mpiexec beside python")


def launch(n_ranks, *args, timeout=120):
    """Run ``mpiexec -n n_ranks python *args`` in a clean environment (nothing inherited
    from this process's own MPI) with this test run's import path; the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "MPICH_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([mpiexec(), "-n", str(n_ranks), sys.executable, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
