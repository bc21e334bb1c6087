"""Reference NAdam / NAdamW: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``nadam`` in src/kernels/nadam.pxi,
and the same operations in the same order, so both backends agree bit for bit.
"""

import numpy as np

from ._adaptive import adam_moments_


def nadam(params, grads, exp_avg, exp_avg_sq, *, lr, grad_coefficient, mean_coefficient, bias_correction2,
          beta1, beta2, eps, weight_decay, decoupled, grad_scale, n_threads=None):
    decoupled = decoupled and weight_decay != 0.0
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        d = adam_moments_(p, g, m, v, lr=lr, weight_decay=weight_decay, decoupled=decoupled, beta1=beta1,
                          beta2=beta2, grad_scale=grad_scale)
        denom = np.sqrt(v / bias_correction2) + eps
        p += (grad_coefficient * d) / denom
        p += (mean_coefficient * m) / denom
