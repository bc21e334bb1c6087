"""Reference Adagrad: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``adagrad`` in
src/kernels/adagrad.pxi, and the same operations in the same order, so both
backends agree bit for bit.
"""

import numpy as np

from ._adaptive import scaled_grad


def adagrad(params, grads, sum, *, clr, grad_scale, weight_decay, eps, n_threads=None):
    for p, g, s in zip(params, grads, sum):
        d = scaled_grad(g, p, grad_scale, weight_decay)
        s += d * d
        p -= (clr * d) / (np.sqrt(s) + eps)
