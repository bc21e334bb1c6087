"""RAdam: Adam whose adaptive step is rectified, and switched off while the
variance of the adaptive rate is intractable (the first steps)."""

from . import _hyper
from ._spec import Buffer, Example, RuleSpec

#: rho_t must exceed this for the adaptive (rectified) step, as in PyTorch.
RECTIFY_ABOVE = 5.0


def radam_step(h, step):
    """``(step_size, rectified)`` of step ``step``: whether it is rectified, and its
    step size, in double precision and in PyTorch's order of operations."""
    beta1, beta2 = h["betas"]
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    rectified = rho_t > RECTIFY_ABOVE
    step_size = h["lr"] / bias_correction1
    if rectified:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        step_size = step_size * rect * bias_correction2**0.5
    return step_size, rectified


def radam_scalars(h, *, step, grad_scale, fresh):
    beta1, beta2 = h["betas"]
    step_size, rectified = radam_step(h, step)
    return dict(lr=h["lr"], step_size=step_size, rectified=rectified, beta1=beta1, beta2=beta2, eps=h["eps"],
                weight_decay=h["weight_decay"], decoupled=h["decoupled_weight_decay"],
                grad_scale=_hyper.signed_grad_scale(h, grad_scale))


RADAM = RuleSpec(
    name="radam",
    year=2020,
    title="RAdam",
    summary="RAdam: rectified Adam (Liu et al. 2020)",
    doc=r"""One in-place RAdam step on one array or a list of arrays (Liu et al. 2020).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in ("coupled"), :math:`d_t = g_t + \lambda \theta_{t-1}`,
    and Adam's averages

    .. math::
       m_t = \beta_1 m_{t-1} + (1 - \beta_1) d_t, \qquad
       v_t = \beta_2 v_{t-1} + (1 - \beta_2) d_t^2,

    the length of the approximated simple moving average,

    .. math::
       \rho_\infty = \frac{2}{1 - \beta_2} - 1, \qquad
       \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t},

    decides the step. While :math:`\rho_t \le 5` (at least the first five steps;
    every step if :math:`\beta_2 \le 2/3`) the variance of the adaptive rate is
    intractable and the step is momentum SGD,

    .. math::
       \theta_t = \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\, m_t ;

    afterwards it is Adam's, rectified by :math:`r_t`:

    .. math::
       r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\,\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\,\rho_t}},
       \qquad
       \theta_t = \theta_{t-1} - \frac{\eta\, r_t \sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \cdot
       \frac{m_t}{\sqrt{v_t} + \epsilon} .

    With ``decoupled_weight_decay=True`` the parameter decays first,
    :math:`\theta' = (1 - \eta\lambda)\,\theta_{t-1}`, outside the adaptive
    scaling, and :math:`d_t = g_t` (as AdamW).

    This is ``torch.optim.RAdam`` (:math:`m_t` as ``torch.lerp``; the switch,
    :math:`r_t` and the bias corrections computed once per call in double
    precision, by PyTorch's formulas) with one difference in rounding: the
    step's scalars :math:`\eta, r_t, \sqrt{1-\beta_2^t}, 1/(1-\beta_1^t)` are
    multiplied once, in double precision, where PyTorch multiplies them into the
    tensor one after the other.

    Conventions differ: the article (Algorithm 2) rectifies as soon as
    :math:`\rho_t > 4` and has no :math:`\epsilon`; PyTorch and this function
    wait for :math:`\rho_t > 5` and add :math:`\epsilon` to :math:`\sqrt{v_t}`
    before the bias correction, so that it weighs
    :math:`1/\sqrt{1-\beta_2^t}` times more than in Adam.
""",
    hyper=(
        _hyper.lr(1e-3),
        _hyper.betas(),
        _hyper.eps(1e-8),
        _hyper.weight_decay(),
        _hyper.decoupled_weight_decay(),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("exp_avg", doc="first moment :math:`m`"),
        Buffer("exp_avg_sq", sample="positive", doc="second moment :math:`v`"),
    ),
    scalars=radam_scalars,
    step_scalar_names=("step_size", "rectified"),
    step_scalars=radam_step,
    torch="RAdam",
    examples=(
        # Not in the demo's race: its first five steps are momentum SGD, which the
        # adaptive family's rates (0.01 to 0.1) throw off every surface.
        Example("radam", {}, "RAdam", bench=True),
        Example("radam-wd-maximize", dict(weight_decay=0.05, maximize=True)),
        Example("radam-decoupled", dict(weight_decay=0.1, decoupled_weight_decay=True, betas=(0.5, 0.9), eps=1e-4)),
    ),
)
