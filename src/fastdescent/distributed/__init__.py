"""Data-parallel training with the optimizer state sharded across processes (ZeRO stage 1).

:class:`ShardedOptimizer` runs any fastdescent optimizer over MPI (mpi4py): each
rank keeps the state of its own shard of the parameters, gradients are
reduce-scattered and the updated parameters all-gathered, in one ``step`` call.
Install with ``pip install 'fastdescent[distributed]'`` (mpi4py and the MPICH
wheel) and launch with ``mpiexec -n N python script.py``.

Checkpoints: ``opt.save(path)`` writes the single-process format,
``opt.save(path, sharded=True)`` one file per rank plus an index; ``opt.load``
reads either on any number of ranks, and :func:`load_checkpoint` loads either into
a plain single-process optimizer (no MPI needed).

PyTorch users have the same scheme in ``torch.distributed.optim.ZeroRedundancyOptimizer``,
which takes ``optimizer_class=fastdescent.torch.Adam`` (see the README).

Importing this package does not import mpi4py; constructing a
:class:`ShardedOptimizer` does.
"""

from ._mpi import RankError
from .checkpoint import is_sharded, load_checkpoint
from .zero import ShardedOptimizer

__all__ = ["RankError", "ShardedOptimizer", "is_sharded", "load_checkpoint"]
