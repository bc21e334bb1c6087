"""Reference Rprop: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``rprop`` in src/kernels/rprop.pxi,
and the same operations in the same order, so both backends agree bit for bit.
"""

import numpy as np


def rprop(params, grads, prev, step_size, *, etaminus, etaplus, step_size_min, step_size_max, grad_scale,
          n_threads=None):
    for p, g, last, size in zip(params, grads, prev, step_size):
        scalar = p.dtype.type  # the kernel's scalars, rounded to the array dtype once
        up, down, one, zero = scalar(etaplus), scalar(etaminus), scalar(1.0), scalar(0.0)
        lo, hi = scalar(step_size_min), scalar(step_size_max)
        d = grad_scale * g
        product = d * last
        s = size * np.where(product > zero, up, np.where(product < zero, down, one))
        s = np.where(s < lo, lo, s)
        s = np.where(s > hi, hi, s)
        size[...] = s
        d = np.where(product < zero, zero, d)
        last[...] = d
        p -= np.where(d > zero, s, np.where(d < zero, -s, zero))
