"""examples/distributed_mlp.py runs under mpiexec and matches one process's accuracy."""

import pathlib
import re

import pytest

pytest.importorskip("mpi4py", reason="needs the distributed extra: pip install '.[distributed]'")

from mpi_support import launch, launches

pytest.importorskip("sklearn")
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "distributed_mlp.py"


@launches
@pytest.mark.parametrize("n_ranks", [1, 2])
def test_distributed_mlp_example(n_ranks):
    result = launch(n_ranks, EXAMPLE, "--epochs", "4")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    accuracies = [float(a) for a in re.findall(r"held-out accuracy, [^:]*: ([0-9.]+)", out)]
    assert len(accuracies) == 2 and abs(accuracies[0] - accuracies[1]) <= 0.01, out
    assert accuracies[0] > 0.8, out
    state_rows = re.findall(r"^\s+(\d+)\s+([\d,]+)\s+([\d.]+)%", out, flags=re.M)
    assert len(state_rows) == n_ranks, out
    assert sum(float(share) for _, _, share in state_rows) == pytest.approx(100, abs=0.5), out
