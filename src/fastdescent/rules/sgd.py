"""Stochastic gradient descent, with momentum and Nesterov momentum."""

from .. import _checks
from . import _hyper
from ._spec import FIRST_GRADIENT, Buffer, Example, Hyper, RuleSpec, above_zero

CONVENTIONS = ("pytorch", "classical")


def sgd_check(h):
    if h["nesterov"] and h["momentum"] == 0.0:
        raise ValueError("nesterov=True requires momentum > 0")
    if h["nesterov"] and h["dampening"] != 0.0:
        raise ValueError("nesterov=True requires dampening=0 (as in PyTorch)")
    if h["convention"] == "classical" and h["dampening"] != 0.0:
        raise ValueError("dampening belongs to the 'pytorch' convention")


def sgd_scalars(h, *, step, grad_scale, fresh):
    return dict(lr=h["lr"], grad_scale=_hyper.signed_grad_scale(h, grad_scale), weight_decay=h["weight_decay"],
                momentum=h["momentum"], dampening=h["dampening"], nesterov=h["nesterov"],
                classical=h["convention"] == "classical", first_step="momentum_buffer" in fresh)


SGD = RuleSpec(
    name="sgd",
    year=1951,
    title="SGD",
    summary="stochastic gradient descent with optional (Nesterov) momentum",
    doc=r"""One in-place SGD step, with optional momentum, on one array or a list of arrays.

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in, :math:`d_t = g_t + \lambda \theta_{t-1}`:

    * plain (``momentum=0``): :math:`\theta_t = \theta_{t-1} - \eta d_t`
      (Robbins & Monro 1951);
    * momentum, ``convention="pytorch"`` (the default, as ``torch.optim.SGD``):

      .. math::
         v_t = \mu v_{t-1} + (1 - \tau) d_t, \qquad \theta_t = \theta_{t-1} - \eta v_t

      with :math:`v_1 = d_1` when ``first_step`` is true (PyTorch's lazily
      created buffer), else from the buffer passed in;
    * momentum, ``convention="classical"`` (Polyak 1964; Sutskever et al. 2013;
      the form in most textbooks): the learning rate sits inside the buffer,

      .. math::
         v_t = \mu v_{t-1} - \eta d_t, \qquad \theta_t = \theta_{t-1} + v_t .

      The two conventions give the same iterates while :math:`\eta` is constant
      and there is no dampening (:math:`v^{classical} = -\eta v^{pytorch}`). When
      the learning rate changes they differ: PyTorch's buffer holds gradients, so
      a new rate applies at once to the whole accumulated velocity; the classical
      buffer holds past steps, each taken at the rate of its own time, so a
      decayed rate only shrinks new contributions. ``dampening`` and
      ``first_step`` belong to the PyTorch form and must be 0 / False here.

    * Nesterov momentum (``nesterov=True``, Nesterov 1983 in Sutskever et al.'s
      look-ahead-free form, as PyTorch): the step uses the gradient plus the
      momentum-carried buffer, :math:`\theta_t = \theta_{t-1} - \eta (d_t + \mu v_t)`
      (classical: :math:`\theta_t = \theta_{t-1} + \mu v_t - \eta d_t`). This
      equals evaluating the gradient at the look-ahead point
      :math:`\theta + \mu v` after a change of variables, without a second
      gradient evaluation.
""",
    hyper=(
        _hyper.lr(1e-3),
        _hyper.unit("momentum", 0.0, r"Momentum :math:`\mu \in [0, 1)`."),
        Hyper("dampening", 0.0, _checks.closed_unit_interval, r"Dampening :math:`\tau \in [0, 1]` (PyTorch form)."),
        _hyper.weight_decay(),
        _hyper.flag("nesterov", False, "Nesterov momentum (needs momentum > 0 and no dampening)."),
        _hyper.maximize(),
        _hyper.choice("convention", "pytorch", CONVENTIONS,
                      "Where the learning rate sits: outside the buffer (PyTorch) or inside it (classical)."),
    ),
    buffers=(
        Buffer("momentum_buffer", when=above_zero("momentum"),
               fill=lambda h: FIRST_GRADIENT if h["convention"] == "pytorch" else 0.0,
               doc="the velocity :math:`v`"),
    ),
    scalars=sgd_scalars,
    check=sgd_check,
    counts_steps=False,
    uses_step=False,
    torch="SGD",
    examples=(
        Example("sgd", dict(lr=0.01), "plain SGD", bench=True, demo=("sgd", 0.1)),
        Example("sgd-wd-maximize", dict(lr=0.05, weight_decay=0.01, maximize=True)),
        Example("sgd_momentum", dict(lr=0.01, momentum=0.9), "SGD, momentum 0.9 (PyTorch form)", bench=True,
                demo=("momentum", 0.05)),
        Example("sgd-momentum-dampening", dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
        Example("nesterov", dict(lr=0.01, momentum=0.9, nesterov=True), "SGD, Nesterov momentum 0.9", bench=True,
                demo=("momentum", 0.05)),
        Example("nesterov-maximize-wd", dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True, weight_decay=0.01)),
        Example("classical", dict(lr=0.05, momentum=0.9, convention="classical")),
        Example("classical-nesterov-wd", dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.01,
                                              convention="classical")),
    ),
)
