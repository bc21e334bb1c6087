"""``torch.optim.Adagrad`` on the fused Adagrad kernel."""

from .. import _checks
from ..rules import adagrad_step
from .base import Optimizer


class Adagrad(Optimizer):
    r"""Adagrad (Duchi, Hazan & Singer 2011), as ``torch.optim.Adagrad``.

    Equations: :func:`fastdescent.adagrad_step`. The accumulator ``sum`` starts at
    ``initial_accumulator_value``. Shared keyword options: see
    :class:`fastdescent.optim.Optimizer`. State: ``step``, ``sum``.
    """

    buffer_names = ("sum",)

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10, *, maximize=False, **options):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _check_extra(self, group):
        _checks.nonnegative("initial_accumulator_value", group["initial_accumulator_value"])

    def _buffers(self, group):
        return {"sum": group["initial_accumulator_value"]}

    def _face(self, group, params, grads, buffers, *, step, fresh, grad_scale, n_threads, backend):
        adagrad_step(
            params, grads, buffers["sum"], step=step,
            lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=group["maximize"],
            grad_scale=grad_scale, n_threads=n_threads, backend=backend,
        )

    def _launch(self, kernels, group, params, grads, buffers, *, step, fresh, grad_scale, n_threads):
        lr, lr_decay = float(group["lr"]), float(group["lr_decay"])
        kernels.adagrad(
            params, grads, buffers["sum"],
            clr=lr / (1.0 + (step - 1) * lr_decay),  # as adagrad_step
            grad_scale=-grad_scale if group["maximize"] else grad_scale,
            weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), n_threads=n_threads,
        )
