"""Reference RAdam: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``radam`` in src/kernels/radam.pxi,
and the same operations in the same order, so both backends agree bit for bit.
"""

import numpy as np

from ._adaptive import adam_moments_


def radam(params, grads, exp_avg, exp_avg_sq, *, lr, step_size, rectified, beta1, beta2, eps, weight_decay,
          decoupled, grad_scale, n_threads=None):
    decoupled = decoupled and weight_decay != 0.0
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        adam_moments_(p, g, m, v, lr=lr, weight_decay=weight_decay, decoupled=decoupled, beta1=beta1, beta2=beta2,
                      grad_scale=grad_scale)
        if rectified:
            p -= (step_size * m) / (np.sqrt(v) + eps)
        else:
            p -= step_size * m
