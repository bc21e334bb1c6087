"""RMSprop: gradients divided by a running root mean square, optionally centered."""

from . import _hyper
from ._spec import Buffer, Example, RuleSpec, above_zero, flag


def rmsprop_check_storage(h, state_dtype):
    if h["centered"]:
        raise ValueError(f"state_dtype={state_dtype!r} with centered RMSprop: it divides by "
                         "sqrt(square_avg - grad_avg**2), a difference that rounding either average to 16 or "
                         "8 bits makes negative or zero (NaN or huge steps); keep float32 state")


def rmsprop_scalars(h, *, step, grad_scale, fresh):
    """The kernel is told ``centered`` by the presence of ``grad_avg``."""
    return dict(lr=h["lr"], alpha=h["alpha"], eps=h["eps"], weight_decay=h["weight_decay"],
                momentum=h["momentum"], grad_scale=_hyper.signed_grad_scale(h, grad_scale))


RMSPROP = RuleSpec(
    name="rmsprop",
    year=2012,
    title="RMSprop",
    summary="RMSprop (Tieleman & Hinton 2012; centered: Graves 2013)",
    doc=r"""One in-place RMSprop step on one array or a list of arrays (Hinton, lecture 6e, 2012).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in, :math:`d_t = g_t + \lambda \theta_{t-1}`:

    .. math::
       v_t = \alpha v_{t-1} + (1 - \alpha) d_t^2, \qquad
       \sigma_t = \sqrt{v_t} + \epsilon

    and, if ``centered`` (Graves 2013: divide by an estimate of the standard
    deviation instead of the root mean square),

    .. math::
       a_t = \alpha a_{t-1} + (1 - \alpha) d_t, \qquad
       \sigma_t = \sqrt{v_t - a_t^2} + \epsilon .

    Then without momentum :math:`\theta_t = \theta_{t-1} - \eta\, d_t / \sigma_t`;
    with momentum :math:`\mu > 0`,

    .. math::
       b_t = \mu b_{t-1} + d_t / \sigma_t, \qquad \theta_t = \theta_{t-1} - \eta b_t .

    This is ``torch.optim.RMSprop``, operation for operation (:math:`a_t` as
    ``torch.lerp``). Conventions differ: TensorFlow and Keras put :math:`\epsilon`
    inside the root, :math:`\sqrt{v_t + \epsilon}`, default :math:`\alpha` (their
    ``rho``) to 0.9 and keep :math:`\eta` inside the momentum buffer, so a
    changing learning rate acts differently there.
""",
    hyper=(
        _hyper.lr(1e-2),
        _hyper.unit("alpha", 0.99, r"Decay :math:`\alpha \in [0, 1)` of the averages."),
        _hyper.eps(1e-8),
        _hyper.weight_decay(),
        _hyper.unit("momentum", 0.0, r"Momentum :math:`\mu \in [0, 1)`."),
        _hyper.flag("centered", False, "Divide by an estimate of the standard deviation (Graves 2013)."),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("square_avg", sample="positive", doc="the average of squares :math:`v`"),
        Buffer("momentum_buffer", when=above_zero("momentum"), doc="the momentum buffer :math:`b`"),
        # Drawn as zeros in tests: a centered variance needs square_avg >= grad_avg**2.
        Buffer("grad_avg", when=flag("centered"), sample="zero", doc="the average of gradients :math:`a`"),
    ),
    scalars=rmsprop_scalars,
    check_storage=rmsprop_check_storage,
    uses_step=False,
    torch="RMSprop",
    examples=(
        Example("rmsprop", dict(lr=0.01), "RMSprop, alpha 0.99", bench=True, demo=("adaptive", 1e-3)),
        Example("rmsprop-momentum-wd", dict(lr=0.005, alpha=0.9, momentum=0.5, weight_decay=0.01)),
        Example("rmsprop-centered-maximize", dict(lr=0.005, centered=True, maximize=True, eps=1e-6)),
        Example("rmsprop_centered_momentum", dict(lr=0.001, momentum=0.9, centered=True),
                "RMSprop, centered, momentum 0.9", bench=True),
        Example("rmsprop-centered-momentum-wd", dict(lr=0.001, centered=True, momentum=0.8, alpha=0.9,
                                                     weight_decay=0.01)),
        Example("rmsprop-centered-alpha0.3", dict(lr=0.001, centered=True, alpha=0.3, eps=1e-4)),
    ),
)
