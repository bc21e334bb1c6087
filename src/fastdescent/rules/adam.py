"""Adam and AdamW (decoupled weight decay), with optional AMSGrad."""

import math

from .. import _runtime
from . import _hyper
from ._spec import Buffer, Example, RuleSpec, flag

ADAM_DOC = r"""One in-place Adam step on one array or a list of arrays (Kingma & Ba 2015).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in ("coupled"), :math:`d_t = g_t + \lambda \theta_{t-1}`:

    .. math::
       m_t = \beta_1 m_{t-1} + (1 - \beta_1) d_t, \qquad
       v_t = \beta_2 v_{t-1} + (1 - \beta_2) d_t^2,

    .. math::
       \theta_t = \theta_{t-1} - \frac{\eta}{1 - \beta_1^t} \cdot
       \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    with :math:`\hat v_t = v_t`, or with AMSGrad (``amsgrad=True``, Reddi, Kale &
    Kumar 2018) the running maximum :math:`\hat v_t = \max(\hat v_{t-1}, v_t)`,
    kept in ``max_exp_avg_sqs``. This is ``torch.optim.Adam``'s operation order
    (:math:`m_t` as ``torch.lerp``, the bias corrections computed once per call in
    double precision) with one deliberate difference: the root is *multiplied* by
    :math:`1/\sqrt{1-\beta_2^t}` (rounded once to the buffer dtype) where PyTorch
    divides by :math:`\sqrt{1-\beta_2^t}`. That changes the denominator by at most
    one ulp and removes one of the two divisions per element, which made the
    in-cache step 1.3x faster (measured at 10**5 float32 elements, one thread).
    ``bias_correction=False`` drops both corrections (the plain
    form of the algorithm, :math:`\theta_t = \theta_{t-1} - \eta\, m_t / (\sqrt{\hat v_t} + \epsilon)`).

    Conventions differ between libraries:

    * where :math:`\epsilon` sits: PyTorch, Kingma & Ba's Algorithm 1 and this
      function add it to the bias-corrected root. TensorFlow/Keras use the
      paper's "efficient" form, folding both corrections into the step size and
      adding :math:`\hat\epsilon` to the uncorrected :math:`\sqrt{v_t}` (equal to
      :math:`\epsilon = \hat\epsilon / \sqrt{1-\beta_2^t}` here, so it differs
      early in training); optax adds ``eps`` outside and ``eps_root`` inside the root;
    * AMSGrad: the article takes the maximum of uncorrected averages and has no
      bias correction; PyTorch (and this function) takes the maximum of
      :math:`v_t` and then divides by :math:`\sqrt{1-\beta_2^t}`;
    * weight decay: here it is an L2 term added to the gradient, which the
      adaptive scaling then distorts; :func:`adamw_step` decouples it
      (as does ``decoupled_weight_decay=True``).
"""


def adam_bias_corrections(h, step):
    """``(step_size, inv_bias_correction2_sqrt)`` of step ``step``: the bias
    corrections in double precision (lr and 1 without them)."""
    if h["bias_correction"]:
        beta1, beta2 = h["betas"]
        return h["lr"] / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step)
    return h["lr"], 1.0


def adam_scalars(h, *, step, grad_scale, fresh):
    """The bias corrections of step ``step`` (:func:`adam_bias_corrections`), and
    the gradient scale with its sign."""
    beta1, beta2 = h["betas"]
    step_size, inv_bias_correction2_sqrt = adam_bias_corrections(h, step)
    return dict(lr=h["lr"], step_size=step_size, inv_bias_correction2_sqrt=inv_bias_correction2_sqrt,
                beta1=beta1, beta2=beta2, eps=h["eps"], weight_decay=h["weight_decay"],
                decoupled=h["decoupled_weight_decay"], grad_scale=_hyper.signed_grad_scale(h, grad_scale))


ADAM = RuleSpec(
    name="adam",
    year=2015,
    title="Adam",
    summary="Adam (Kingma & Ba 2015), AMSGrad (Reddi et al. 2018)",
    doc=ADAM_DOC,
    hyper=(
        _hyper.lr(1e-3),
        _hyper.betas(),
        _hyper.eps(1e-8),
        _hyper.weight_decay(),
        _hyper.flag("amsgrad", False, "Keep the running maximum of the second moment (AMSGrad)."),
        _hyper.maximize(),
        _hyper.flag("decoupled_weight_decay", False, "Decay the parameters directly, as AdamW.",
                    keyword_only=True),
        _hyper.flag("bias_correction", True, "Divide by the bias corrections (not an option in PyTorch).",
                    keyword_only=True, torch=False),
    ),
    buffers=(
        Buffer("exp_avg", doc="first moment :math:`m`"),
        Buffer("exp_avg_sq", sample="positive", doc="second moment :math:`v`"),
        Buffer("max_exp_avg_sq", when=flag("amsgrad"), sample="positive",
               doc=r"running maximum :math:`\hat v`"),
    ),
    scalars=adam_scalars,
    step_scalar_names=("step_size", "inv_bias_correction2_sqrt"),
    step_scalars=_runtime.BiasCorrections(adam_bias_corrections),
    torch="Adam",
    examples=(
        Example("adam", {}, "Adam", bench=True, demo=("adaptive", 1e-3)),
        Example("adam-wd-maximize-scale", dict(weight_decay=0.05, maximize=True)),
        Example("adam_amsgrad", dict(amsgrad=True), "Adam with AMSGrad", bench=True),
        Example("adam-amsgrad-beta1_0-wd", dict(amsgrad=True, betas=(0.0, 0.99), weight_decay=0.01)),
        Example("adam-beta1_0.2-no-bias-correction", dict(betas=(0.2, 0.9), bias_correction=False, eps=1e-3)),
        Example("adam-decoupled", dict(weight_decay=0.1, decoupled_weight_decay=True)),
    ),
)

ADAMW = ADAM.variant(
    name="adamw",
    year=2019,
    title="AdamW",
    kernel="adam",
    summary="AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019)",
    doc=r"""One in-place AdamW step: Adam with decoupled weight decay (Loshchilov & Hutter 2019).

    The parameter decays before the Adam step, outside the adaptive scaling, and
    the gradient is used as is:

    .. math::
       \theta' = (1 - \eta\lambda)\, \theta_{t-1}, \qquad
       \theta_t = \theta' - \frac{\eta}{1 - \beta_1^t} \cdot
       \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    with :math:`m_t, v_t, \hat v_t` from :math:`g_t` as in :func:`adam_step`. This
    is ``torch.optim.AdamW`` (default ``weight_decay=1e-2``). Conventions differ in
    how the decay is scaled: PyTorch, optax and Keras multiply it by the learning
    rate :math:`\eta`, as here; the article multiplies it by the schedule
    multiplier :math:`\eta_t` only, not by the base rate :math:`\alpha`, so
    :math:`\lambda_{\text{here}} = \lambda_{\text{article}} / \alpha`.

    Takes the arguments of :func:`adam_step`, with ``weight_decay`` decoupled.
""",
    defaults={"weight_decay": 1e-2},
    fixed={"decoupled_weight_decay": True},
    torch="AdamW",
    examples=(
        Example("adamw", {}, "AdamW, weight decay 0.01", bench=True, demo=("adaptive", 1e-3)),
        Example("adamw-amsgrad-maximize", dict(amsgrad=True, maximize=True, weight_decay=0.1)),
        Example("adamw-no-decay", dict(weight_decay=0.0, betas=(0.5, 0.9))),
    ),
)
