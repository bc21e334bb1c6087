"""Adafactor (Shazeer & Stern 2018), as ``torch.optim.Adafactor``: factored second
moments and relative step sizes, in two kernels (the reductions, then the update)."""

import numpy as np

from .. import _checks
from . import _hyper
from ._spec import Buffer, Example, Hyper, RuleSpec

ADAFACTOR_DOC = r"""One in-place Adafactor step on one array or a list of arrays (Shazeer & Stern 2018,
    "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"), as
    ``torch.optim.Adafactor``.

    With gradient :math:`G_t` (times ``grad_scale``, negated if ``maximize``), step
    :math:`t`, :math:`\hat\beta_{2t} = 1 - t^{\tau}` (:math:`\tau` = ``beta2_decay``),
    the relative step size :math:`\rho_t = \min(\gamma, 1/\sqrt t)` and
    :math:`\alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t`. A parameter
    of two or more dimensions is a stack of matrices (its last two dimensions) whose
    second moment is kept factored, as the means of :math:`G_t^2` along its rows and
    its columns:

    .. math::
       R_t = \hat\beta_{2t} R_{t-1} + (1 - \hat\beta_{2t})\, \mathrm{mean}_j\, G_{t,ij}^2, \qquad
       C_t = \hat\beta_{2t} C_{t-1} + (1 - \hat\beta_{2t})\, \mathrm{mean}_i\, G_{t,ij}^2,

    .. math::
       \hat V_{t,ij} = \frac{R_{t,i}\, C_{t,j}}{\max(\mathrm{mean}_i R_{t,i}, \epsilon_1)}

    (``row_var`` :math:`R`, shaped ``(..., rows, 1)``, and ``col_var`` :math:`C`,
    ``(..., 1, cols)``: memory of rows + columns instead of rows x columns); a vector
    or a scalar keeps the full average ``variance``,
    :math:`\hat V_t = \hat\beta_{2t} \hat V_{t-1} + (1 - \hat\beta_{2t}) G_t^2`. Then

    .. math::
       U_t = \frac{G_t}{\max(\sqrt{\hat V_t}, \epsilon_1)}, \qquad
       \theta_t = (1 - \gamma\lambda)\,\theta_{t-1}
       - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t) / d)}\, U_t

    with the root mean squares over each parameter, :math:`\gamma` = ``lr``,
    :math:`\lambda` = ``weight_decay`` and :math:`d` the clipping threshold. The
    averages are ``torch.lerp`` toward the new means (:math:`\hat\beta_{21} = 0`: the
    first step takes them whole).

    PyTorch's version, followed here, differs from the article's Algorithms 4 and 5:

    * ``lr`` caps the relative step size, :math:`\rho_t = \min(\gamma, 1/\sqrt t)`,
      where the article uses the constant :math:`10^{-2}` (the default ``lr``); it
      also scales the weight decay, which is decoupled as in AdamW (the article has
      none);
    * :math:`\epsilon_1` stabilizes the end of the computation (the row mean and
      the root are floored by it) where the article adds :math:`\epsilon_1 = 10^{-30}`
      to :math:`G_t^2` before averaging; ``eps=(None, ...)`` takes the machine
      epsilon of the parameters' dtype;
    * the factors are means where the article has sums (equal after the division);
    * there is no first moment: the article's optional momentum (:math:`\beta_1`)
      is not offered, as in PyTorch, so the state is :math:`R, C` (or :math:`\hat V`)
      and the step count only.

    This implementation differs from PyTorch's in rounding only:
    :math:`1/\sqrt{\hat V_{t,ij}}` is computed as :math:`\min(r_i c_j, 1/\epsilon_1)`
    with :math:`r_i = 1/\sqrt{R_{t,i} / \max(\mathrm{mean}\,R_t, \epsilon_1)}` and
    :math:`c_j = 1/\sqrt{C_{t,j}}` computed once per row and column (in double,
    rounded to the dtype): equal to PyTorch's ``rsqrt(clamp(V, eps1**2))`` up to a
    few ulps, with no division or root per element. The root mean squares and the
    means are sums in an order fixed by the shape, in the dtype over at most 512
    terms and then in float64 (PyTorch sums a float32 tensor in float32 throughout),
    so 1 and 2 threads and both backends agree bit for bit. ``eps=(None, ...)`` takes the epsilon of each parameter's dtype (PyTorch
    takes the first parameter's for the whole group). An empty parameter is left as
    it is (PyTorch divides by its size and raises ZeroDivisionError).

    Each step makes two kernel calls: the reductions (the parameter's and the
    gradient's sums of squares, the row and column means; then, once the factors
    are known, the update's sum of squares: the gradient is read twice), then the
    fused update. For a matrix that moves 6 arrays' worth of memory per element
    (read :math:`\theta, G`; read :math:`G`; read :math:`\theta, G`, write
    :math:`\theta`) against Adam's 7.
"""


def _nonpositive(name, value):
    """A decay exponent <= 0 (torch.optim.Adafactor's ``beta2_decay``; -inf allowed)."""
    value = _checks.real(name, value)
    if not value <= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be <= 0, got {value}")
    return value


def _eps_pair(name, eps):
    """``(eps1, eps2)``: eps1 None (the dtype's machine epsilon) or finite and >= 0,
    eps2 finite and >= 0."""
    try:
        eps1, eps2 = eps
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (eps1 or None, eps2), got {eps!r}") from None
    return (None if eps1 is None else _checks.nonnegative(f"{name}[0]", eps1)), _checks.nonnegative(f"{name}[1]", eps2)


def _clipping_threshold(name, value):
    """``d`` >= 1 (inf: no clipping)."""
    value = _checks.real(name, value)
    if not value >= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _row_shape(shape):
    return shape[:-1] + (1,) if len(shape) >= 2 else None


def _column_shape(shape):
    return shape[:-2] + (1, shape[-1]) if len(shape) >= 2 else None


def _vector_shape(shape):
    return shape if len(shape) < 2 else None


def adafactor_step_scalars(h, step):
    """The averaging weight :math:`1 - \\hat\\beta_{2t} = t^\\tau` and the relative
    step size :math:`\\rho_t` of step ``step``, as PyTorch computes them (Python floats)."""
    t = float(step)
    return t ** h["beta2_decay"], min(h["lr"], 1 / (t ** 0.5))


def adafactor_scalars(h, *, step, grad_scale, fresh):
    """The runner's scalars: those of :func:`adafactor_step_scalars`, and the rest as given."""
    eps1, eps2 = h["eps"]
    weight, rho = adafactor_step_scalars(h, step)
    return dict(weight=weight, rho=rho, eps1=eps1, eps2=eps2, d=h["d"],
                param_decay=1.0 - h["lr"] * h["weight_decay"], grad_scale=_hyper.signed_grad_scale(h, grad_scale))


def step_sizes(sums, sizes, rho, eps2, d):
    """Per tensor, from its sums of squares of the parameter and of the update
    (``sums``, shape (tensors, 2)) and its size: :math:`-\\alpha_t / \\max(1,
    \\mathrm{RMS}(U_t)/d)`, in float64 (0 for an empty tensor). ``max`` as Python's,
    which PyTorch uses: a NaN root mean square gives :math:`\\epsilon_2` and 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        root_n = np.sqrt(sizes)
        param_rms = np.sqrt(sums[:, 0]) / root_n
        clip = np.sqrt(sums[:, 1]) / (root_n * d)
        alpha = np.where(param_rms > eps2, param_rms, eps2) * rho
        sizes_out = -alpha / np.where(clip > 1.0, clip, 1.0)
    sizes_out[sizes == 0] = 0.0
    return sizes_out


def adafactor_runner(backend, params, grads, buffers, kwargs, n_threads):
    """The two kernel calls of a step: the reductions, then the update, with the
    per-tensor step sizes computed in between."""
    if not params:
        return
    lists = {name: buffers.get(name) or [None] * len(params) for name in ("row_var", "col_var", "variance")}
    eps1 = kwargs["eps1"]
    if eps1 is None:
        eps1 = float(np.finfo(params[0].dtype).eps)
    sums = backend.adafactor_statistics(params, grads, **lists, weight=kwargs["weight"], eps1=eps1,
                                        grad_scale=kwargs["grad_scale"], n_threads=n_threads)
    sizes = np.array([p.size for p in params], dtype=np.float64)
    backend.adafactor_update(params, grads, **lists, step_sizes=step_sizes(sums, sizes, kwargs["rho"], kwargs["eps2"],
                                                                           kwargs["d"]),
                             param_decay=kwargs["param_decay"], eps1=eps1, grad_scale=kwargs["grad_scale"],
                             n_threads=n_threads)


def adafactor_passes(h):
    """The memory passes of a step on a matrix (the row and column vectors are
    negligible): read the parameter and the gradient; read the gradient; read the
    parameter and the gradient and write the parameter."""
    return [(2, 0), (1, 0), (2, 1)]


ADAFACTOR = RuleSpec(
    name="adafactor",
    year=2018,
    title="Adafactor",
    summary="Adafactor (Shazeer & Stern 2018): factored second moments, relative step sizes",
    doc=ADAFACTOR_DOC,
    hyper=(
        Hyper("lr", 1e-2, _checks.nonnegative,
              r"Learning rate :math:`\gamma \ge 0`: the cap of the relative step size :math:`\rho_t`, and "
              "the scale of the weight decay."),
        Hyper("beta2_decay", -0.8, _nonpositive,
              r"Decay exponent :math:`\tau \le 0`: the averages keep :math:`1 - t^{\tau}` of their past."),
        Hyper("eps", (None, 1e-3), _eps_pair,
              r"(:math:`\epsilon_1`, :math:`\epsilon_2`): the floor of the row mean and of the root of the "
              r"second moment (None: the dtype's machine epsilon), and of the parameter's RMS in the step size.",
              type="(float or None, float)"),
        Hyper("d", 1.0, _clipping_threshold,
              r"Clipping threshold :math:`d \ge 1`: the update's RMS is brought down to at most :math:`d`."),
        _hyper.weight_decay(0.0, r"Decoupled weight decay :math:`\lambda \ge 0`: "
                                 r":math:`\theta \leftarrow (1 - \gamma\lambda)\theta`."),
        _hyper.maximize(),
    ),
    buffers=(
        Buffer("row_var", sample="positive", shape=_row_shape,
               doc=r"the row factor :math:`R`, shaped ``(..., rows, 1)``, for parameters of two or more "
                   "dimensions (None for the others)"),
        Buffer("col_var", sample="positive", shape=_column_shape,
               doc=r"the column factor :math:`C`, shaped ``(..., 1, cols)``, for parameters of two or more "
                   "dimensions (None for the others)"),
        Buffer("variance", sample="positive", shape=_vector_shape,
               doc=r"the second moment :math:`\hat V`, shaped like its parameter, for parameters of fewer "
                   "than two dimensions (None for the others)"),
    ),
    scalars=adafactor_scalars,
    step_scalar_names=("weight", "rho"),
    step_scalars=adafactor_step_scalars,
    runner=adafactor_runner,
    tensorwise=True,
    passes=adafactor_passes,
    torch="Adafactor",
    examples=(
        Example("adafactor", {}, "Adafactor, PyTorch's defaults", bench=True),
        Example("adafactor-wd-maximize", dict(weight_decay=0.1, maximize=True)),
        Example("adafactor-beta2_decay-d", dict(beta2_decay=-0.5, d=1.5)),
        Example("adafactor-eps-floors", dict(eps=(0.3, 2.0), lr=0.005)),
    ),
)
