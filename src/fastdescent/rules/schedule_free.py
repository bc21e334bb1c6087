"""Schedule-Free AdamW and SGD: no learning-rate schedule, an averaged iterate instead."""

from functools import partial

import numpy as np

from .. import _checks
from . import _hyper
from ._spec import PARAMETER, Buffer, Example, Hyper, RuleSpec, ScalarState

SCHEDULE_FREE_DOC = r"""

    Schedule-Free optimization (Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky
    2024, "The Road Less Scheduled") keeps three iterates: :math:`z`, which takes
    the base optimizer's steps; :math:`x`, the weighted average of the
    :math:`z`'s, which is the point to evaluate and the result of training; and
    :math:`y`, between the two, where the gradient is taken. At step :math:`t`
    (from 1), with gradient :math:`g_t` taken at :math:`y_{t-1}` (times
    ``grad_scale``, negated if ``maximize``), a linear warmup
    :math:`\gamma_t = \eta \min(1, t / \text{warmup\_steps})` and
    :math:`\gamma^{\max}_t = \max(\gamma^{\max}_{t-1}, \gamma_t)`:

    .. math::
       z_t = z_{t-1} - \gamma_t\, \delta_t, \qquad
       x_t = (1 - c_t)\, x_{t-1} + c_t z_t, \qquad
       y_t = \beta x_t + (1 - \beta) z_t,

    .. math::
       c_t = \frac{w_t}{\sum_{i \le t} w_i}, \qquad
       w_t = t^{r} \, (\gamma^{\max}_t)^{p}

    with :math:`p` = ``weight_lr_power`` (the average weighs steps taken at a
    higher rate more; warmup steps weigh less) and :math:`r` a polynomial weighting
    (0: the uniform average of the :math:`z`'s).
"""

STATE_DOC = r"""
    The arrays hold: ``params`` :math:`y` (train mode), ``zs`` and ``xs`` (both
    start as copies of the parameter, the optimizers' initial state). The face
    returns ``weight_sum`` (:math:`\sum_i w_i`) and ``lr_max``
    (:math:`\gamma^{\max}_t`), which the next step takes. Evaluate the model at
    ``xs``: the optimizer classes' ``eval()`` copies :math:`x` into the parameters
    and ``train()`` puts :math:`y = \beta x + (1 - \beta) z` back, in place,
    computed as the step computes it (bit for bit the :math:`y` it wrote, unless
    :math:`\beta` changed since). A step refuses to run in eval mode.

    This is the ``schedulefree`` package's reference classes' algorithm
    (``AdamWScheduleFreeReference``, ``SGDScheduleFreeReference``), operation by
    operation, in one pass over memory. Those keep :math:`y` in the state besides
    the parameter; here the parameter is :math:`y` (in train mode), so the state
    holds ``z`` and ``x`` only. Their memory-efficient classes keep no :math:`x`
    and recover it from :math:`y` and :math:`z` in ``eval()`` (rounding changes
    the parameters a little at each switch); here the switches are exact. Both
    classes start in train mode, and each parameter keeps its own step count
    and weights (the package counts per group: the same unless some parameters
    of a group miss gradients at some steps). There is no ``scheduled_lr`` in the
    groups.
"""


def _warmup_and_average(h, step, scalar_state):
    """(this step's rate, lr_max, weight_sum, ckp1) of step ``step`` (from 1), in
    the order and precision of the schedulefree package (Python floats)."""
    warmup = h["warmup_steps"]
    lr = h["lr"] * (step / warmup if step <= warmup else 1.0)
    lr_max = max(lr, scalar_state["lr_max"])
    weight = (step ** h["r"]) * (lr_max ** h["weight_lr_power"])
    weight_sum = scalar_state["weight_sum"] + weight
    ckp1 = weight / weight_sum if weight_sum != 0.0 else 0.0
    return lr, lr_max, weight_sum, ckp1


def advance(h, step, scalar_state):
    _, lr_max, weight_sum, _ = _warmup_and_average(h, step, scalar_state)
    return {"weight_sum": weight_sum, "lr_max": lr_max}


def adamw_scalars(h, *, step, grad_scale, fresh, scalar_state):
    lr, _, _, ckp1 = _warmup_and_average(h, step, scalar_state)
    beta1, beta2 = h["betas"]
    return dict(lr=lr, weight_decay=h["weight_decay"], decay_at_z=h["decay_at_z"], beta1=beta1, beta2=beta2,
                bias_correction2=1.0 - beta2**step, eps=h["eps"], ckp1=ckp1,
                grad_scale=_hyper.signed_grad_scale(h, grad_scale))


def sgd_scalars(h, *, step, grad_scale, fresh, scalar_state):
    lr, _, _, ckp1 = _warmup_and_average(h, step, scalar_state)
    return dict(lr=lr, weight_decay=h["weight_decay"], momentum=h["momentum"], ckp1=ckp1,
                grad_scale=_hyper.signed_grad_scale(h, grad_scale))


def _interpolation_weight(h):
    """The beta of y = beta*x + (1 - beta)*z: AdamW's beta1, SGD's momentum."""
    return h["betas"][0] if "betas" in h else h["momentum"]


def _put_y(h, params, buffers, backend, n_threads):
    backend.schedule_free_y(params, buffers["x"], buffers["z"], beta=_interpolation_weight(h), n_threads=n_threads)


def _put_x(h, params, buffers, backend, n_threads):
    for p, x in zip(params, buffers["x"]):
        np.copyto(p, x)


class ScheduleFreeModes:
    r"""``train()`` and ``eval()``: which iterate the parameters hold (each group's
    ``"train_mode"``). Train mode, the start: :math:`y`, where gradients are taken.
    Eval mode: :math:`x`, the averaged iterate, to evaluate and to keep. Both
    switches work in place, without allocating; a step in eval mode raises
    RuntimeError."""

    def train(self):
        r"""Put :math:`y = \beta x + (1 - \beta) z` in the parameters (train mode)."""
        for g, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                self._update_state(g, ("z", "x"), _put_y)
                group["train_mode"] = True

    def eval(self):
        """Put the averaged iterate :math:`x` in the parameters (eval mode)."""
        for g, group in enumerate(self.param_groups):
            if group["train_mode"]:
                self._update_state(g, ("x",), _put_x)
                group["train_mode"] = False

    def step(self, *args, **kwargs):
        """Take one step, in train mode only (see the base class's ``step``)."""
        self._refuse_eval_mode("step()")
        return super().step(*args, **kwargs)

    def _parameter_update(self, *args, **kwargs):
        # fastdescent.torch.step_in_backward steps each parameter through this.
        self._refuse_eval_mode("a step in backward")
        return super()._parameter_update(*args, **kwargs)

    def _refuse_eval_mode(self, what):
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}: {what} in eval mode: the parameters hold the averaged "
                               "iterate x; call train() first")

    def add_param_group(self, param_group):
        """Add a group, in the mode of the others (train mode for the first)."""
        if isinstance(param_group, dict) and "train_mode" not in param_group:
            mode = self.param_groups[0]["train_mode"] if self.param_groups else True
            param_group = {**param_group, "train_mode": mode}
        super().add_param_group(param_group)


def _averaging_hyper():
    """warmup_steps, r and weight_lr_power, with the schedulefree package's defaults."""
    return (
        Hyper("warmup_steps", 0, partial(_checks.integer, minimum=0),
              "Steps of linear learning-rate warmup (0: none).", type="int"),
        Hyper("r", 0.0, _checks.nonnegative, r"Power of the polynomial weighting of the average, :math:`r \ge 0`."),
        Hyper("weight_lr_power", 2.0, _checks.nonnegative,
              r"Power :math:`p \ge 0` of the largest rate so far in the averaging weights (0: unweighted)."),
    )


#: What both rules share: the iterates z and x, the averaging's scalar states, train() and eval().
_Z = Buffer("z", fill=PARAMETER, storage=(), doc="the base optimizer's iterate :math:`z`")
_X = Buffer("x", fill=PARAMETER, storage=(), doc="the averaged iterate :math:`x`, to evaluate")
_SCHEDULE_FREE = dict(
    year=2024,
    scalar_state=(
        ScalarState("weight_sum", 0.0, r"The sum of the averaging weights so far, :math:`\sum_i w_i`."),
        ScalarState("lr_max", -1.0,
                    r"The largest learning rate so far, :math:`\gamma^{\max}` (-1 before the first step)."),
    ),
    advance=advance,
    mixin=ScheduleFreeModes,
)

SCHEDULE_FREE_ADAMW = RuleSpec(
    name="schedule_free_adamw",
    title="ScheduleFreeAdamW",
    summary="Schedule-Free AdamW (Defazio et al. 2024): no schedule, an averaged iterate",
    doc=r"""One in-place Schedule-Free AdamW step on one array or a list of arrays.""" + SCHEDULE_FREE_DOC + r"""
    AdamW's step, with :math:`\beta = \beta_1` (there is no first moment: the
    interpolation plays its part), decoupled weight decay :math:`\lambda` taken at
    :math:`y` (or at :math:`z`, ``decay_at_z=True``) and applied to :math:`z` first,
    :math:`z \leftarrow z - \gamma_t \lambda y_{t-1}`, then

    .. math::
       v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
       \delta_t = \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}.

    A step reads :math:`y` (the parameter), :math:`g`, :math:`z`, :math:`x` and
    :math:`v`, and writes all but :math:`g`: 36 bytes per float32 element.
""" + STATE_DOC,
    hyper=(
        _hyper.lr(0.0025),
        _hyper.betas((0.9, 0.999), r":math:`\beta_1 \in [0, 1)`, the interpolation :math:`\beta` between "
                                   r":math:`x` and :math:`z`; :math:`\beta_2 \in [0, 1)`, the second moment's "
                                   "decay rate."),
        _hyper.eps(1e-8),
        _hyper.weight_decay(0.0, r"Decoupled weight decay :math:`\lambda \ge 0`, scaled by the learning rate."),
        *_averaging_hyper(),
        _hyper.flag("decay_at_z", False, "Take the weight decay at z instead of y."),
        _hyper.maximize(),
    ),
    buffers=(_Z, Buffer("exp_avg_sq", sample="positive", doc="second moment :math:`v`"), _X),
    scalars=adamw_scalars,
    **_SCHEDULE_FREE,
    examples=(
        Example("schedule_free_adamw", {}, "Schedule-Free AdamW", bench=True, demo=("adaptive", 0.01)),
        Example("schedule_free_adamw-warmup-wd-r", dict(warmup_steps=4, weight_decay=0.1, r=0.5,
                                                        weight_lr_power=1.0)),
        Example("schedule_free_adamw-decay_at_z-maximize", dict(decay_at_z=True, weight_decay=0.05, maximize=True,
                                                                betas=(0.5, 0.9), eps=1e-3)),
        Example("schedule_free_adamw-unweighted", dict(weight_lr_power=0.0, warmup_steps=2, betas=(0.0, 0.99))),
    ),
)

SCHEDULE_FREE_SGD = RuleSpec(
    name="schedule_free_sgd",
    title="ScheduleFreeSGD",
    summary="Schedule-Free SGD (Defazio et al. 2024): no schedule, an averaged iterate",
    doc=r"""One in-place Schedule-Free SGD step on one array or a list of arrays.""" + SCHEDULE_FREE_DOC + r"""
    SGD's step, with :math:`\beta` = ``momentum`` (the interpolation takes the
    place of momentum) and L2 weight decay added to the gradient at :math:`y`:
    :math:`\delta_t = g_t + \lambda y_{t-1}`. A step reads :math:`y` (the
    parameter), :math:`g`, :math:`z` and :math:`x` and writes all but :math:`g`:
    28 bytes per float32 element.
""" + STATE_DOC,
    hyper=(
        _hyper.lr(1.0),
        Hyper("momentum", 0.9, _checks.open_unit_interval,
              r"The interpolation :math:`\beta \in (0, 1)` between :math:`x` and :math:`z`."),
        _hyper.weight_decay(),
        *_averaging_hyper(),
        _hyper.maximize(),
    ),
    buffers=(_Z, _X),
    scalars=sgd_scalars,
    **_SCHEDULE_FREE,
    examples=(
        Example("schedule_free_sgd", dict(lr=0.1), "Schedule-Free SGD", bench=True, demo=("sgd", 1.0)),
        Example("schedule_free_sgd-warmup-wd-maximize", dict(warmup_steps=5, weight_decay=0.01, momentum=0.5, r=1.0,
                                                             maximize=True)),
        Example("schedule_free_sgd-unweighted", dict(weight_lr_power=0.0, momentum=0.99)),
    ),
)
