"""``torch.optim.RMSprop`` on the fused RMSprop kernel."""

from ..rules.rmsprop import rmsprop_arguments
from .base import Optimizer


class RMSprop(Optimizer):
    r"""RMSprop (Tieleman & Hinton 2012; centered: Graves 2013), as ``torch.optim.RMSprop``.

    Equations: :func:`fastdescent.rmsprop_step`. Shared keyword options: see
    :class:`fastdescent.optim.Optimizer`. State: ``step``, ``square_avg``, and
    ``momentum_buffer`` (``momentum > 0``) and ``grad_avg`` (``centered``), all
    starting at zero.
    """

    buffer_names = ("square_avg", "momentum_buffer", "grad_avg")
    kernel = "rmsprop"

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

    def _arguments(self, group, *, step, fresh, grad_scale):
        return rmsprop_arguments(lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                                 weight_decay=group["weight_decay"], momentum=group["momentum"],
                                 maximize=group["maximize"], grad_scale=grad_scale)
