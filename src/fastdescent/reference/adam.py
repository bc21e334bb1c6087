"""Reference Adam / AdamW: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``adam`` in src/kernels/adam.pxi,
and the same operations in the same order, so both backends agree bit for bit.
"""

import numpy as np

from ._adaptive import adam_moments_


def adam(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, step_size,
         inv_bias_correction2_sqrt, beta1, beta2, eps, weight_decay, decoupled, grad_scale,
         n_threads=None):
    decoupled = decoupled and weight_decay != 0.0
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq)):
        adam_moments_(p, g, m, v, lr=lr, weight_decay=weight_decay, decoupled=decoupled, beta1=beta1, beta2=beta2,
                      grad_scale=grad_scale)
        if max_exp_avg_sq is not None:
            v_max = max_exp_avg_sq[i]
            # The kernel's max: the old maximum unless the new average is larger.
            v_max[...] = np.where(v_max > v, v_max, v)
            v = v_max
        p -= (step_size * m) / (np.sqrt(v) * inv_bias_correction2_sqrt + eps)
