"""``python -m fastdescent demo``: the optimizers at work, in tables and pictures.

Sections (``--sections`` picks some; all run by default, in this order):

* ``race``: every optimizer and Newton's method on classic loss surfaces
  (a ravine, Rosenbrock, Beale, Himmelblau, two saddles, Rastrigin);
* ``mlp``: a NumPy MLP on scikit-learn's bundled digits with every optimizer,
  kernel vs reference: accuracy, time per step, parameter difference (0);
* ``batch-size``: full batch vs mini-batches vs single samples: loss per
  epoch and per second, time per epoch;
* ``schedules``: SGD with momentum under constant, step, exponential, cosine,
  SGDR, cyclic (triangular, triangular2) and one-cycle learning rates;
* ``momentum``: momentum annealed from 0.5 to 0.9 vs a fixed 0.9;
* ``plateau``: reduce-on-plateau and early stopping that restores the best weights;
* ``averaging``: SWA and EMA vs the final weights, repeated with the reference
  backend (largest difference: 0);
* ``precision``: the MLP with every optimizer's state in float32, bfloat16 and
  int8 (nearest and stochastic rounding), and :math:`10^4` steps of Adam and SGD
  on quadratics with bfloat16 parameters (nearest, stochastic, float32 master).

With matplotlib, PNG pictures of each go to the output folder.

This subpackage also holds the pieces the demo is built from; none is needed
to use the library: ``surfaces`` (value, gradient and Hessian of each surface),
``trajectory`` (an optimizer's path on a surface), ``newton`` (damped Newton,
look-ahead Nesterov), ``data`` (seeded shuffled mini-batches), ``mlp`` (a NumPy
MLP with its backward pass), ``plots``; the sections ``race``, ``training`` and
``recipes``, ``low_precision``; ``contenders`` (the optimizers raced, from the rule specs) and ``runner``
(the command line).
"""

from .runner import SECTIONS, add_arguments, run

__all__ = ["SECTIONS", "add_arguments", "run"]
