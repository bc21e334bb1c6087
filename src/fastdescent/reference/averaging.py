"""Reference weight averaging: NumPy, straight from the equations.

Same signatures and in-place contract as the kernels ``swa``, ``ema`` and ``swap``
in src/kernels/averaging.pxi, and the same operations in the same order, so both
backends agree bit for bit (a Python float is rounded to the array dtype before
use, as the kernel casts its double scalars).
"""


def swa(averages, params, *, n_averaged, n_threads=None):
    for avg, p in zip(averages, params):
        if n_averaged == 0:
            avg[...] = p
        else:
            avg += (p - avg) / float(n_averaged + 1)


def ema(averages, params, *, decay, n_threads=None):
    for avg, p in zip(averages, params):
        avg[...] = decay * avg + (1.0 - decay) * p


def swap(first, second, *, n_threads=None):
    for x, y in zip(first, second):
        held = x.copy()
        x[...] = y
        y[...] = held
