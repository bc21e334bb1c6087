"""What a gapped parameter costs fastdescent.torch, and why it gathers into a scratch block.

One float32 Adam step on 2**19 elements, 1 thread, milliseconds (medians and
quartiles of interleaved rounds):

* dense: a contiguous 1024 x 512 parameter, stepped in place (the floor);
* gather/scatter: the same number of elements as a gapped view, ``W[:, ::2]`` of a
  1024 x 1024 matrix (runs of 1 element) and ``W[:, :512]`` (runs of 512), as
  ``fastdescent.torch.Adam`` steps them: copied into a scratch block, stepped,
  copied back;
* runs as tensors: the alternative without copies for ``W[:, :512]``, each
  contiguous run handed to the multi-tensor kernel as a tensor of its own (the
  kernel called directly on the 1,024 row views); for ``W[:, ::2]`` that would be
  524,288 tensors of one element;
* torch for-loop: ``torch.optim.Adam(foreach=False)`` on the same gapped views.

Run: ``PYTHONPATH=src python benchmarks/torch_gapped.py``.
"""

import statistics
import time

import torch

import fastdescent as fd
import fastdescent.torch as fdt
from fastdescent._config import resolve_backend
from fastdescent.rules.adam import adam_arguments

ROUNDS = 30


def with_grad(p, generator):
    p.grad = torch.randn(p.shape, generator=generator)
    return p


def contenders(generator):
    def param(make):
        return with_grad(torch.nn.Parameter(make()), generator)

    dense = param(lambda: torch.randn(1024, 512, generator=generator))
    every_other = param(lambda: torch.randn(1024, 1024, generator=generator)[:, ::2])
    half_rows = param(lambda: torch.randn(1024, 1024, generator=generator)[:, :512])
    steps = {
        "dense, in place": fdt.Adam([dense]).step,
        "W[:, ::2], gather/scatter": fdt.Adam([every_other]).step,
        "W[:, :512], gather/scatter": fdt.Adam([half_rows]).step,
        "W[:, :512], runs as tensors": runs_as_tensors(half_rows),
        "W[:, ::2], torch for-loop": torch.optim.Adam(
            [param(lambda: torch.randn(1024, 1024, generator=generator)[:, ::2])], foreach=False).step,
        "W[:, :512], torch for-loop": torch.optim.Adam(
            [param(lambda: torch.randn(1024, 1024, generator=generator)[:, :512])], foreach=False).step,
    }
    return steps


def runs_as_tensors(p):
    """The kernel on each row of ``p`` (a view whose rows are contiguous)."""
    rows = [r.detach().numpy() for r in p.detach()]
    grads = [r.numpy() for r in p.grad]
    exp_avgs = [r.numpy() for r in torch.zeros(p.shape)]
    exp_avg_sqs = [r.numpy() for r in torch.zeros(p.shape)]
    kernel = resolve_backend(None).adam
    count = [0]

    def step():
        count[0] += 1
        arguments = adam_arguments(step=count[0], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                   decoupled=False, maximize=False, bias_correction=True, grad_scale=1.0)
        kernel(rows, grads, exp_avgs, exp_avg_sqs, None, **arguments, n_threads=1)
    return step


def main():
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    steps = contenders(generator)
    samples = {name: [] for name in steps}
    with fd.num_threads(1):
        for step in steps.values():
            step()
        for _ in range(ROUNDS):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                samples[name].append(time.perf_counter() - start)
    floor = statistics.median(samples["dense, in place"])
    print(f"{'2**19 float32 elements, Adam, 1 thread':<32} {'ms':>7} {'q1-q3':>13} {'x dense':>8}")
    for name, times in samples.items():
        q1, median, q3 = statistics.quantiles(times, n=4)
        print(f"{name:<32} {median * 1e3:>7.2f} {q1 * 1e3:>6.2f}-{q3 * 1e3:<6.2f} {median / floor:>7.2f}x")


if __name__ == "__main__":
    main()
