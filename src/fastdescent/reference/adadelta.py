"""Reference Adadelta: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``adadelta`` in
src/kernels/adadelta.pxi, and the same operations in the same order, so both
backends agree bit for bit.
"""

import numpy as np

from ._adaptive import average_square_, scaled_grad


def adadelta(params, grads, square_avg, acc_delta, *, lr, rho, eps, weight_decay, grad_scale, n_threads=None):
    for p, g, s, a in zip(params, grads, square_avg, acc_delta):
        d = scaled_grad(g, p, grad_scale, weight_decay)
        average_square_(s, d, rho, 1.0 - rho)
        delta = np.sqrt(a + eps) / np.sqrt(s + eps) * d
        average_square_(a, delta, rho, 1.0 - rho)
        p -= lr * delta
