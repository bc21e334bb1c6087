"""The optimizers the demo races: one registry, ``CONTENDERS``, name -> configuration.

The race on the loss surfaces and the MLP comparison both iterate over this dict;
add or change an optimizer here and both follow.
"""

from dataclasses import dataclass, field

import fastdescent


@dataclass(frozen=True)
class Contender:
    """A first-order optimizer configuration raced in the demo."""

    name: str
    #: the optimizer class, an attribute of ``fastdescent``
    class_name: str
    #: hyperparameters besides the learning rate
    hyper: dict = field(default_factory=dict)
    #: which learning rate it takes on the surfaces (a key of ``Race.lr``)
    family: str = "sgd"
    #: learning rate for the MLP
    mlp_lr: float = 0.1


CONTENDERS = {c.name: c for c in [
    Contender("sgd", "SGD", {}, "sgd", 0.1),
    Contender("momentum", "SGD", {"momentum": 0.9}, "momentum", 0.05),
    Contender("nesterov", "SGD", {"momentum": 0.9, "nesterov": True}, "momentum", 0.05),
    Contender("adagrad", "Adagrad", {}, "adagrad", 0.05),
    Contender("rmsprop", "RMSprop", {}, "adaptive", 1e-3),
    Contender("adam", "Adam", {}, "adaptive", 1e-3),
    Contender("adamw", "AdamW", {"weight_decay": 1e-2}, "adaptive", 1e-3),
]}
#: everything ``--optimizers`` accepts; Newton runs on the surfaces only
METHODS = (*CONTENDERS, "newton")


def make_optimizer(contender, params, lr, backend="kernel", n_threads=None):
    """A ``fastdescent`` optimizer for ``contender`` over ``params``."""
    cls = getattr(fastdescent, contender.class_name)
    return cls(params, lr=lr, backend=backend, n_threads=n_threads, **contender.hyper)


__all__ = ["CONTENDERS", "METHODS", "Contender", "make_optimizer"]
