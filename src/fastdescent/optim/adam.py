"""``torch.optim.Adam`` and ``torch.optim.AdamW`` on the fused Adam kernels."""

from ..rules.adam import adam_arguments
from .base import Optimizer


class Adam(Optimizer):
    r"""Adam (Kingma & Ba 2015), AMSGrad (Reddi et al. 2018), as ``torch.optim.Adam``.

    Equations: :func:`fastdescent.adam_step`; with ``decoupled_weight_decay=True``
    the decay is AdamW's (:func:`fastdescent.adamw_step`), as in PyTorch.
    ``bias_correction=False`` drops Adam's bias corrections (not in PyTorch).
    Shared keyword options: see :class:`fastdescent.optim.Optimizer`. State:
    ``step``, ``exp_avg``, ``exp_avg_sq`` and (``amsgrad``) ``max_exp_avg_sq``.
    """

    buffer_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    kernel = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=False, bias_correction=True, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                        bias_correction=bias_correction)
        super().__init__(params, defaults, **options)

    def _buffers(self, group):
        wanted = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
        if group["amsgrad"]:
            wanted["max_exp_avg_sq"] = 0.0
        return wanted

    def _arguments(self, group, *, step, fresh, grad_scale):
        return adam_arguments(
            step=step, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
            bias_correction=group["bias_correction"], grad_scale=grad_scale,
        )


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay, as
    ``torch.optim.AdamW`` (weight decay 1e-2 by default). Equations:
    :func:`fastdescent.adamw_step`; everything else as :class:`Adam`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, bias_correction=True, **options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, bias_correction=bias_correction, **options)
