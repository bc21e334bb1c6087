"""The spawned side of test_torch_zero.py: one rank of DDP + ZeroRedundancyOptimizer
over fastdescent.torch. Kept apart from the test module so that the spawned
processes import neither pytest's test module nor mpi4py."""

import datetime
import os
import socket
import warnings

import torch
import torch.distributed as dist

with warnings.catch_warnings():  # its import scripts functional optimizers with the deprecated torch.jit
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import fastdescent.torch as fdt
from torch_support import batches, loss_fn, mlp

STEPS = 8

RUNS = {  # world size -> (rule, kwargs) trained one after the other in one process group
    2: [("Adam", dict(lr=0.01, weight_decay=0.01)), ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True))],
    4: [("Adam", dict(lr=0.01, amsgrad=True)), ("AdamW", dict(lr=0.01, weight_decay=0.1))],
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero_worker(rank, world_size, port, configs, out):
    """One rank: for each config, DDP over the MLP and ZeRO over fastdescent.torch.<rule>;
    rank 0 saves the parameters and the consolidated state dict to ``out/<i>.pt``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for i, (rule, kwargs) in enumerate(configs):
            model = mlp()
            ddp = DistributedDataParallel(model)
            opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=getattr(fdt, rule), **kwargs)
            for x, y in batches((10,), steps=STEPS):
                opt.zero_grad()
                loss_fn(ddp, x[rank::world_size], y[rank::world_size]).backward()  # DDP averages over ranks
                opt.step()
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                torch.save({"params": [p.detach().clone() for p in model.parameters()],
                            "state_dict": opt.state_dict(), "local_state": len(opt.optim.state)}, f"{out}/{i}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
