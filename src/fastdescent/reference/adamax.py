"""Reference Adamax: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``adamax`` in
src/kernels/adamax.pxi, and the same operations in the same order, so both
backends agree bit for bit.
"""

import numpy as np

from ._adaptive import lerp_toward_, scaled_grad


def adamax(params, grads, exp_avg, exp_inf, *, step_size, beta1, beta2, eps, weight_decay, grad_scale,
           n_threads=None):
    for p, g, m, u in zip(params, grads, exp_avg, exp_inf):
        d = scaled_grad(g, p, grad_scale, weight_decay)
        lerp_toward_(m, d, beta1)
        decayed = u * beta2
        bound = np.abs(d) + eps
        # The kernel's max: the decayed norm unless the new bound is larger.
        u[...] = np.where(decayed > bound, decayed, bound)
        p -= (step_size * m) / u
