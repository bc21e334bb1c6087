"""fastdescent.torch under torch.distributed: ZeroRedundancyOptimizer + DDP on gloo.

In tests/distributed (skipped without the distributed extra, like the MPI tests),
run by plain pytest only: each world size is one spawn of processes importing
torch, 15-90 s on two cores depending on the load.

2 and 4 processes on 127.0.0.1 (torch.multiprocessing spawn) train with
``ZeroRedundancyOptimizer(optimizer_class=fastdescent.torch.<Rule>)``, each rank
keeping the state of its share of the parameters, under DistributedDataParallel,
each rank on its slice of every batch. The result must equal a single-process
``torch.optim.<Rule>`` trained on the whole batches, to float rounding (the bound
of ``torch_support.tolerance``: DDP's averaged gradients are summed in another
order than one process's), and the consolidated state dict must load into
``torch.optim.<Rule>`` and equal its state.
"""

import pytest

pytest.importorskip("mpi4py", reason="needs the distributed extra: pip install '.[distributed]'")
from mpi_support import SIZE  # noqa: E402

if SIZE > 1:
    pytest.skip("spawns its own processes; run by plain pytest, not under mpiexec", allow_module_level=True)
torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

from torch_support import assert_close, batches, loss_fn, mlp  # noqa: E402
from torch_zero_worker import RUNS, STEPS, free_port, zero_worker  # noqa: E402

TIMEOUT = 400  # seconds for a whole spawned run (about 15-90 s, depending on the load)


@pytest.fixture(scope="module", params=sorted(RUNS), ids=lambda n: f"{n}-processes")
def spawned(request, tmp_path_factory):
    """Run every config of one world size in spawned processes; their rank 0 results."""
    world_size = request.param
    out = tmp_path_factory.mktemp(f"zero{world_size}")
    context = mp.spawn(zero_worker, args=(world_size, free_port(), RUNS[world_size], str(out)),
                       nprocs=world_size, join=False)
    try:
        waited = 0
        while not context.join(timeout=5):
            waited += 5
            if waited >= TIMEOUT:
                raise TimeoutError(f"{world_size} processes did not finish in {TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return world_size, [torch.load(out / f"{i}.pt") for i in range(len(RUNS[world_size]))]


def single_process(rule, kwargs):
    model = mlp()
    opt = getattr(torch.optim, rule)(model.parameters(), foreach=False, **kwargs)
    for x, y in batches((10,), steps=STEPS):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("config", [0, 1])
def test_zero_redundancy_with_ddp_equals_one_process(spawned, config):
    world_size, results = spawned
    rule, kwargs = RUNS[world_size][config]
    result = results[config]
    model, reference = single_process(rule, kwargs)
    for k, (got, expected) in enumerate(zip(result["params"], model.parameters())):
        assert_close(got, expected.detach(), f"{rule} on {world_size} processes: parameter {k}")
    # rank 0 kept the state of its share of the parameters only
    assert 0 < result["local_state"] < len(list(model.parameters()))
    # the consolidated state dict loads into torch.optim and holds its state
    loaded = getattr(torch.optim, rule)(mlp().parameters(), foreach=False, **kwargs)
    loaded.load_state_dict(result["state_dict"])
    expected_state = reference.state_dict()["state"]
    got_state = loaded.state_dict()["state"]
    assert got_state.keys() == expected_state.keys()
    for index, entries in expected_state.items():
        for key, value in entries.items():
            if key == "step":
                assert got_state[index][key].item() == value.item()
            elif value is not None:
                assert_close(got_state[index][key], value, f"state[{index}][{key!r}]")
