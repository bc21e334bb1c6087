"""NumPy twins of the element-level pieces in src/kernels/_adaptive.pxi.

Scalars are Python floats: NumPy rounds them to the array dtype (NEP 50), as the
kernel casts its doubles once per segment.
"""


def scaled_grad(g, p, grad_scale, weight_decay):
    """The gradient times ``grad_scale`` (negative for maximize), plus coupled L2 decay."""
    d = grad_scale * g
    if weight_decay != 0.0:
        d += weight_decay * p
    return d


def lerp_toward_(average, value, decay):
    """``average = torch.lerp(average, value, 1 - decay)`` in place.

    torch.lerp(a, b, w) is a + w*(b - a) for w < 0.5, else b - (1 - w)*(b - a).
    """
    weight = 1.0 - decay
    diff = value - average
    if weight < 0.5:
        average += weight * diff
    else:
        average[...] = value - (1.0 - weight) * diff


def average_square_(average, d, keep, weight):
    """``average = keep*average + weight*d*d`` in place, in PyTorch's operation order."""
    average[...] = keep * average + (weight * d) * d
