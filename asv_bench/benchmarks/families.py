"""Kernel families beyond the update rules: the global gradient norm (the extra
read that clipping by norm and the non-finite guard cost) and weight averaging
(EMA, SWA, and the in-place swap used for evaluation). A build without one of
them skips its benchmarks."""

import numpy as np

from .common import (
    PROFILE,
    THREADS,
    Case,
    CaseBenchmark,
    bench_cases,
    fastdescent_attribute,
    stream_ceiling,
    torch_or_skip,
    with_bandwidth_tracks,
)

BACKENDS = ["kernel", "reference", "torch-forloop", "torch-foreach"]


def _random(n, dtype, seed, positive=False):
    a = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    return np.abs(a) + 0.01 if positive else a


def _check_threads(backend, threads):
    if backend == "reference" and threads != 1:
        raise NotImplementedError("the reference is single-threaded")


def _with_torch_threads(case, threads):
    torch = torch_or_skip()
    case.enter(bench_cases().torch_threads(torch, threads))
    return torch


@with_bandwidth_tracks
class GradNorm(CaseBenchmark):
    """``fastdescent.global_norm`` of one gradient array (one read per element),
    against ``torch.nn.utils.get_total_norm``."""

    params = [PROFILE["sizes"], PROFILE["dtypes"], THREADS, BACKENDS]
    param_names = ["size", "dtype", "threads", "backend"]

    def prepare(self, size, dtype, threads, backend):
        global_norm = fastdescent_attribute("global_norm")
        _check_threads(backend, threads)
        grad = _random(size, dtype, seed=1)
        case = Case(None, grad.nbytes, stream_ceiling([], [grad], threads))
        if backend in ("kernel", "reference"):
            case.step = lambda: global_norm(grad, n_threads=threads, backend=backend)
        else:
            torch = _with_torch_threads(case, threads)
            tensors = [torch.from_numpy(grad)]
            foreach = backend == "torch-foreach"
            case.step = lambda: torch.nn.utils.get_total_norm(tensors, foreach=foreach)
        case.step()
        return case

    def time_norm(self, *params):
        self.case.step()


@with_bandwidth_tracks
class Averaging(CaseBenchmark):
    """One update of a weight average over one array: EMA and SWA read the
    parameter and the average and write the average; swap reads and writes both.
    torch's peers are what ``torch.optim.swa_utils`` uses (``lerp_``, for-loop
    and foreach); torch has no swap."""

    params = [["ema", "swa", "swap"], PROFILE["sizes"], PROFILE["dtypes"], THREADS, BACKENDS]
    param_names = ["kind", "size", "dtype", "threads", "backend"]

    def prepare(self, kind, size, dtype, threads, backend):
        update = fastdescent_attribute({"ema": "ema_update", "swa": "swa_update", "swap": "swap_arrays"}[kind])
        _check_threads(backend, threads)
        average, param = _random(size, dtype, seed=2), _random(size, dtype, seed=3)
        written = [average, param] if kind == "swap" else [average]
        read_only = [] if kind == "swap" else [param]
        nbytes = average.nbytes * (len(written) + 2)
        case = Case(None, nbytes, stream_ceiling(written, read_only, threads))
        if backend in ("kernel", "reference"):
            options = {"ema": {"decay": 0.999}, "swa": {"n_averaged": 5}, "swap": {}}[kind]
            case.step = lambda: update([average], [param], **options, n_threads=threads, backend=backend)
        elif kind == "swap":
            raise NotImplementedError("torch has no in-place swap")
        else:
            torch = _with_torch_threads(case, threads)
            averages, params = [torch.from_numpy(average)], [torch.from_numpy(param)]
            weight = 1 - 0.999 if kind == "ema" else 1 / 6
            if backend == "torch-foreach":
                case.step = lambda: torch._foreach_lerp_(averages, params, weight)
            else:
                case.step = lambda: [a.lerp_(p, weight) for a, p in zip(averages, params)]
        case.step()
        return case

    def time_update(self, *params):
        self.case.step()
