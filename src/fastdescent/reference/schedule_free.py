"""Reference Schedule-Free AdamW and SGD: NumPy, straight from the equations.

Same signatures and in-place contract as the kernels in src/kernels/schedule_free.pxi,
and the same operations in the same order, so both backends agree bit for bit.
"""

import numpy as np

from ._adaptive import average_square_, scaled_grad


def _interpolate(p, x, z, beta):
    """The parameter gets y = beta*x + (1 - beta)*z."""
    p[...] = x * beta + (1.0 - beta) * z


def _average_and_interpolate(p, z, x, ckp1, beta):
    """x = (1 - ckp1)*x + ckp1*z, then the parameter gets y."""
    x[...] = x * (1.0 - ckp1) + ckp1 * z
    _interpolate(p, x, z, beta)


def schedule_free_adamw(params, grads, z, exp_avg_sq, x, *, lr, weight_decay, decay_at_z, beta1, beta2,
                        bias_correction2, eps, ckp1, grad_scale, n_threads=None):
    for p, g, zz, v, xx in zip(params, grads, z, exp_avg_sq, x):
        d = grad_scale * g
        if weight_decay != 0.0:
            zz -= (lr * weight_decay) * (zz if decay_at_z else p)
        average_square_(v, d, beta2, 1.0 - beta2)
        zz -= (lr * d) / (np.sqrt(v / bias_correction2) + eps)
        _average_and_interpolate(p, zz, xx, ckp1, beta1)


def schedule_free_sgd(params, grads, z, x, *, lr, weight_decay, momentum, ckp1, grad_scale, n_threads=None):
    for p, g, zz, xx in zip(params, grads, z, x):
        zz -= lr * scaled_grad(g, p, grad_scale, weight_decay)
        _average_and_interpolate(p, zz, xx, ckp1, momentum)


def schedule_free_y(params, x, z, *, beta, n_threads=None):
    for p, xx, zz in zip(params, x, z):
        _interpolate(p, xx, zz, beta)
