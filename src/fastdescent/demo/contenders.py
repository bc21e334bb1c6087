"""The optimizers the demo races: ``CONTENDERS``, name -> configuration.

Derived from the rule specs (``fastdescent.rules.SPECS``): every example a spec
marks for the demo (``Example.demo``: surface family and MLP learning rate) is a
contender. The race on the loss surfaces and the MLP comparison both iterate
over this dict.
"""

from dataclasses import dataclass, field

import fastdescent
from fastdescent.rules import SPECS


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


#: The rules' examples marked for the demo (``Example.demo``), in the order of their papers.
CONTENDERS = {
    example.name: Contender(example.name, spec.title, {k: v for k, v in example.options.items() if k != "lr"},
                            *example.demo)
    for spec in SPECS.values() for example in spec.examples if example.demo is not None
}
#: everything ``--optimizers`` accepts; Newton runs on the surfaces only
METHODS = (*CONTENDERS, "newton")


def make_optimizer(contender, params, lr, backend="kernel", n_threads=None):
    """A ``fastdescent`` optimizer for ``contender`` over ``params``."""
    cls = getattr(fastdescent, contender.class_name)
    return cls(params, lr=lr, backend=backend, n_threads=n_threads, **contender.hyper)


__all__ = ["CONTENDERS", "METHODS", "Contender", "make_optimizer"]
