"""Reference gradient accumulation: NumPy, the same operations in the same order.

Same signatures and in-place contract as the kernels ``accumulate`` and
``step_accumulated`` in src/kernels/accumulate.pxi (a Python float is rounded to
the array dtype before use, as the kernel casts its double scalars).
"""


def accumulate(accumulated, grads, *, grad_scale, first, n_threads=None):
    for acc, g in zip(accumulated, grads):
        if first:
            acc[...] = grad_scale * g
        else:
            acc[...] = acc + grad_scale * g


def step_accumulated(step, params, grads, accumulated, *, grad_scale, n_threads=None):
    if len(accumulated) != len(grads):
        raise ValueError(f"{len(accumulated)} accumulators for {len(grads)} gradients")
    sums = []
    for acc, g in zip(accumulated, grads):
        sums.append(acc + grad_scale * g)
        acc[...] = 0
    step(params, sums)
