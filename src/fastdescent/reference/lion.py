"""Reference Lion: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``lion`` in src/kernels/lion.pxi,
and the same operations in the same order, so both backends agree bit for bit.
"""

import numpy as np


def lion(params, grads, exp_avg, *, lr, beta1, beta2, weight_decay, grad_scale, n_threads=None):
    for p, g, m in zip(params, grads, exp_avg):
        d = grad_scale * g
        u = np.sign(beta1 * m + (1.0 - beta1) * d)
        if weight_decay != 0.0:
            u = u + weight_decay * p
        p -= lr * u
        m[...] = beta2 * m + (1.0 - beta2) * d
