"""Adadelta: steps scaled by the ratio of two running root mean squares, of the
past updates and of the gradients."""

from . import _hyper
from ._spec import Buffer, Example, Hyper, RuleSpec
from .. import _checks


def adadelta_scalars(h, *, step, grad_scale, fresh):
    return dict(lr=h["lr"], rho=h["rho"], eps=h["eps"], weight_decay=h["weight_decay"],
                grad_scale=_hyper.signed_grad_scale(h, grad_scale))


ADADELTA = RuleSpec(
    name="adadelta",
    year=2012,
    title="Adadelta",
    summary="Adadelta (Zeiler 2012)",
    doc=r"""One in-place Adadelta step on one array or a list of arrays (Zeiler 2012).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in, :math:`d_t = g_t + \lambda \theta_{t-1}`:

    .. math::
       v_t = \rho v_{t-1} + (1 - \rho) d_t^2, \qquad
       \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, d_t,

    .. math::
       u_t = \rho u_{t-1} + (1 - \rho) \Delta_t^2, \qquad
       \theta_t = \theta_{t-1} - \eta \Delta_t,

    :math:`v` the average of squared gradients (``square_avg``) and :math:`u` the
    average of squared updates (``acc_delta``). The ratio of the two roots gives
    each coordinate a step in the units of the parameter, so the article needs no
    learning rate (:math:`\eta = 1`, PyTorch's default). This is
    ``torch.optim.Adadelta``, operation for operation.

    Conventions differ: the article's experiments use :math:`\rho = 0.95`,
    :math:`\epsilon = 10^{-6}`; PyTorch defaults to :math:`\rho = 0.9`,
    :math:`\epsilon = 10^{-6}`, :math:`\eta = 1`; Keras to :math:`\rho = 0.95`,
    :math:`\epsilon = 10^{-7}` and :math:`\eta = 0.001`, a thousand times smaller
    steps.
""",
    hyper=(
        _hyper.lr(1.0),
        Hyper("rho", 0.9, _checks.closed_unit_interval, r"Decay :math:`\rho \in [0, 1]` of both averages."),
        _hyper.eps(1e-6, r"Added inside both roots, :math:`\epsilon \ge 0`."),
        _hyper.weight_decay(),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("square_avg", sample="positive", doc="the average of squared gradients :math:`v`"),
        Buffer("acc_delta", sample="positive", doc="the average of squared updates :math:`u`"),
    ),
    scalars=adadelta_scalars,
    uses_step=False,
    torch="Adadelta",
    examples=(
        Example("adadelta", {}, "Adadelta", bench=True),
        Example("adadelta-wd-maximize-rho-eps", dict(lr=0.5, weight_decay=0.05, maximize=True, rho=0.5, eps=1e-4)),
    ),
)
