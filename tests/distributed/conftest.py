"""The MPI tests: run by plain pytest (one rank, plus the tests that launch
``mpiexec`` themselves) and under ``mpiexec -n 2`` / ``-n 4`` (see .ci/run).

Skipped whole when mpi4py is not installed (``pip install '.[distributed]'``).
Every test runs on every rank; tests end with a collective check
(``mpi_support.assert_everywhere``), so a failure on any rank fails the test on
all of them and the ranks stay in step.
"""

import pytest

pytest.importorskip("mpi4py", reason="needs the distributed extra (mpi4py)")
