r"""Loss surfaces for watching optimizers move: value, gradient and Hessian.

Each surface is vectorized over points: ``x`` is an array of shape ``(..., d)``
and ``value(x)`` has shape ``(...)``, ``gradient(x)`` shape ``(..., d)`` and
``hessian(x)`` shape ``(..., d, d)``, so a whole contour grid is one call::

    xs, ys = np.meshgrid(np.linspace(-2, 2, 200), np.linspace(-1, 3, 200))
    z = ROSENBROCK.value(np.stack([xs, ys], axis=-1))

Each knows its minima (``minima``, shape ``(k, d)``; empty when the surface is
unbounded below), its saddle points where they are the point of the surface, a
plotting window and a start point from which the demo races the optimizers.

The catalogue (``SURFACES``) is the classic test bed of optimization:

* an ill-conditioned quadratic **ravine** (pathological curvature: the gradient
  points across the valley, not along it);
* **Rosenbrock**'s curved valley (Rosenbrock 1960), **Beale**'s flat plateaus
  with steep walls (Beale 1958), **Himmelblau**'s four minima (Himmelblau 1972);
* the **saddle** :math:`x^2 - y^2` and the degenerate **monkey saddle**
  :math:`x^3 - 3xy^2` (its Hessian vanishes at the saddle, so gradients fade
  quadratically as one approaches it);
* **Rastrigin**'s egg crate of local minima (Rastrigin 1974).
"""

import math
from typing import Any

import numpy as np
import numpy.typing as npt


def _points(x, dim):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"points must have shape (..., {dim}), got {x.shape}")
    return x


class Surface:
    """A twice-differentiable function of ``dim`` variables, vectorized over points.

    Subclasses implement ``_value``, ``_gradient`` and ``_hessian`` on a
    floating array of shape ``(..., dim)``; the public methods check the shape.
    """

    #: short name used by the demo, file names and the ``SURFACES`` registry
    name = ""
    #: one line saying what the surface shows
    description = ""

    def __init__(self, dim, *, minima=(), minimum_value=None, saddles=(), window, start):
        self.dim = dim
        self.minima = np.asarray(minima, dtype=np.float64).reshape(-1, dim)
        #: value at the global minimum, or None when the surface is unbounded below
        self.minimum_value = minimum_value
        self.saddles = np.asarray(saddles, dtype=np.float64).reshape(-1, dim)
        #: ``((xmin, xmax), (ymin, ymax))`` for contour plots (first two coordinates)
        self.window = tuple(tuple(float(v) for v in lim) for lim in window)
        self.start = np.asarray(start, dtype=np.float64)

    def _value(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _gradient(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _hessian(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def value(self, x: npt.ArrayLike) -> npt.NDArray[Any]:
        """f(x) for points ``x`` of shape ``(..., dim)``; returns shape ``(...)``."""
        return self._value(_points(x, self.dim))

    def gradient(self, x: npt.ArrayLike) -> npt.NDArray[Any]:
        """The gradient, shape ``(..., dim)``."""
        return self._gradient(_points(x, self.dim))

    def hessian(self, x: npt.ArrayLike) -> npt.NDArray[Any]:
        """The Hessian, shape ``(..., dim, dim)`` (symmetric)."""
        return self._hessian(_points(x, self.dim))

    def grid(self, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(xs, ys, values)`` on an ``n`` x ``n`` grid over the window (2-D surfaces)."""
        if self.dim != 2:
            raise ValueError(f"grid() needs a 2-D surface; {self.name} has dim={self.dim}")
        (x0, x1), (y0, y1) = self.window
        xs, ys = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
        return xs, ys, self.value(np.stack([xs, ys], axis=-1))

    def __repr__(self):
        return f"<Surface {self.name} dim={self.dim}>"


def _hessian_2d(fxx, fxy, fyy):
    return np.stack([np.stack([fxx, fxy], axis=-1), np.stack([fxy, fyy], axis=-1)], axis=-2)


class Quadratic(Surface):
    r""":math:`f(w) = \tfrac12 (w - c)^\top A (w - c)` with ``A`` symmetric positive definite.

    The condition number of ``A`` (largest over smallest eigenvalue) sets how
    narrow the ravine is; gradient descent's stable step is bounded by the
    steepest direction (:math:`\eta < 2/\lambda_{max}`) while progress along the
    valley floor goes as :math:`\eta \lambda_{min}`. Newton's method lands on
    ``c`` in one step.
    """

    name = "quadratic"
    description = "ill-conditioned quadratic ravine (pathological curvature)"

    def __init__(self, matrix, center=None, *, window=None, start=None, name=None, description=None):
        matrix = np.array(matrix, dtype=np.float64)
        dim = matrix.shape[0]
        if matrix.shape != (dim, dim) or not np.allclose(matrix, matrix.T):
            raise ValueError(f"matrix must be square and symmetric, got shape {matrix.shape}")
        if np.linalg.eigvalsh(matrix)[0] <= 0:
            raise ValueError("matrix must be positive definite")
        center = np.zeros(dim) if center is None else np.asarray(center, dtype=np.float64)
        self.matrix = matrix
        self.center = center
        if name is not None:
            self.name = name
        if description is not None:
            self.description = description
        super().__init__(
            dim, minima=[center], minimum_value=0.0,
            window=window or [(c - 2.0, c + 2.0) for c in center[:2]],
            start=center + 1.0 if start is None else start,
        )

    @classmethod
    def ravine(cls, condition=100.0, angle=math.pi / 6, **kwargs):
        """A 2-D ravine: curvatures ``1`` and ``condition``, axes turned by ``angle``
        (a tilted valley, so no per-coordinate scaling straightens it)."""
        c, s = math.cos(angle), math.sin(angle)
        rotation = np.array([[c, -s], [s, c]])
        matrix = rotation @ np.diag([1.0, float(condition)]) @ rotation.T
        return cls((matrix + matrix.T) / 2, **kwargs)

    def _value(self, x):
        d = x - self.center
        return 0.5 * np.einsum("...i,ij,...j->...", d, self.matrix, d)

    def _gradient(self, x):
        return (x - self.center) @ self.matrix

    def _hessian(self, x):
        return np.broadcast_to(self.matrix, x.shape + (self.dim,)).copy()


class Rosenbrock(Surface):
    r"""Rosenbrock's valley in ``dim`` variables (Rosenbrock 1960):

    .. math::
       f(x) = \sum_{i=1}^{d-1} b\,(x_{i+1} - x_i^2)^2 + (1 - x_i)^2

    A curved, narrow, nearly flat valley; global minimum :math:`f(1, \dots, 1) = 0`.
    (For :math:`4 \le d \le 7` there is also a local minimum near
    :math:`(-1, 1, \dots, 1)`; ``minima`` lists the global one.)
    """

    name = "rosenbrock"
    description = "curved narrow valley, minimum at (1, 1)"

    def __init__(self, dim=2, b=100.0):
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.b = float(b)
        super().__init__(dim, minima=[np.ones(dim)], minimum_value=0.0,
                         window=[(-2.0, 2.0), (-1.0, 3.0)], start=[-1.5, 2.0] + [1.0] * (dim - 2))

    def _value(self, x):
        head, tail = x[..., :-1], x[..., 1:]
        return np.sum(self.b * (tail - head**2) ** 2 + (1.0 - head) ** 2, axis=-1)

    def _gradient(self, x):
        head, tail = x[..., :-1], x[..., 1:]
        inner = tail - head**2
        g = np.zeros_like(x)
        g[..., :-1] = -4.0 * self.b * head * inner - 2.0 * (1.0 - head)
        g[..., 1:] += 2.0 * self.b * inner
        return g

    def _hessian(self, x):
        b, d = self.b, self.dim
        head, tail = x[..., :-1], x[..., 1:]
        h = np.zeros(x.shape + (d,), dtype=x.dtype)
        i = np.arange(d - 1)
        h[..., i, i] = 12.0 * b * head**2 - 4.0 * b * tail + 2.0
        h[..., i + 1, i + 1] += 2.0 * b
        h[..., i, i + 1] = h[..., i + 1, i] = -4.0 * b * head
        return h


class Beale(Surface):
    r"""Beale's function (Beale 1958):

    .. math::
       f(x, y) = \sum_{k=1}^{3} (c_k - x + x y^k)^2, \quad c = (1.5, 2.25, 2.625)

    Flat plateaus bounded by steep walls; global minimum :math:`f(3, 0.5) = 0`
    (and a saddle at (0, 1)).
    """

    name = "beale"
    description = "plateaus and steep walls, minimum at (3, 0.5)"
    _c = (1.5, 2.25, 2.625)

    def __init__(self):
        super().__init__(2, minima=[(3.0, 0.5)], minimum_value=0.0,
                         window=[(-1.5, 4.5), (-2.5, 2.5)], start=[1.0, 1.5])

    def _residuals(self, x):
        """Per k: residual r_k, its partials (rx, ry) and second partials (rxy, ryy); rxx = 0."""
        px, py = x[..., 0], x[..., 1]
        for k, c in enumerate(self._c, start=1):
            yield (c - px + px * py**k, py**k - 1.0, k * px * py ** (k - 1),
                   k * py ** (k - 1), k * (k - 1) * px * py ** (k - 2) if k > 1 else 0.0)

    def _value(self, x):
        return sum(r**2 for r, *_ in self._residuals(x))

    def _gradient(self, x):
        gx = gy = 0.0
        for r, rx, ry, _, _ in self._residuals(x):
            gx = gx + 2.0 * r * rx
            gy = gy + 2.0 * r * ry
        return np.stack(np.broadcast_arrays(gx, gy), axis=-1)

    def _hessian(self, x):
        fxx = fxy = fyy = 0.0
        for r, rx, ry, rxy, ryy in self._residuals(x):
            fxx = fxx + 2.0 * rx * rx
            fxy = fxy + 2.0 * (rx * ry + r * rxy)
            fyy = fyy + 2.0 * (ry * ry + r * ryy)
        return _hessian_2d(*np.broadcast_arrays(fxx, fxy, fyy))


class Himmelblau(Surface):
    r"""Himmelblau's function (Himmelblau 1972):

    .. math:: f(x, y) = (x^2 + y - 11)^2 + (x + y^2 - 7)^2

    Four global minima, all with value 0, a local maximum near
    (-0.2708, -0.9230) and four saddles between them: where a descent ends
    depends on where it starts.
    """

    name = "himmelblau"
    description = "four minima; the start decides which one"

    def __init__(self):
        super().__init__(
            2,
            minima=[(3.0, 2.0),
                    (-2.805118086952745, 3.131312518250573),
                    (-3.779310253377747, -3.2831859912861696),
                    (3.5844283403304917, -1.8481265269644034)],
            minimum_value=0.0, window=[(-5.0, 5.0), (-5.0, 5.0)], start=[0.0, -0.9],
        )

    def _value(self, x):
        px, py = x[..., 0], x[..., 1]
        return (px**2 + py - 11.0) ** 2 + (px + py**2 - 7.0) ** 2

    def _gradient(self, x):
        px, py = x[..., 0], x[..., 1]
        p, q = px**2 + py - 11.0, px + py**2 - 7.0
        return np.stack([4.0 * px * p + 2.0 * q, 2.0 * p + 4.0 * py * q], axis=-1)

    def _hessian(self, x):
        px, py = x[..., 0], x[..., 1]
        return _hessian_2d(12.0 * px**2 + 4.0 * py - 42.0, 4.0 * (px + py), 12.0 * py**2 + 4.0 * px - 26.0)


class Saddle(Surface):
    r"""The saddle :math:`f(x, y) = x^2 - y^2`: a minimum along x, a maximum along y.

    Unbounded below (no minima). Plain gradient descent started near the x-axis
    leaves the saddle only as fast as the tiny y-component grows; pure Newton
    would jump straight onto the saddle point, because it seeks any stationary point.
    """

    name = "saddle"
    description = "x^2 - y^2: saddle at the origin, no minimum"

    def __init__(self):
        super().__init__(2, saddles=[(0.0, 0.0)], window=[(-2.0, 2.0), (-2.0, 2.0)], start=[-1.5, 1e-3])

    def _value(self, x):
        return x[..., 0] ** 2 - x[..., 1] ** 2

    def _gradient(self, x):
        return np.stack([2.0 * x[..., 0], -2.0 * x[..., 1]], axis=-1)

    def _hessian(self, x):
        two = np.full(x.shape[:-1], 2.0)
        return _hessian_2d(two, np.zeros_like(two), -two)


class MonkeySaddle(Surface):
    r"""The monkey saddle :math:`f(x, y) = x^3 - 3 x y^2` (three valleys, three ridges).

    A degenerate saddle: gradient and Hessian both vanish at the origin, so a
    gradient step shrinks quadratically on the way in and first-order methods
    without momentum crawl towards the saddle. Unbounded below.
    """

    name = "monkey_saddle"
    description = "x^3 - 3xy^2: degenerate saddle, gradients fade near it"

    def __init__(self):
        super().__init__(2, saddles=[(0.0, 0.0)], window=[(-1.5, 1.5), (-1.5, 1.5)], start=[1.0, 1e-3])

    def _value(self, x):
        px, py = x[..., 0], x[..., 1]
        return px**3 - 3.0 * px * py**2

    def _gradient(self, x):
        px, py = x[..., 0], x[..., 1]
        return np.stack([3.0 * (px**2 - py**2), -6.0 * px * py], axis=-1)

    def _hessian(self, x):
        px, py = x[..., 0], x[..., 1]
        return _hessian_2d(6.0 * px, -6.0 * py, -6.0 * px)


class Rastrigin(Surface):
    r"""Rastrigin's function in ``dim`` variables (Rastrigin 1974):

    .. math:: f(x) = A d + \sum_i \left(x_i^2 - A \cos(2 \pi x_i)\right), \quad A = 10

    A bowl covered in local minima near every integer point; global minimum
    :math:`f(0) = 0`.
    """

    name = "rastrigin"
    description = "egg crate of local minima, global minimum at the origin"

    def __init__(self, dim=2, amplitude=10.0):
        self.amplitude = float(amplitude)
        super().__init__(dim, minima=[np.zeros(dim)], minimum_value=0.0,
                         window=[(-5.12, 5.12), (-5.12, 5.12)], start=[2.3, -1.8] + [1.0] * (dim - 2))

    def _value(self, x):
        a = self.amplitude
        return a * self.dim + np.sum(x**2 - a * np.cos(2.0 * math.pi * x), axis=-1)

    def _gradient(self, x):
        return 2.0 * x + 2.0 * math.pi * self.amplitude * np.sin(2.0 * math.pi * x)

    def _hessian(self, x):
        diagonal = 2.0 + 4.0 * math.pi**2 * self.amplitude * np.cos(2.0 * math.pi * x)
        h = np.zeros(x.shape + (self.dim,), dtype=x.dtype)
        i = np.arange(self.dim)
        h[..., i, i] = diagonal
        return h


RAVINE = Quadratic.ravine(
    condition=100.0, name="ravine", description="ill-conditioned quadratic ravine (condition number 100, tilted)",
    window=[(-2.5, 2.5), (-2.5, 2.5)], start=[-2.0, 1.0],
)
ROSENBROCK = Rosenbrock()
BEALE = Beale()
HIMMELBLAU = Himmelblau()
SADDLE = Saddle()
MONKEY_SADDLE = MonkeySaddle()
RASTRIGIN = Rastrigin()

#: The demo's surfaces by name, in the order it races them.
SURFACES = {s.name: s for s in (RAVINE, ROSENBROCK, BEALE, HIMMELBLAU, SADDLE, MONKEY_SADDLE, RASTRIGIN)}

__all__ = ["Surface", "Quadratic", "Rosenbrock", "Beale", "Himmelblau", "Saddle", "MonkeySaddle",
           "Rastrigin", "SURFACES"]
