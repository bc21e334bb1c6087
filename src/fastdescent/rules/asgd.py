"""ASGD: averaged stochastic gradient descent, with PyTorch's rate and averaging schedules."""

from dataclasses import replace

import numpy as np

from .. import _checks
from . import _hyper
from ._spec import Buffer, Example, Hyper, RuleSpec, ScalarState


def as_stored(value):
    """``value`` rounded as PyTorch stores ``eta`` and ``mu``: in a float32 scalar tensor
    (its default dtype), read back as a Python float."""
    return float(np.float32(value))


def asgd_scalars(h, *, step, grad_scale, fresh, scalar_state):
    """The rate and averaging weight the step uses: those stored by the previous one."""
    eta, mu = scalar_state["eta"], scalar_state["mu"]
    return dict(eta=eta, param_decay=1.0 - h["lambd"] * eta, mu=mu, weight_decay=h["weight_decay"],
                grad_scale=_hyper.signed_grad_scale(h, grad_scale))


def asgd_advance(h, step, scalar_state):
    """``eta`` and ``mu`` after step ``step``, in PyTorch's operation order and storage."""
    lr, lambd = h["lr"], h["lambd"]
    return {"eta": as_stored(lr / ((1.0 + lambd * lr * step) ** h["alpha"])),
            "mu": as_stored(1.0 / max(1.0, step - h["t0"]))}


ASGD = RuleSpec(
    name="asgd",
    year=1992,
    title="ASGD",
    summary="averaged SGD (Polyak & Juditsky 1992) with Bottou's rate schedule",
    doc=r"""One in-place ASGD step on one array or a list of arrays (Polyak & Juditsky 1992).

    SGD whose rate decays, plus a running average :math:`\bar\theta` of the iterates
    (``axs``), which is what converges at the optimal rate and what one evaluates.
    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and L2
    weight decay folded in, :math:`d_t = g_t + \lambda_{wd} \theta_{t-1}`, and the
    rate :math:`\eta_{t-1}` and averaging weight :math:`\mu_{t-1}` the previous step
    left (``eta`` and ``mu``; :math:`\eta_0 = \eta`, :math:`\mu_0 = 1`):

    .. math::
       \theta_t = (1 - \lambda \eta_{t-1})\, \theta_{t-1} - \eta_{t-1} d_t, \qquad
       \bar\theta_t = \begin{cases} \theta_t & \mu_{t-1} = 1 \\
       \bar\theta_{t-1} + \mu_{t-1} (\theta_t - \bar\theta_{t-1}) & \text{otherwise} \end{cases}

    .. math::
       \eta_t = \frac{\eta}{(1 + \lambda \eta t)^{\alpha}}, \qquad
       \mu_t = \frac{1}{\max(1, t - t_0)}

    so the average is a copy of the parameters until step :math:`t_0 + 1`, then the
    plain mean of the iterates since then. This is ``torch.optim.ASGD``, operation for
    operation: the rate schedule with :math:`\alpha = 0.75` and the decay
    :math:`\lambda` (an L2 regularization that shrinks the parameters) are those of
    Bottou's averaged SGD (Bottou 2012, "Stochastic gradient descent tricks"); ``eta``
    and ``mu`` are rounded to float32, as PyTorch stores them (in tensors of its
    default dtype), and ``eta`` starts at ``lr`` rounded so. A changed ``lr`` takes
    effect through the next ``eta``: the step in progress uses the stored one.

    The face returns the new ``eta`` and ``mu`` in a dict; pass them to the next step.
    Conventions differ: PyTorch's default :math:`t_0 = 10^6` (kept here) starts
    averaging only after a million steps; Polyak & Juditsky average from the start
    (``t0=0``); others (e.g. SWA, :func:`fastdescent.swa_update`) average
    separately, every few epochs. The average is only kept, never used by the
    step: evaluate with it by swapping it in (:func:`fastdescent.swap_arrays`).
""",
    hyper=(
        _hyper.lr(1e-2),
        Hyper("lambd", 1e-4, _checks.nonnegative,
              r"Decay :math:`\lambda \ge 0`: shrinks the parameters and slows the rate's decay."),
        Hyper("alpha", 0.75, _checks.nonnegative, r"Power :math:`\alpha \ge 0` of the rate's decay."),
        Hyper("t0", 1e6, _checks.nonnegative, r"The step :math:`t_0 \ge 0` after which averaging starts."),
        _hyper.weight_decay(),
        replace(_hyper.maximize(), keyword_only=False),  # positional in torch.optim.ASGD
    ),
    buffers=(
        Buffer("ax", doc=r"the average of the iterates :math:`\bar\theta`"),
    ),
    scalar_state=(
        ScalarState("eta", lambda h: as_stored(h["lr"]), r"The rate :math:`\eta_{t-1}` the previous step left."),
        ScalarState("mu", 1.0, r"The averaging weight :math:`\mu_{t-1}` the previous step left."),
    ),
    scalars=asgd_scalars,
    advance=asgd_advance,
    torch="ASGD",
    examples=(
        Example("asgd", {}, "ASGD (PyTorch's defaults: averaging after 10**6 steps)", bench=True),
        Example("asgd-averaging", dict(t0=0.0), "ASGD averaging from the start", bench=True),
        Example("asgd-wd-maximize", dict(lr=0.05, lambd=0.01, alpha=0.5, t0=3.0, weight_decay=0.01,
                                         maximize=True)),
    ),
)
