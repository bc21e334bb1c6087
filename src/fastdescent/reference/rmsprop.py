"""Reference RMSprop: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``rmsprop`` in
src/kernels/rmsprop.pxi, and the same operations in the same order, so both
backends agree bit for bit.
"""

import numpy as np

from ._adaptive import average_square_, lerp_toward_, scaled_grad


def rmsprop(params, grads, square_avg, momentum_buffer=None, grad_avg=None, *, lr, alpha, eps,
            weight_decay, momentum, grad_scale, n_threads=None):
    for i, (p, g, sq) in enumerate(zip(params, grads, square_avg)):
        d = scaled_grad(g, p, grad_scale, weight_decay)
        average_square_(sq, d, alpha, 1.0 - alpha)
        if grad_avg is None:
            denom = np.sqrt(sq) + eps
        else:
            avg = grad_avg[i]
            lerp_toward_(avg, d, alpha)
            denom = np.sqrt(sq - avg * avg) + eps
        if momentum_buffer is None:
            p -= (lr * d) / denom
        else:
            buf = momentum_buffer[i]
            buf[...] = momentum * buf + d / denom
            p -= lr * buf
