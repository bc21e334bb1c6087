"""
Data-parallel training with Adam's state sharded across MPI ranks
=================================================================

The demo MLP trained data-parallel with ``fastdescent.distributed`` (not run when
the documentation is built: it needs ``mpiexec``)::

    pip install '.[demo,distributed]'
    mpiexec -n 2 python examples/distributed_mlp.py          # or -n 1, -n 4, ...

Every rank holds the whole model (``fastdescent.demo.mlp.MLP``) and, of each global
batch of scikit-learn's handwritten digits, trains on its own slice; a
``fastdescent.distributed.ShardedOptimizer`` over ``fastdescent.Adam`` averages
the gradients across ranks and keeps on each rank the Adam moments of 1/N of the
parameters (ZeRO stage 1). The script prints each rank's optimizer-state memory
and step time, then trains the same model in one process (plain
``fastdescent.Adam``, whole batches, same order) and compares the accuracies.
"""

import argparse
import os
import time

import numpy as np
from mpi4py import MPI

import fastdescent as fd
from fastdescent.demo.data import MiniBatches
from fastdescent.demo.mlp import MLP
from fastdescent.distributed import ShardedOptimizer


def digits(seed):
    """scikit-learn's 8x8 digits (pixels in [0, 1]), split 75/25 stratified, as the demo does."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    return train_test_split((data.data / 16.0).astype(np.float32), data.target, test_size=0.25,
                            stratify=data.target, random_state=seed)


def threads_per_rank(comm):
    """This machine's cores shared among the ranks running on it."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, cores // local.Get_size())
    local.Free()
    return share


def train(model, optimizer, batches, epochs, rank, n_ranks):
    """Epochs of data-parallel steps: this rank takes every n_ranks-th sample of each batch."""
    step_seconds = []
    for _ in range(epochs):
        for xb, yb in batches:
            model.loss_and_gradients(xb[rank::n_ranks], yb[rank::n_ranks])  # into the optimizer's gradient views
            start = time.perf_counter()
            optimizer.step()
            step_seconds.append(time.perf_counter() - start)
    return step_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description="Data-parallel training of the demo MLP with sharded Adam state "
                                                 "(run under mpiexec)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split among the ranks")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], help="hidden widths (demo: 128)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compare", action="store_true", help="skip the single-process run")
    args = parser.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, n_ranks = comm.Get_rank(), comm.Get_size()
    if args.batch_size % n_ranks:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the {n_ranks} ranks")
    fd.set_num_threads(threads_per_rank(comm))
    x_train, x_test, y_train, y_test = digits(args.seed)
    sizes = [x_train.shape[1], *args.hidden, 10]

    model = MLP(sizes, activation="relu", dtype=np.float32, seed=args.seed)
    optimizer = ShardedOptimizer(model.params, fd.Adam, comm, lr=args.lr)
    model.params, model.grads = optimizer.params, optimizer.grads  # the model works in the optimizer's arenas
    batches = MiniBatches(x_train, y_train, batch_size=args.batch_size, drop_last=True, seed=args.seed)
    step_seconds = train(model, optimizer, batches, args.epochs, rank, n_ranks)

    rows = comm.gather((rank, optimizer.state_bytes(), sum(b - a for _, _, a, b, _ in optimizer.shard_ranges()),
                        1e3 * float(np.median(step_seconds))), root=0)
    accuracy = model.accuracy(x_test, y_test)
    if rank == 0:
        one_process_state = 2 * 4 * model.n_parameters  # Adam: exp_avg and exp_avg_sq, float32
        print(f"MLP {'-'.join(map(str, sizes))} ({model.n_parameters:,} float32 parameters) on scikit-learn's digits; "
              f"Adam, {n_ranks} rank(s) x {fd.get_num_threads()} thread(s), global batch {args.batch_size} "
              f"({args.batch_size // n_ranks} per rank), {args.epochs} epochs of {len(batches)} steps")
        print(f"{'rank':>4}  {'Adam state bytes':>16}  {'share':>6}  {'owned params':>12}  {'median step':>11}")
        for r, state, owned, ms in rows:
            print(f"{r:>4}  {state:>16,}  {state / one_process_state:>6.1%}  {owned:>12,}  {ms:>8.3f} ms")
        print(f"held-out accuracy, {n_ranks} rank(s): {accuracy:.4f}")
    if rank == 0 and not args.no_compare:
        single = MLP(sizes, activation="relu", dtype=np.float32, seed=args.seed)
        plain = fd.Adam(single.params, lr=args.lr, flat=True)
        single.params, single.grads = plain.params, plain.grads
        batches = MiniBatches(x_train, y_train, batch_size=args.batch_size, drop_last=True, seed=args.seed)
        seconds = train(single, plain, batches, args.epochs, 0, 1)
        difference = max(float(np.max(np.abs(a - b))) for a, b in zip(model.params, single.params))
        print(f"held-out accuracy, one process (plain fd.Adam, whole batches): {single.accuracy(x_test, y_test):.4f}; "
              f"median step {1e3 * float(np.median(seconds)):.3f} ms; Adam state {2 * 4 * single.n_parameters:,} bytes; "
              f"largest parameter difference {difference:.2g} (gradients averaged in another order)")


if __name__ == "__main__":
    main()
