"""``torch.optim.SGD`` on the fused SGD kernel."""

from ..rules import sgd_step
from .base import FIRST_GRADIENT, Optimizer


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional (Nesterov) momentum, as ``torch.optim.SGD``.

    Equations, conventions and the papers: :func:`fastdescent.sgd_step`. In
    PyTorch's convention the momentum buffer starts as the first gradient
    (created at the first step with ``momentum > 0``); ``convention="classical"``
    keeps the learning rate inside a zero-initialized buffer.

    ``params``: a list of arrays or of parameter-group dicts; the keyword options
    shared by every optimizer (``flat``, ``clip_grad_norm``, ``clip_grad_value``,
    ``skip_nonfinite``, ``backend``, ``n_threads``) are described in
    :class:`fastdescent.optim.Optimizer`. State: ``momentum_buffer``.
    """

    buffer_names = ("momentum_buffer",)
    counts_steps = False

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, convention="pytorch", **options):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, convention=convention)
        super().__init__(params, defaults, **options)

    def _buffers(self, group):
        if group["momentum"] == 0:
            return {}
        return {"momentum_buffer": FIRST_GRADIENT if group["convention"] == "pytorch" else 0.0}

    def _face(self, group, params, grads, buffers, *, step, fresh, grad_scale, n_threads, backend):
        sgd_step(
            params, grads, buffers.get("momentum_buffer"),
            lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"],
            convention=group["convention"],
            first_step="momentum_buffer" in fresh and group["convention"] == "pytorch",
            grad_scale=grad_scale, n_threads=n_threads, backend=backend,
        )

    def _launch(self, kernels, group, params, grads, buffers, *, step, fresh, grad_scale, n_threads):
        pytorch = group["convention"] == "pytorch"
        kernels.sgd(
            params, grads, buffers.get("momentum_buffer"),
            lr=float(group["lr"]), grad_scale=-grad_scale if group["maximize"] else grad_scale,
            weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
            dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]), classical=not pytorch,
            first_step=pytorch and "momentum_buffer" in fresh, n_threads=n_threads,
        )
