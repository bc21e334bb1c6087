"""Adagrad: per-coordinate learning rates from the sum of squared gradients."""

from . import _hyper
from ._spec import Buffer, Example, Hyper, RuleSpec
from .. import _checks


def adagrad_decayed_lr(h, step):
    """``(clr,)``: the decayed learning rate of step ``step``, in double precision."""
    return (h["lr"] / (1.0 + (step - 1) * h["lr_decay"]),)


def adagrad_scalars(h, *, step, grad_scale, fresh):
    """The step's decayed learning rate, and the gradient scale with its sign."""
    return dict(clr=adagrad_decayed_lr(h, step)[0], grad_scale=_hyper.signed_grad_scale(h, grad_scale),
                weight_decay=h["weight_decay"], eps=h["eps"])


ADAGRAD = RuleSpec(
    name="adagrad",
    year=2011,
    title="Adagrad",
    summary="Adagrad (Duchi, Hazan & Singer 2011)",
    doc=r"""One in-place Adagrad step on one array or a list of arrays (Duchi, Hazan & Singer 2011).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in, :math:`d_t = g_t + \lambda \theta_{t-1}`:

    .. math::
       \tilde\eta_t = \frac{\eta}{1 + (t - 1)\,\kappa}, \qquad
       s_t = s_{t-1} + d_t^2, \qquad
       \theta_t = \theta_{t-1} - \frac{\tilde\eta_t\, d_t}{\sqrt{s_t} + \epsilon}

    as ``torch.optim.Adagrad`` (the decayed rate :math:`\tilde\eta_t` with
    ``lr_decay`` :math:`\kappa` is computed once per call, in double precision).

    Conventions differ on where :math:`\epsilon` sits: PyTorch and this function
    add it outside the root, :math:`\sqrt{s_t} + \epsilon`; Keras and optax put
    it inside, :math:`\sqrt{s_t + \epsilon}`. Keras and optax also start the sum
    at 0.1, PyTorch at 0.
""",
    hyper=(
        _hyper.lr(1e-2),
        Hyper("lr_decay", 0.0, _checks.nonnegative, r"Learning-rate decay :math:`\kappa \ge 0`."),
        _hyper.weight_decay(),
        Hyper("initial_accumulator_value", 0.0, _checks.nonnegative,
              "Initial value of the sums (the optimizers' only: a face caller fills the buffer).", face=False),
        _hyper.eps(1e-10),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("sum", argument="state_sums", fill=lambda h: h["initial_accumulator_value"], sample="positive",
               doc=r"the sum of squared gradients :math:`s`"),
    ),
    scalars=adagrad_scalars,
    step_scalar_names=("clr",),
    step_scalars=adagrad_decayed_lr,
    torch="Adagrad",
    examples=(
        Example("adagrad", dict(lr=0.01), "Adagrad", bench=True, demo=("adagrad", 0.05)),
        Example("adagrad-lr_decay-wd", dict(lr_decay=0.05, weight_decay=0.02)),
        Example("adagrad-maximize-eps-init", dict(maximize=True, eps=1e-3, initial_accumulator_value=0.1)),
    ),
)
