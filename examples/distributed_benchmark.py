"""
Timing sharded optimizer steps on MPI
=====================================

The step of ``fastdescent.distributed.ShardedOptimizer``, its phases, and the
optimizer state per rank: the figures of BENCHMARKS.md (not run when the
documentation is built: it needs ``mpiexec`` and minutes)::

    mpiexec -n N python examples/distributed_benchmark.py --elements 1e7 1e8 --json runN.json
    python examples/distributed_benchmark.py --table run1.json run2.json run4.json

For each total number of float32 parameters (split into 10 arrays), a
``ShardedOptimizer`` over ``fastdescent.Adam`` is stepped on every rank of the
job: the whole ``step()`` is timed between barriers (the slowest rank counts),
then its three phases separately (reduce-scatter, the Adam kernel on the rank's
shard, all-gather), each started after a barrier so that no rank's wait for
another is billed to a phase. Reduce-scatter is timed in both orders
(``reduce_order="rank"``: all-to-all plus a local sum in rank order;
``"mpi"``: ``MPI_Reduce_scatter_block``). Rank 0 also times a plain one-process
``fastdescent.Adam(flat=True)`` step on the same elements with every thread.
Each rank uses its share of the machine's cores (``--threads`` to override).
For scale, "copy" is one ``np.copyto`` of the whole gradient arena, every rank at
once: what moving the model once through memory costs on this machine.
"""

import argparse
import json
import os
import time

import numpy as np
from mpi4py import MPI

import fastdescent as fd
from fastdescent.distributed import ShardedOptimizer

ARRAYS = 10


def threads_per_rank(comm):
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    share = max(1, len(os.sched_getaffinity(0)) // local.Get_size())
    local.Free()
    return share


def timed(comm, fn):
    """Seconds of ``fn()`` on the slowest rank, started together after a barrier."""
    comm.Barrier()
    start = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


def model(total, seed):
    sizes = [total // ARRAYS + (1 if k < total % ARRAYS else 0) for k in range(ARRAYS)]
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


def measure(comm, total, repeat, reduce_order):
    opt = ShardedOptimizer(model(total, 0), fd.Adam, comm, lr=1e-3, reduce_order=reduce_order)
    for view, g in zip(opt.grads, model(total, 1 + comm.Get_rank())):
        view[...] = g
    opt.step()  # allocates the state
    buckets = range(len(opt.shard_ranges()))
    grads = list(opt._shard_grad_views)
    scale = 1.0 / comm.Get_size()
    samples = {"step": [], "reduce_scatter": [], "kernel": [], "all_gather": [], "copy": []}
    arena = opt._grad_arenas[0]
    target = np.empty_like(arena)
    for _ in range(repeat):
        samples["copy"].append(timed(comm, lambda: np.copyto(target, arena)))  # every rank at once
        samples["step"].append(timed(comm, opt.step))
        samples["reduce_scatter"].append(timed(comm, lambda: [opt._reduce_scatter(k) for k in buckets]))
        samples["kernel"].append(timed(comm, lambda: opt.shard_optimizer.step(grads, grad_scale=scale)))
        samples["all_gather"].append(timed(comm, lambda: [opt._all_gather(k) for k in buckets]))
    state = comm.gather(opt.state_bytes(), root=0)
    return {name: float(np.median(v)) for name, v in samples.items()} | {
        "spread": {name: [float(min(v)), float(max(v))] for name, v in samples.items()},
        "state_bytes_per_rank": state,
    }


def one_process(total, repeat):
    params = model(total, 0)
    opt = fd.Adam(params, lr=1e-3, flat=True)
    for view, g in zip(opt.grads, model(total, 1)):
        view[...] = g
    opt.step()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - start)
    return {"step": float(np.median(seconds)), "spread": [min(seconds), max(seconds)],
            "state_bytes": 2 * 4 * total, "threads": fd.get_num_threads()}


def run(args):
    comm = MPI.COMM_WORLD
    n_ranks = comm.Get_size()
    fd.set_num_threads(args.threads or threads_per_rank(comm))
    result = {"ranks": n_ranks, "threads_per_rank": fd.get_num_threads(), "cores": os.cpu_count(),
              "load_before": os.getloadavg(), "sizes": {}}
    for total in (int(float(e)) for e in args.elements):
        entry = {order: measure(comm, total, args.repeat, order) for order in ("rank", "mpi")}
        if comm.Get_rank() == 0 and n_ranks == 1:
            with fd.num_threads(None):
                entry["one_process"] = one_process(total, args.repeat)
        result["sizes"][str(total)] = entry
        if comm.Get_rank() == 0:
            print(f"{n_ranks} ranks, {total:.0e} elements: " + json.dumps(entry["rank"]), flush=True)
    result["load_after"] = os.getloadavg()
    if comm.Get_rank() == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def table(paths):
    runs = sorted((json.load(open(p)) for p in paths), key=lambda r: r["ranks"])
    print("| elements | ranks x threads | step (ms) | reduce-scatter rank order / MPI (ms) | Adam kernel on "
          "the shard (ms) | all-gather (ms) | copy of the arena (ms) | Adam state per rank (MB) | "
          "load avg before/after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in runs[0]["sizes"]:
        for r in runs:
            rank, mpi = r["sizes"][size]["rank"], r["sizes"][size]["mpi"]
            spread = rank["spread"]["step"]
            print(f"| {float(size):.0e} | {r['ranks']} x {r['threads_per_rank']} | {1e3 * rank['step']:.1f} "
                  f"({1e3 * spread[0]:.1f}-{1e3 * spread[1]:.1f}) | {1e3 * rank['reduce_scatter']:.1f} / "
                  f"{1e3 * mpi['reduce_scatter']:.1f} | {1e3 * rank['kernel']:.1f} | {1e3 * rank['all_gather']:.1f} | "
                  f"{_ms(rank.get('copy'))} | {max(rank['state_bytes_per_rank']) / 1e6:.0f} | {r['load_before'][0]:.1f} / "
                  f"{r['load_after'][0]:.1f} |")
            if "one_process" in r["sizes"][size]:
                one = r["sizes"][size]["one_process"]
                print(f"| {float(size):.0e} | plain fd.Adam, 1 x {one['threads']} | {1e3 * one['step']:.1f} "
                      f"({1e3 * one['spread'][0]:.1f}-{1e3 * one['spread'][1]:.1f}) | - | {1e3 * one['step']:.1f} | - "
                      f"| - | {one['state_bytes'] / 1e6:.0f} | |")


def _ms(seconds):
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time ShardedOptimizer steps, their phases and the state per rank "
                                                 "(run under mpiexec)")
    parser.add_argument("--elements", nargs="+", default=["1e7", "1e8"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / local ranks)")
    parser.add_argument("--json", help="write rank 0's results here")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print a table of saved runs and exit")
    args = parser.parse_args(argv)
    if args.table:
        table(args.table)
    else:
        run(args)


if __name__ == "__main__":
    main()
