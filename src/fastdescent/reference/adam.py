"""Reference Adam / AdamW: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``adam`` in src/kernels/adam.pxi,
and the same operations in the same order, so both backends agree bit for bit.
"""

import numpy as np

from ._adaptive import average_square_, lerp_toward_, scaled_grad


def adam(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, step_size,
         inv_bias_correction2_sqrt, beta1, beta2, eps, weight_decay, decoupled, grad_scale,
         n_threads=None):
    decoupled = decoupled and weight_decay != 0.0
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq)):
        if decoupled:
            p *= 1.0 - lr * weight_decay
        d = scaled_grad(g, p, grad_scale, 0.0 if decoupled else weight_decay)
        lerp_toward_(m, d, beta1)
        average_square_(v, d, beta2, 1.0 - beta2)
        if max_exp_avg_sq is not None:
            v_max = max_exp_avg_sq[i]
            # The kernel's max: the old maximum unless the new average is larger.
            v_max[...] = np.where(v_max > v, v_max, v)
            v = v_max
        p -= (step_size * m) / (np.sqrt(v) * inv_bias_correction2_sqrt + eps)
