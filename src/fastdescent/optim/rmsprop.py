"""``torch.optim.RMSprop`` on the fused RMSprop kernel."""

from ..rules import rmsprop_step
from .base import Optimizer


class RMSprop(Optimizer):
    r"""RMSprop (Tieleman & Hinton 2012; centered: Graves 2013), as ``torch.optim.RMSprop``.

    Equations: :func:`fastdescent.rmsprop_step`. Shared keyword options: see
    :class:`fastdescent.optim.Optimizer`. State: ``step``, ``square_avg``, and
    ``momentum_buffer`` (``momentum > 0``) and ``grad_avg`` (``centered``), all
    starting at zero.
    """

    buffer_names = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, **options):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _buffers(self, group):
        wanted = {"square_avg": 0.0}
        if group["momentum"] != 0:
            wanted["momentum_buffer"] = 0.0
        if group["centered"]:
            wanted["grad_avg"] = 0.0
        return wanted

    def _face(self, group, params, grads, buffers, *, step, fresh, grad_scale, n_threads, backend):
        rmsprop_step(
            params, grads, buffers["square_avg"], buffers.get("momentum_buffer"), buffers.get("grad_avg"),
            lr=group["lr"], alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
            momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"],
            grad_scale=grad_scale, n_threads=n_threads, backend=backend,
        )

    def _launch(self, kernels, group, params, grads, buffers, *, step, fresh, grad_scale, n_threads):
        kernels.rmsprop(
            params, grads, buffers["square_avg"], buffers.get("momentum_buffer"), buffers.get("grad_avg"),
            lr=float(group["lr"]), alpha=float(group["alpha"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
            grad_scale=-grad_scale if group["maximize"] else grad_scale, n_threads=n_threads,
        )
