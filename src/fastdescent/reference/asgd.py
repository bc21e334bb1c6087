"""Reference ASGD: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``asgd`` in src/kernels/asgd.pxi,
and the same operations in the same order, so both backends agree bit for bit.
"""

from ._adaptive import scaled_grad


def asgd(params, grads, ax, *, eta, param_decay, mu, weight_decay, grad_scale, n_threads=None):
    for p, g, average in zip(params, grads, ax):
        d = scaled_grad(g, p, grad_scale, weight_decay)
        p *= param_decay
        p -= eta * d
        if mu != 1.0:
            average += (p - average) * mu
        else:
            average[...] = p
