"""MPI plumbing: the lazy mpi4py import, agreeing on errors, aborting instead of hanging.

Every collective must be entered by every rank. So a rank may raise only where all
ranks learn of it together: :func:`agreed` runs local work (checks, file reads) and
then one small collective in which every rank reports whether it failed; if any
did, every rank raises. Past that point a local exception would leave the other
ranks waiting forever inside the next collective, so :func:`or_abort` turns it into
``MPI_Abort`` on the communicator: the traceback is printed and every process of
the job ends.
"""

import contextlib
import sys
import traceback

import numpy as np

INSTALL_HINT = (
    "fastdescent.distributed needs mpi4py and an MPI library: pip install 'fastdescent[distributed]' "
    "(mpi4py and the MPICH wheel), or mpi4py over a system MPI (see the README)"
)


class RankError(RuntimeError):
    """Another rank failed where all ranks check together; nothing was changed."""


def mpi():
    """The ``mpi4py.MPI`` module, imported on first use."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return MPI


def datatype(dtype):
    """The MPI datatype of a NumPy dtype."""
    from mpi4py.util.dtlib import from_numpy_dtype

    return from_numpy_dtype(np.dtype(dtype))


@contextlib.contextmanager
def agreed(comm, what):
    """Run the block on every rank, then agree: if it raised on any rank, raise on all.

    The failing rank re-raises its own exception; the others raise
    :class:`RankError` naming the first failing rank and its message. Costs one
    one-integer all-reduce when nothing failed.
    """
    MPI = mpi()
    error = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001 - every rank must get past the collective below
        error = caught
    failed = np.array([0 if error is None else 1], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, failed, op=MPI.MAX)
    if not failed[0]:
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = comm.allgather(message)
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise RankError(f"{what} failed on rank {rank} of {comm.Get_size()}: {message}")


@contextlib.contextmanager
def or_abort(comm, what):
    """Run the block; on any exception print it and abort the communicator (``MPI_Abort``),
    which ends every process of the job rather than leaving the others in a collective."""
    try:
        yield
    except BaseException:
        text = traceback.format_exc()
        sys.stderr.write(
            f"fastdescent.distributed: rank {comm.Get_rank()} of {comm.Get_size()} failed during {what}; "
            f"the other ranks would wait for it forever, so the communicator is aborted.\n{text}"
        )
        sys.stderr.flush()
        comm.Abort(1)
        raise  # only if Abort returned (it does not)
