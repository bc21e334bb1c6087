"""``torch.optim.Adam`` and ``torch.optim.AdamW`` on the fused Adam kernels."""

import math

from ..rules import adam_step, adamw_step
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

    def _face(self, group, params, grads, buffers, *, step, fresh, grad_scale, n_threads, backend):
        face = adamw_step if group["decoupled_weight_decay"] else adam_step
        face(
            params, grads, buffers["exp_avg"], buffers["exp_avg_sq"], buffers.get("max_exp_avg_sq"), step=step,
            lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"], maximize=group["maximize"], bias_correction=group["bias_correction"],
            grad_scale=grad_scale, n_threads=n_threads, backend=backend,
        )

    def _launch(self, kernels, group, params, grads, buffers, *, step, fresh, grad_scale, n_threads):
        lr = float(group["lr"])
        beta1, beta2 = (float(beta) for beta in group["betas"])
        if group["bias_correction"]:  # as adam_step
            step_size, bias_correction2_sqrt = lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)
        else:
            step_size, bias_correction2_sqrt = lr, 1.0
        kernels.adam(
            params, grads, buffers["exp_avg"], buffers["exp_avg_sq"], buffers.get("max_exp_avg_sq"),
            lr=lr, step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt, beta1=beta1, beta2=beta2,
            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            decoupled=bool(group["decoupled_weight_decay"]),
            grad_scale=-grad_scale if group["maximize"] else grad_scale, n_threads=n_threads,
        )


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay, as
    ``torch.optim.AdamW`` (weight decay 1e-2 by default). Equations:
    :func:`fastdescent.adamw_step`; everything else as :class:`Adam`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, bias_correction=True, **options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, bias_correction=bias_correction, **options)
