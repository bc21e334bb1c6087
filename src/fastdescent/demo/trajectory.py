"""Run an optimizer on a loss surface and record its path.

::

    from functools import partial
    import fastdescent as fd
    from fastdescent.demo.surfaces import ROSENBROCK
    from fastdescent.demo.trajectory import run_trajectory

    path = run_trajectory(ROSENBROCK, partial(fd.Adam, lr=0.05), max_steps=2000)
    print(path.stop, path.steps, path.final_value)

Any optimizer with the ``torch.optim``-like face works: built over a list of
arrays, ``opt.step(grads)`` with the gradients aligned to them, learning rates in
``opt.param_groups[i]["lr"]``.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from .surfaces import Surface

#: Why a run stopped.
STOPS = ("converged", "budget", "left bounds", "diverged", "stalled")


@dataclass
class Trajectory:
    """The points a method visited on a surface, and why it stopped.

    ``path[0]`` is the start and ``path[-1]`` the last point; ``values`` and
    ``grad_norms`` hold f and the gradient's Euclidean norm at each of them.
    """

    label: str
    path: np.ndarray
    values: np.ndarray
    grad_norms: np.ndarray
    #: one of ``STOPS``
    stop: str
    #: Newton: how many steps fell back to a gradient step (Hessian not positive definite)
    fallbacks: int = 0
    #: method-specific recordings (e.g. the look-ahead points of Nesterov's method)
    extras: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.path) - 1

    @property
    def converged(self) -> bool:
        return self.stop == "converged"

    @property
    def final_point(self) -> np.ndarray:
        return self.path[-1]

    @property
    def final_value(self) -> float:
        return float(self.values[-1])

    def escaped(self, surface: "Surface", radius: float = 0.5) -> bool | None:
        """Whether the run got away from the surface's saddle points: it ended
        farther than ``radius`` from each of them, lower than the saddle. None if
        the surface has no saddles."""
        if len(surface.saddles) == 0:
            return None
        end = self.path[-1]
        if not np.all(np.isfinite(end)):
            return True  # ran off to -infinity along a descending valley
        far = np.linalg.norm(surface.saddles - end, axis=-1) > radius
        lower = self.values[-1] < surface.value(surface.saddles)
        return bool(np.all(far & lower))


class Recorder:
    """Accumulates points of a run on ``surface`` and decides when it stops.

    Shared by every method (first-order optimizers, Newton, look-ahead
    Nesterov), so they all stop by the same rules: gradient norm at most
    ``tol``, ``max_steps`` taken, a non-finite point, or (with ``bounds``, one
    ``(low, high)`` per coordinate) a point outside the box.
    """

    def __init__(self, surface: "Surface", *, tol: float, max_steps: int,
                 bounds: Sequence[tuple[float, float]] | None = None) -> None:
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        if tol < 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        self.surface, self.tol, self.max_steps = surface, tol, max_steps
        self.bounds = None if bounds is None else np.asarray(bounds, dtype=np.float64).reshape(-1, 2)
        self.path: list[np.ndarray] = []
        self.values: list[float] = []
        self.grad_norms: list[float] = []
        self.gradient = None
        self.stop: str | None = None

    def record(self, point: npt.ArrayLike) -> np.ndarray | None:
        """Record ``point``; return its gradient (float64), or None once the run must stop."""
        point = np.array(point, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is an outcome, reported below
            value = float(self.surface.value(point))
            gradient = self.surface.gradient(point)
            norm = float(np.linalg.norm(gradient))
        self.path.append(point)
        self.values.append(value)
        self.grad_norms.append(norm)
        if not (np.all(np.isfinite(point)) and np.isfinite(value) and np.isfinite(norm)):
            self.stop = "diverged"
        elif self.bounds is not None and np.any((point < self.bounds[:, 0]) | (point > self.bounds[:, 1])):
            self.stop = "left bounds"
        elif norm <= self.tol:
            self.stop = "converged"
        elif len(self.path) > self.max_steps:
            self.stop = "budget"
        return None if self.stop else gradient

    def result(self, label: str, **kwargs: Any) -> Trajectory:
        assert self.stop is not None, "the run has not stopped yet"
        return Trajectory(label, np.array(self.path), np.array(self.values), np.array(self.grad_norms),
                          self.stop, **kwargs)


def run_trajectory(surface: "Surface", make_optimizer: Callable[[list[np.ndarray]], Any],
                   start: npt.ArrayLike | None = None, *, tol: float = 1e-6, max_steps: int = 1000,
                   schedule: Callable[[int], float] | None = None,
                   bounds: Sequence[tuple[float, float]] | None = None, dtype: npt.DTypeLike = np.float64,
                   label: str | None = None) -> Trajectory:
    """Descend ``surface`` from ``start`` with an optimizer; return the :class:`Trajectory`.

    Parameters
    ----------
    surface : fastdescent.demo.surfaces.Surface
    make_optimizer : callable
        ``make_optimizer([w]) -> optimizer`` for the parameter array ``w``, e.g.
        ``functools.partial(fastdescent.Adam, lr=0.05, backend="reference")``.
        The optimizer updates ``w`` in place with ``step([grad])``.
    start : array_like, optional
        The start point; the surface's ``start`` by default.
    tol : float
        Stop once the gradient norm at the current point is at most ``tol``.
    max_steps : int
        Step budget.
    schedule : callable, optional
        ``schedule(t) -> lr`` for the step about to be taken, ``t = 0, 1, ...``
        (optax's convention); written into every ``param_groups[i]["lr"]``.
    bounds : sequence of (low, high), optional
        Stop when the point leaves this box (escaping a saddle on a surface
        unbounded below would otherwise run to overflow).
    dtype : float32 or float64
        Dtype of the parameter and gradient arrays the optimizer works on; the
        recorded path is float64.
    """
    recorder = Recorder(surface, tol=tol, max_steps=max_steps, bounds=bounds)
    w = np.array(surface.start if start is None else start, dtype=dtype)
    optimizer = make_optimizer([w])
    gradient = recorder.record(w)
    t = 0
    while gradient is not None:
        if schedule is not None:
            lr = schedule(t)
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.step([np.ascontiguousarray(gradient, dtype=dtype)])
        t += 1
        gradient = recorder.record(w)
    return recorder.result(label or type(optimizer).__name__)


__all__ = ["STOPS", "Recorder", "Trajectory", "run_trajectory"]
