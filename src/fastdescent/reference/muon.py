"""Reference Muon passes: NumPy, straight from the equations.

Same signatures and in-place contracts as the kernels ``muon_momentum`` and ``muon``
in src/kernels/muon.pxi, and the same operations in the same order, so both
backends agree bit for bit. The Newton-Schulz iteration between them is shared by
both backends (fastdescent.rules.muon.orthogonalize).
"""

from ._adaptive import lerp_toward_


def _lerp(start, end, weight):
    """``torch.lerp(start, end, weight)``, as the kernel's ``lerp``."""
    diff = end - start
    if weight < 0.5:
        return start + weight * diff
    return end - (1.0 - weight) * diff


def muon_momentum(grads, momentum_buffer, updates=None, *, momentum, grad_scale, n_threads=None):
    for i, (g, buf) in enumerate(zip(grads, momentum_buffer)):
        d = grad_scale * g
        lerp_toward_(buf, d, momentum)
        if updates is not None:
            updates[i][...] = _lerp(d, buf, momentum)


def muon(params, orthogonalized, *, lr, param_decay, n_threads=None):
    for p, o in zip(params, orthogonalized):
        p *= param_decay
        p -= lr * o
