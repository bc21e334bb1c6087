"""Adamax: Adam with the infinity norm in place of the second moment."""

from . import _hyper
from ._spec import Buffer, Example, RuleSpec


def adamax_step_size(h, step):
    """``(step_size,)``: the bias-corrected step size of step ``step``, in double precision."""
    return (h["lr"] / (1.0 - h["betas"][0]**step),)


def adamax_scalars(h, *, step, grad_scale, fresh):
    beta1, beta2 = h["betas"]
    step_size, = adamax_step_size(h, step)
    return dict(step_size=step_size, beta1=beta1, beta2=beta2, eps=h["eps"],
                weight_decay=h["weight_decay"], grad_scale=_hyper.signed_grad_scale(h, grad_scale))


ADAMAX = RuleSpec(
    name="adamax",
    year=2015,
    title="Adamax",
    summary="Adamax: Adam with the infinity norm (Kingma & Ba 2015)",
    doc=r"""One in-place Adamax step on one array or a list of arrays (Kingma & Ba 2015, section 7.1).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in, :math:`d_t = g_t + \lambda \theta_{t-1}`:

    .. math::
       m_t = \beta_1 m_{t-1} + (1 - \beta_1) d_t, \qquad
       u_t = \max(\beta_2 u_{t-1},\ |d_t| + \epsilon),

    .. math::
       \theta_t = \theta_{t-1} - \frac{\eta}{1 - \beta_1^t} \cdot \frac{m_t}{u_t} .

    The second moment of Adam becomes an exponentially weighted infinity norm
    :math:`u_t` (the limit :math:`p \to \infty` of an :math:`L^p` moment), which
    needs no bias correction. This is ``torch.optim.Adamax`` operation for
    operation (:math:`m_t` as ``torch.lerp``, the step size :math:`\eta / (1 -
    \beta_1^t)` computed once per call in double precision).

    Conventions differ on :math:`\epsilon`: the article has none; PyTorch and
    this function add it to :math:`|d_t|` inside the maximum, so :math:`u_t \ge
    \epsilon`; TensorFlow/Keras keep :math:`u_t = \max(\beta_2 u_{t-1}, |g_t|)`
    and divide by :math:`u_t + \epsilon`.
""",
    hyper=(
        _hyper.lr(2e-3),
        _hyper.betas(),
        _hyper.eps(1e-8, r"Added to :math:`|d_t|` inside the maximum, :math:`\epsilon \ge 0`."),
        _hyper.weight_decay(),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("exp_avg", doc="first moment :math:`m`"),
        Buffer("exp_inf", sample="positive", doc="exponentially weighted infinity norm :math:`u`"),
    ),
    scalars=adamax_scalars,
    step_scalar_names=("step_size",),
    step_scalars=adamax_step_size,
    torch="Adamax",
    examples=(
        Example("adamax", {}, "Adamax", bench=True, demo=("adaptive", 2e-3)),
        Example("adamax-wd-maximize-beta1_0-eps", dict(weight_decay=0.05, maximize=True, betas=(0.0, 0.9), eps=1e-3)),
    ),
)
