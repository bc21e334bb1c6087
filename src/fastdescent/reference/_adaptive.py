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


def adam_moments_(p, g, m, v, *, lr, weight_decay, decoupled, beta1, beta2, grad_scale):
    """The first half of an Adam step (Adam, NAdam, RAdam), in place: ``p`` decayed
    if ``decoupled`` (AdamW's decay; else it is added to the gradient), the first
    moment ``m`` moved toward the gradient ``d``, the second moment ``v`` averaged
    with its square. Returns ``d``."""
    if decoupled:
        p *= 1.0 - lr * weight_decay
    d = scaled_grad(g, p, grad_scale, 0.0 if decoupled else weight_decay)
    lerp_toward_(m, d, beta1)
    average_square_(v, d, beta2, 1.0 - beta2)
    return d
