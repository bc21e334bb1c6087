"""Drop-in ``torch.optim`` optimizers that step with fastdescent's fused kernels.

Each class subclasses its ``torch.optim`` namesake (so it takes the same
arguments with the same defaults, keeps the same ``param_groups`` keys and the
same ``state`` layout, and ``isinstance(opt, torch.optim.Adam)`` holds) and
replaces only ``step``: the parameters of a group that have a gradient are
updated in place, on the tensors' own memory, by one multi-tensor kernel call
per dtype. The update equations are those of the functional faces
(``fastdescent.sgd_step``, ``adagrad_step``, ``rmsprop_step``, ``adam_step``,
``adamw_step``), which follow ``torch.optim``'s for-loop implementation
operation by operation.

What runs: CPU parameters of dtype float32 or float64 (complex64/complex128 as
(real, imaginary) pairs, as ``torch.optim`` does), in any layout: dense ones
(contiguous, channels_last or any other order without gaps) are stepped in place;
gapped views (a slice with a step, a column) are gathered into a scratch block,
stepped and scattered back. A gradient laid out differently from its parameter
is copied first. What raises (naming the parameters): two parameters sharing an
element, a parameter overlapping itself, other devices, half/bfloat16/integer
parameters, sparse gradients, ``differentiable=True``, ``capturable=True``.
``foreach`` and ``fused`` are accepted and kept in the groups (for
``state_dict`` compatibility) but change nothing: the kernel is always the fused
one. With ``torch.amp.GradScaler`` the scaler unscales the gradients itself, as
for any optimizer without native AMP support. A step checks everything before
it writes anything (see :mod:`fastdescent.torch._adapter`).
"""

import torch

from .. import adagrad_step, adam_step, adamw_step, rmsprop_step, sgd_step
from ..rules.adagrad import adagrad_arguments
from ..rules.adam import adam_arguments
from ..rules.rmsprop import rmsprop_arguments
from ..rules.sgd import sgd_arguments
from ._adapter import KernelOptimizer, init_like, kernel_doc, new_step_tensor

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]


class SGD(KernelOptimizer, torch.optim.SGD):
    __doc__ = kernel_doc(torch.optim.SGD)
    __init__ = init_like(torch.optim.SGD)

    def _buffer_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _init_state(self, param, group, state):
        # torch.optim.SGD creates the buffer as a copy of the first (decayed) gradient;
        # the kernel writes it in that first update (first_step=True).
        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return True

    def _update(self, group, params, grads, buffers, step, fresh):
        sgd_step(params, grads, buffers[0] if buffers else None, lr=float(group["lr"]),
                 momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                 weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                 maximize=bool(group["maximize"]), first_step=fresh)

    _kernel, _kernel_buffers = "sgd", ("momentum_buffer",)

    def _arguments(self, group, step, fresh):
        return sgd_arguments(lr=float(group["lr"]), momentum=float(group["momentum"]),
                             dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                             nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]),
                             convention="pytorch", first_step=fresh, grad_scale=1.0)


class Adagrad(KernelOptimizer, torch.optim.Adagrad):
    __doc__ = kernel_doc(torch.optim.Adagrad)
    __init__ = init_like(torch.optim.Adagrad)
    _counts_steps = True
    _step_in_math = True

    def _buffer_names(self, group):
        return ("sum",)

    def _init_state(self, param, group, state):
        # As torch.optim.Adagrad for a parameter added after construction: the
        # optimizer's default initial value, not the group's.
        state["step"] = new_step_tensor(group)
        init = self.defaults["initial_accumulator_value"]
        state["sum"] = torch.full_like(param, complex(init, init) if param.is_complex() else init,
                                       memory_format=torch.preserve_format)
        return False

    def _update(self, group, params, grads, buffers, step, fresh):
        adagrad_step(params, grads, buffers[0], step=int(step), lr=float(group["lr"]),
                     lr_decay=float(group["lr_decay"]), weight_decay=float(group["weight_decay"]),
                     eps=float(group["eps"]), maximize=bool(group["maximize"]))

    _kernel, _kernel_buffers = "adagrad", ("sum",)

    def _arguments(self, group, step, fresh):
        return adagrad_arguments(step=int(step), lr=float(group["lr"]), lr_decay=float(group["lr_decay"]),
                                 weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                                 maximize=bool(group["maximize"]), grad_scale=1.0)


class RMSprop(KernelOptimizer, torch.optim.RMSprop):
    __doc__ = kernel_doc(torch.optim.RMSprop)
    __init__ = init_like(torch.optim.RMSprop)
    _counts_steps = True

    def _buffer_names(self, group):
        return (("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))

    def _update(self, group, params, grads, buffers, step, fresh):
        square_avgs, *rest = buffers
        momentum_buffers = rest.pop(0) if group["momentum"] > 0 else None
        grad_avgs = rest.pop(0) if group["centered"] else None
        rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, lr=float(group["lr"]),
                     alpha=float(group["alpha"]), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
                     centered=bool(group["centered"]), maximize=bool(group["maximize"]))

    _kernel, _kernel_buffers = "rmsprop", ("square_avg", "momentum_buffer", "grad_avg")

    def _arguments(self, group, step, fresh):
        return rmsprop_arguments(lr=float(group["lr"]), alpha=float(group["alpha"]), eps=float(group["eps"]),
                                 weight_decay=float(group["weight_decay"]), momentum=float(group["momentum"]),
                                 maximize=bool(group["maximize"]), grad_scale=1.0)


class _AdamRule(KernelOptimizer):
    """Adam and AdamW share state and step; ``decoupled_weight_decay`` picks the face."""

    _counts_steps = True
    _step_in_math = True

    def _buffer_names(self, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _update(self, group, params, grads, buffers, step, fresh):
        face = adamw_step if group.get("decoupled_weight_decay", False) else adam_step
        beta1, beta2 = group["betas"]
        face(params, grads, *buffers, step=int(step), lr=float(group["lr"]),
             betas=(float(beta1), float(beta2)), eps=float(group["eps"]),
             weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
             maximize=bool(group["maximize"]))

    _kernel, _kernel_buffers = "adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _arguments(self, group, step, fresh):
        beta1, beta2 = group["betas"]
        return adam_arguments(step=int(step), lr=float(group["lr"]), betas=(float(beta1), float(beta2)),
                              eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                              decoupled=bool(group.get("decoupled_weight_decay", False)),
                              maximize=bool(group["maximize"]), bias_correction=True, grad_scale=1.0)


class Adam(_AdamRule, torch.optim.Adam):
    __doc__ = kernel_doc(torch.optim.Adam)
    __init__ = init_like(torch.optim.Adam)


class AdamW(_AdamRule, torch.optim.AdamW):
    __doc__ = kernel_doc(torch.optim.AdamW)
    __init__ = init_like(torch.optim.AdamW)
