"""Lion: the sign of an interpolated momentum, with decoupled weight decay."""

from . import _hyper
from ._spec import Buffer, Example, RuleSpec


def lion_scalars(h, *, step, grad_scale, fresh):
    beta1, beta2 = h["betas"]
    return dict(lr=h["lr"], beta1=beta1, beta2=beta2, weight_decay=h["weight_decay"],
                grad_scale=_hyper.signed_grad_scale(h, grad_scale))


LION = RuleSpec(
    name="lion",
    year=2023,
    title="Lion",
    summary="Lion, the sign of an interpolated momentum (Chen et al. 2023)",
    doc=r"""One in-place Lion step on one array or a list of arrays (Chen et al. 2023,
    "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``):

    .. math::
       u_t = \operatorname{sign}\big(\beta_1 m_{t-1} + (1 - \beta_1) g_t\big), \qquad
       \theta_t = \theta_{t-1} - \eta\,(u_t + \lambda \theta_{t-1}),

    .. math::
       m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t .

    Every coordinate moves by exactly :math:`\eta` (plus the decay), so Lion wants a
    learning rate 3-10 times smaller than AdamW's and a weight decay 3-10 times
    larger (the paper's advice). It keeps one buffer, the momentum ``exp_avg``: a
    step reads the parameter, the gradient and the momentum and writes the
    parameter and the momentum, 20 bytes per float32 element where Adam moves 28.
    The sign is NumPy's: :math:`\operatorname{sign}(0) = 0` (an element whose
    interpolation is zero does not move, but for its decay), and a NaN stays NaN.

    The defaults are the paper's and ``lion-pytorch``'s: :math:`\eta = 10^{-4}`,
    :math:`\beta = (0.9, 0.99)`, :math:`\lambda = 0` (the paper gives no default
    decay; optax's is :math:`10^{-3}`). Implementations differ in rounding only:

    * ``lion_pytorch.Lion`` decays first, :math:`\theta \leftarrow (1 - \eta\lambda)\theta`,
      then subtracts :math:`\eta u_t` (the same value to a rounding or two); and its
      ``torch.sign`` maps NaN to 0, which freezes a parameter whose momentum went
      NaN instead of showing it;
    * optax's ``lion`` computes :math:`-\eta (u_t + \lambda\theta)` as here;
    * complex parameters (in ``fastdescent.torch``) are (real, imaginary) pairs, as
      ``torch.optim`` treats them: each part moves by its own sign, where
      ``lion_pytorch`` takes the complex sign :math:`c / |c|`.
""",
    hyper=(
        _hyper.lr(1e-4),
        _hyper.betas((0.9, 0.99), r":math:`\beta_1 \in [0, 1)` weighs the momentum against the gradient in "
                                  r"the update's sign, :math:`\beta_2 \in [0, 1)` is the momentum's decay rate."),
        _hyper.weight_decay(0.0, r"Decoupled weight decay :math:`\lambda \ge 0`, scaled by the learning rate."),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("exp_avg", doc="the momentum :math:`m`"),
    ),
    scalars=lion_scalars,
    counts_steps=False,  # lion-pytorch's state: exp_avg only
    uses_step=False,
    examples=(
        Example("lion", {}, "Lion", bench=True, demo=("sign", 1e-3)),
        Example("lion-wd-maximize", dict(weight_decay=0.5, maximize=True)),
        Example("lion-betas", dict(betas=(0.5, 0.9), weight_decay=0.1)),
        Example("lion-beta1_0", dict(betas=(0.0, 0.999))),
    ),
)
