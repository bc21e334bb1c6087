"""The adaptive rules' option combinations and how to drive them, shared by their tests."""

import numpy as np

import fastdescent as fd
from support import random_array

#: State buffer names of each face, in its positional order after (params, grads).
STATE = {
    fd.adagrad_step: ("state_sum",),
    fd.rmsprop_step: ("square_avg", "momentum_buffer", "grad_avg"),
    fd.adam_step: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    fd.adamw_step: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}
#: Faces that take the 1-based step index.
COUNTED = (fd.adagrad_step, fd.adam_step, fd.adamw_step)

#: name -> (face, options). Every buffer combination (momentum, centered, amsgrad),
#: both weight-decay forms, both lerp branches (decay >= 0.5 and < 0.5), maximize,
#: grad_scale and bias_correction=False each appear at least once.
CONFIGS = {
    "adagrad": (fd.adagrad_step, dict()),
    "adagrad-lr_decay-wd": (fd.adagrad_step, dict(lr_decay=0.05, weight_decay=0.02)),
    "adagrad-maximize-scale-eps": (fd.adagrad_step, dict(maximize=True, grad_scale=0.37, eps=1e-3)),
    "rmsprop": (fd.rmsprop_step, dict()),
    "rmsprop-momentum-wd": (fd.rmsprop_step, dict(momentum=0.9, weight_decay=0.01)),
    "rmsprop-centered-maximize-scale": (fd.rmsprop_step, dict(centered=True, maximize=True, grad_scale=2.0)),
    "rmsprop-centered-momentum-wd": (fd.rmsprop_step, dict(centered=True, momentum=0.8, alpha=0.9, weight_decay=0.01)),
    "rmsprop-centered-alpha0.3": (fd.rmsprop_step, dict(centered=True, alpha=0.3, eps=1e-4)),
    "adam": (fd.adam_step, dict()),
    "adam-wd-maximize-scale": (fd.adam_step, dict(weight_decay=0.05, maximize=True, grad_scale=0.5)),
    "adam-amsgrad": (fd.adam_step, dict(amsgrad=True)),
    "adam-amsgrad-beta1_0-wd": (fd.adam_step, dict(amsgrad=True, betas=(0.0, 0.99), weight_decay=0.01)),
    "adam-beta1_0.2-no-bias-correction": (fd.adam_step, dict(betas=(0.2, 0.9), bias_correction=False, eps=1e-3)),
    "adamw": (fd.adamw_step, dict()),
    "adamw-amsgrad-maximize": (fd.adamw_step, dict(amsgrad=True, maximize=True, weight_decay=0.1)),
    "adamw-no-decay": (fd.adamw_step, dict(weight_decay=0.0, betas=(0.5, 0.9))),
}


def used_state(face, options):
    """The state buffers ``face`` needs with ``options``."""
    needed = {
        "momentum_buffer": options.get("momentum", 0.0) > 0.0,
        "grad_avg": bool(options.get("centered")),
        "max_exp_avg_sq": bool(options.get("amsgrad")),
    }
    return [name for name in STATE[face] if needed.get(name, True)]


def make_state(rng, n, dtype, face, options):
    """Random parameter and state; second moments positive, a centered variance too."""
    state = {"param": random_array(rng, n, dtype)}
    for name in used_state(face, options):
        if name in ("state_sum", "exp_avg_sq", "max_exp_avg_sq"):
            state[name] = random_array(rng, n, dtype, scale=0.5, positive=True) * dtype(0.1)
        elif name == "square_avg":
            continue  # after grad_avg: it must exceed grad_avg**2
        else:
            state[name] = random_array(rng, n, dtype, scale=0.1)
    if "square_avg" in used_state(face, options):
        floor = state["grad_avg"] ** 2 if "grad_avg" in state else np.zeros(n, dtype)
        state["square_avg"] = floor + random_array(rng, n, dtype, scale=0.5, positive=True) * dtype(0.1)
    return state


def take_step(face, options, state, grad, *, lr, step, **call):
    """One step of ``face`` on the buffers in ``state`` (absent ones are None)."""
    buffers = [state.get(name) for name in STATE[face]]
    counted = {"step": step} if face in COUNTED else {}
    face(state["param"], grad, *buffers, lr=lr, **counted, **options, **call)


def driver(face, options):
    """A ``step`` for support.check_backends_agree."""
    def step(backend, state, grad, lr, t, n_threads):
        take_step(face, options, state, grad, lr=lr, step=t + 1, backend=backend, n_threads=n_threads)
    return step
