"""Rprop: resilient backpropagation, sign-based steps with per-element step sizes."""

import math
from dataclasses import replace

from .. import _checks
from . import _hyper
from ._spec import Buffer, Example, Hyper, RuleSpec


def _real_pair(name, value):
    try:
        first, second = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of floats, got {value!r}") from None
    return _checks.real(f"{name}[0]", first), _checks.real(f"{name}[1]", second)


def etas_pair(name, value):
    """``(etaminus, etaplus)`` as Python floats, with 0 < etaminus < 1 < etaplus (as PyTorch)."""
    etaminus, etaplus = _real_pair(name, value)
    if not 0.0 < etaminus < 1.0 < etaplus < math.inf:
        raise ValueError(f"{name} must be (etaminus, etaplus) with 0 < etaminus < 1 < etaplus, got {value!r}")
    return etaminus, etaplus


def step_size_bounds(name, value):
    """``(smallest, largest)`` step size as Python floats, with 0 <= smallest <= largest < inf."""
    smallest, largest = _real_pair(name, value)
    if not 0.0 <= smallest <= largest < math.inf:
        raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, both finite, got {value!r}")
    return smallest, largest


def rprop_scalars(h, *, step, grad_scale, fresh):
    etaminus, etaplus = h["etas"]
    step_size_min, step_size_max = h["step_sizes"]
    return dict(etaminus=etaminus, etaplus=etaplus, step_size_min=step_size_min, step_size_max=step_size_max,
                grad_scale=_hyper.signed_grad_scale(h, grad_scale))


RPROP = RuleSpec(
    name="rprop",
    year=1993,
    title="Rprop",
    summary="Rprop: sign-based steps with per-element step sizes (Riedmiller & Braun 1993)",
    doc=r"""One in-place Rprop step on one array or a list of arrays (Riedmiller & Braun 1993).

    Resilient backpropagation ignores the gradient's magnitude: each element moves by
    its own step size :math:`\delta` against the gradient's sign, and the step size
    grows while the sign holds and shrinks when it flips. With gradient :math:`g_t`
    (times ``grad_scale``, negated if ``maximize``) and :math:`p_{t-1}` the gradient
    kept by the previous step (``prevs``, zero at the start):

    .. math::
       f_t = \begin{cases} \eta_+ & g_t\, p_{t-1} > 0 \\ \eta_- & g_t\, p_{t-1} < 0 \\
             1 & \text{otherwise} \end{cases}, \qquad
       \delta_t = \min(\max(\delta_{t-1} f_t,\ \delta_{\min}),\ \delta_{\max}),

    .. math::
       p_t = \begin{cases} 0 & g_t\, p_{t-1} < 0 \\ g_t & \text{otherwise} \end{cases},
       \qquad \theta_t = \theta_{t-1} - \delta_t\, \mathrm{sign}(p_t).

    This is ``torch.optim.Rprop``, operation for operation (the product
    :math:`g_t p_{t-1}` and the step sizes in the array's dtype, the factors and
    bounds rounded to it), so the two agree bit for bit. The step sizes start at
    ``lr`` (filled by the optimizers; a face caller fills ``element_step_sizes``), and
    the learning rate plays no other part: changing it later, or scheduling it,
    changes nothing, as in PyTorch. The product and its sign are those of the
    dtype: a product that underflows to zero counts as no sign information, and a
    zero gradient (of either sign) neither moves the element nor changes its step
    size; the gradient is kept as it is, sign of zero included, except where the
    sign flipped, where +0 is kept.

    Conventions differ between the variants, and so between libraries: this is
    PyTorch's, the one without weight backtracking that Igel & Hüsken (2000) call
    iRprop-. Riedmiller & Braun's original (Rprop+) also undoes the previous step of
    an element whose gradient changed sign, and iRprop+ does so only when the loss
    rose (it needs the loss). Rprop is meant for full-batch gradients: minibatch
    noise flips signs at random.
""",
    hyper=(
        replace(_hyper.lr(1e-2), face=False,
                doc="The step size every element starts with (the optimizers' only: a face caller fills the buffer)."),
        Hyper("etas", (0.5, 1.2), etas_pair,
              r"(etaminus, etaplus): the factors :math:`0 < \eta_- < 1 < \eta_+` that shrink and grow a step size.",
              type="(float, float)"),
        Hyper("step_sizes", (1e-6, 50), step_size_bounds,
              r"(min, max): the bounds :math:`0 \le \delta_{\min} \le \delta_{\max}` of every step size.",
              type="(float, float)"),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("prev", doc="the gradient the last step kept (zero where its sign flipped)"),
        Buffer("step_size", argument="element_step_sizes", fill=lambda h: h["lr"], sample="positive",
               doc=r"each element's step size :math:`\delta`"),
    ),
    scalars=rprop_scalars,
    uses_step=False,
    torch="Rprop",
    examples=(
        Example("rprop", {}, "Rprop", bench=True),
        Example("rprop-maximize-etas", dict(lr=0.05, etas=(0.3, 1.5), maximize=True)),
        Example("rprop-clamped", dict(lr=0.1, etas=(0.6, 1.4), step_sizes=(0.05, 0.12)),
                "Rprop whose step sizes meet both bounds"),
    ),
)
