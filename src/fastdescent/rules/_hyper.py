"""Hyperparameters shared by many rules, declared once with PyTorch's meaning.

Each function returns a :class:`~fastdescent.rules._spec.Hyper`; a rule passes its
own default (PyTorch's for that rule).
"""

from functools import partial

from .. import _checks
from ._spec import Hyper


def lr(default):
    return Hyper("lr", default, _checks.nonnegative, r"Learning rate :math:`\eta \ge 0`.")


def eps(default, doc=r"Added to the denominator for numerical stability, :math:`\epsilon \ge 0`."):
    return Hyper("eps", default, _checks.nonnegative, doc)


def weight_decay(default=0.0, doc=r'L2 penalty :math:`\lambda \ge 0`, added to the gradient ("coupled").'):
    return Hyper("weight_decay", default, _checks.nonnegative, doc)


def betas(default=(0.9, 0.999),
          doc=r"Decay rates :math:`\beta_1, \beta_2 \in [0, 1)` of the first and second moments."):
    return Hyper("betas", default, _checks.betas_pair, doc, type="(float, float)")


def unit(name, default, doc):
    """A coefficient in [0, 1): momentum, a decay rate."""
    return Hyper(name, default, _checks.unit_interval, doc)


def flag(name, default, doc, keyword_only=False, torch=True):
    return Hyper(name, default, _checks.boolean, doc, type="bool", keyword_only=keyword_only, torch=torch)


def maximize():
    return flag("maximize", False, "Maximize the objective: the gradient's sign is flipped (as it is read).",
                keyword_only=True)


def decoupled_weight_decay(keyword_only=False):
    """AdamW's weight decay as an option (positional in ``torch.optim.NAdam`` and
    ``RAdam``, keyword-only in ``Adam``)."""
    return flag("decoupled_weight_decay", False, "Decay the parameters directly, as AdamW.",
                keyword_only=keyword_only)


def choice(name, default, options, doc, keyword_only=True, torch=False):
    return Hyper(name, default, partial(_checks.choice, options=options), doc,
                 type="{" + ", ".join(repr(o) for o in options) + "}", keyword_only=keyword_only, torch=torch)


def signed_grad_scale(h, grad_scale):
    """``grad_scale``, negated for ``maximize``: the kernels fold the sign into it."""
    return -grad_scale if h["maximize"] else grad_scale
