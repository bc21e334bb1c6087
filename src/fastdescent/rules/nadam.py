"""NAdam: Adam with Nesterov momentum and a momentum schedule; NAdamW with
decoupled weight decay."""

import numpy as np

from . import _hyper
from ._spec import Buffer, Example, Hyper, RuleSpec, ScalarState
from .. import _checks


def momentum_at(h, step):
    r"""The scheduled momentum :math:`\mu_t = \beta_1 (1 - \frac12 0.96^{t\psi})` of step ``step``."""
    return h["betas"][0] * (1.0 - 0.5 * (0.96 ** (step * h["momentum_decay"])))


def times_momentum(mu_product, mu):
    """``mu_product * mu`` as PyTorch computes it on its ``mu_product`` tensor: both
    rounded to float32 and multiplied in float32, or in float64 if that tensor is
    float64 (torch's default dtype float64, or a float64 model's loaded state dict);
    the torch adapter then passes a ``numpy.float64``."""
    dtype = np.float64 if isinstance(mu_product, np.float64) else np.float32
    return float(dtype(mu_product) * dtype(mu))


def nadam_scalars(h, *, step, grad_scale, fresh, scalar_state):
    """The coefficients of step ``step`` from the momentum schedule and the product
    of the momenta, in double precision as PyTorch computes them."""
    beta1, beta2 = h["betas"]
    lr = h["lr"]
    mu, mu_next = momentum_at(h, step), momentum_at(h, step + 1)
    mu_product = times_momentum(scalar_state["mu_product"], mu)
    mu_product_next = mu_product * mu_next
    return dict(lr=lr, grad_coefficient=-lr * (1.0 - mu) / (1.0 - mu_product),
                mean_coefficient=(-lr * mu_next) / (1.0 - mu_product_next), bias_correction2=1.0 - beta2**step,
                beta1=beta1, beta2=beta2, eps=h["eps"], weight_decay=h["weight_decay"],
                decoupled=h["decoupled_weight_decay"], grad_scale=_hyper.signed_grad_scale(h, grad_scale))


def nadam_advance(h, step, scalar_state):
    """``mu_product`` after step ``step``."""
    return {"mu_product": times_momentum(scalar_state["mu_product"], momentum_at(h, step))}


NADAM = RuleSpec(
    name="nadam",
    year=2016,
    title="NAdam",
    summary="NAdam: Adam with Nesterov momentum (Dozat 2016); NAdamW with decoupled weight decay",
    doc=r"""One in-place NAdam step on one array or a list of arrays (Dozat 2016).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in ("coupled"), :math:`d_t = g_t + \lambda \theta_{t-1}`,
    a momentum that grows from :math:`\beta_1/2` toward :math:`\beta_1` on a
    schedule set by ``momentum_decay`` :math:`\psi`,

    .. math::
       \mu_t = \beta_1 \left(1 - \tfrac12\, 0.96^{t \psi}\right), \qquad
       \Pi_t = \prod_{i=1}^{t} \mu_i = \Pi_{t-1} \mu_t

    (:math:`\Pi_t` is kept in the state as ``mu_product``), and Adam's averages

    .. math::
       m_t = \beta_1 m_{t-1} + (1 - \beta_1) d_t, \qquad
       v_t = \beta_2 v_{t-1} + (1 - \beta_2) d_t^2, \qquad
       \sigma_t = \sqrt{v_t / (1 - \beta_2^t)} + \epsilon,

    the step looks ahead with the next momentum (Nesterov):

    .. math::
       \theta_t = \theta_{t-1} - \eta\, \frac{1 - \mu_t}{1 - \Pi_t} \cdot \frac{d_t}{\sigma_t}
       - \eta\, \frac{\mu_{t+1}}{1 - \Pi_t\, \mu_{t+1}} \cdot \frac{m_t}{\sigma_t} .

    With ``decoupled_weight_decay=True`` (NAdamW) the parameter decays first,
    :math:`\theta' = (1 - \eta\lambda)\,\theta_{t-1}`, outside the adaptive
    scaling, and :math:`d_t = g_t`.

    This is ``torch.optim.NAdam`` operation for operation: :math:`m_t` as
    ``torch.lerp``, the two terms added to the parameter one after the other, the
    coefficients computed once per call in double precision, and
    :math:`\Pi_t` multiplied in float32 at every step as PyTorch's float32
    ``mu_product`` tensor is (``fastdescent.torch.NAdam`` follows the dtype of
    that tensor, float64 where torch keeps it so).

    Conventions differ: Dozat's article and Keras use this momentum schedule
    (with :math:`\psi = 0.004`, every 250 steps); optax's ``nadam`` and other
    libraries use a constant :math:`\mu_t = \beta_1`, which no ``momentum_decay``
    reproduces here (:math:`\psi = 0` gives :math:`\beta_1/2`).
""",
    hyper=(
        _hyper.lr(2e-3),
        _hyper.betas(),
        _hyper.eps(1e-8),
        _hyper.weight_decay(),
        Hyper("momentum_decay", 4e-3, _checks.nonnegative,
              r"Speed :math:`\psi \ge 0` of the momentum schedule :math:`\mu_t`."),
        _hyper.decoupled_weight_decay(),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("exp_avg", doc="first moment :math:`m`"),
        Buffer("exp_avg_sq", sample="positive", doc="second moment :math:`v`"),
    ),
    scalar_state=(
        ScalarState("mu_product", 1.0, r"The product :math:`\Pi_{t-1}` of the momenta of the steps taken."),
    ),
    scalars=nadam_scalars,
    advance=nadam_advance,
    torch="NAdam",
    examples=(
        Example("nadam", {}, "NAdam", bench=True, demo=("adaptive", 2e-3)),
        Example("nadam-wd-maximize", dict(weight_decay=0.05, maximize=True)),
        Example("nadam-decoupled-momentum_decay", dict(weight_decay=0.1, decoupled_weight_decay=True,
                                                       momentum_decay=0.1, betas=(0.5, 0.9), eps=1e-4)),
    ),
)
