r"""Second-order and look-ahead methods, for contrast with the kernels' first-order rules.

**Newton's method** models f near :math:`x` by its second-order Taylor expansion
and jumps to the model's minimum, :math:`x - H^{-1} g`: on a quadratic it lands
on the minimum in one step, whatever the conditioning, because the Hessian
rescales every direction by its own curvature. It needs the Hessian (``d*d``
numbers, a ``d^3`` solve), so it suits small dense problems, not networks.
Where the Hessian is not positive definite the Newton "step" heads for a saddle
or a maximum, so :func:`newton_step` falls back to a gradient step there and
says so (Nocedal & Wright, *Numerical Optimization*, 2006, ch. 3).

**Nesterov's accelerated gradient** (Nesterov 1983), in the momentum form of
Sutskever et al. (2013), evaluates the gradient at the look-ahead point
:math:`w + \mu v`:

.. math::
   v_{t} = \mu v_{t-1} - \eta \nabla f(w_{t-1} + \mu v_{t-1}), \qquad
   w_t = w_{t-1} + v_t .

The kernels (``sgd_step(..., nesterov=True)``, as ``torch.optim.SGD``) use the
look-ahead-free form obtained by tracking :math:`\theta = w + \mu v` instead:

.. math::
   v_t = \mu v_{t-1} - \eta \nabla f(\theta_{t-1}), \qquad
   \theta_t = \theta_{t-1} + \mu v_t - \eta \nabla f(\theta_{t-1}),

one gradient per step at the point being updated. :func:`lookahead_nesterov`
records both :math:`w_t` and :math:`\theta_t = w_t + \mu v_t`; the latter is
the path the kernels trace.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .trajectory import Recorder, Trajectory

if TYPE_CHECKING:
    from .surfaces import Surface


@dataclass(frozen=True)
class NewtonStep:
    """One damped Newton step: where it went and how."""

    point: np.ndarray
    #: "newton", or "gradient" where the (damped) Hessian was not positive definite
    direction: str
    #: the step length the line search accepted (0.0 if none decreased f)
    step_size: float


def newton_step(surface: "Surface", x: npt.ArrayLike, *, damping: float = 0.0, armijo: float = 1e-4,
                shrink: float = 0.5, max_halvings: int = 60) -> NewtonStep:
    r"""One damped Newton step on ``surface`` from the point ``x`` (shape ``(d,)``).

    Direction: :math:`p = -(H + \lambda I)^{-1} g`, found by solving the linear
    system (never forming the inverse) once a Cholesky factorization has shown
    :math:`H + \lambda I` positive definite; otherwise the steepest-descent
    direction :math:`p = -g` (reported as ``direction="gradient"``).
    ``damping`` is :math:`\lambda \ge 0` (Levenberg 1944; Marquardt 1963): it
    blends the Newton direction towards the gradient and shortens it.

    Step length: backtracking from :math:`t = 1`, multiplying by ``shrink``
    until the Armijo condition :math:`f(x + t p) \le f(x) + c\, t\, g^\top p`
    holds (``c = armijo``). On a quadratic the full step passes at once.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if not (0 < armijo < 0.5 and 0 < shrink < 1):
        raise ValueError("need 0 < armijo < 0.5 and 0 < shrink < 1")
    x = np.asarray(x, dtype=np.float64)
    g = surface.gradient(x)
    h = surface.hessian(x) + damping * np.eye(len(x))
    try:
        np.linalg.cholesky(h)
        direction, kind = np.linalg.solve(h, -g), "newton"
    except np.linalg.LinAlgError:
        direction, kind = -g, "gradient"
    f0, slope = surface.value(x), float(g @ direction)
    t = 1.0
    for _ in range(max_halvings):
        candidate = x + t * direction
        if surface.value(candidate) <= f0 + armijo * t * slope:
            return NewtonStep(candidate, kind, t)
        t *= shrink
    return NewtonStep(x.copy(), kind, 0.0)


def newton(surface: "Surface", start: npt.ArrayLike | None = None, *, tol: float = 1e-6, max_steps: int = 100,
           damping: float = 0.0, bounds: Sequence[tuple[float, float]] | None = None) -> Trajectory:
    """Damped Newton's method from ``start`` until the gradient norm is at most
    ``tol`` (see :func:`newton_step`). Returns a
    :class:`~fastdescent.demo.trajectory.Trajectory` whose ``fallbacks`` counts the
    steps that fell back to a gradient step; ``stop="stalled"`` if the line
    search found no decrease."""
    recorder = Recorder(surface, tol=tol, max_steps=max_steps, bounds=bounds)
    x = np.array(surface.start if start is None else start, dtype=np.float64)
    fallbacks = 0
    while recorder.record(x) is not None:
        step = newton_step(surface, x, damping=damping)
        fallbacks += step.direction == "gradient"
        if step.step_size == 0.0:
            recorder.stop = "stalled"
            break
        x = step.point
    return recorder.result("newton", fallbacks=fallbacks)


def lookahead_nesterov_step(w: np.ndarray, v: np.ndarray, gradient: Callable[[np.ndarray], np.ndarray], *, lr: float,
                            momentum: float) -> None:
    r"""Sutskever et al.'s Nesterov step, in place on ``w`` and ``v``:
    :math:`v \leftarrow \mu v - \eta \nabla f(w + \mu v)`, then :math:`w \leftarrow w + v`.
    ``gradient(point)`` returns the gradient at a point."""
    g = gradient(w + momentum * v)
    v *= momentum
    v -= lr * g
    w += v


def lookahead_nesterov(surface: "Surface", start: npt.ArrayLike | None = None, *, lr: float, momentum: float = 0.9,
                       tol: float = 1e-6, max_steps: int = 1000,
                       bounds: Sequence[tuple[float, float]] | None = None) -> Trajectory:
    r"""Nesterov's method with the gradient taken at the look-ahead point
    :math:`w + \mu v` (see the module docstring), from ``start`` with
    :math:`v_0 = 0`.

    The returned trajectory's ``path`` holds :math:`w_t`, and
    ``extras["lookahead"]`` holds :math:`\theta_t = w_t + \mu v_t`: the iterates
    of ``sgd_step(..., momentum=mu, nesterov=True)`` started from the same
    point, up to rounding. Stopping is judged at :math:`w_t`.
    """
    recorder = Recorder(surface, tol=tol, max_steps=max_steps, bounds=bounds)
    w = np.array(surface.start if start is None else start, dtype=np.float64)
    v = np.zeros_like(w)
    lookahead = []
    while recorder.record(w) is not None:
        lookahead.append(w + momentum * v)
        lookahead_nesterov_step(w, v, surface.gradient, lr=lr, momentum=momentum)
    lookahead.append(w + momentum * v)
    return recorder.result("nesterov (look-ahead)", extras={"lookahead": np.array(lookahead)})


__all__ = ["NewtonStep", "lookahead_nesterov", "lookahead_nesterov_step", "newton", "newton_step"]
