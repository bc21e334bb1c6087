"""Muon: momentum orthogonalized by a Newton-Schulz iteration, for 2-D parameters."""

import math

import numpy as np

from .. import _checks
from . import _hyper
from ._spec import Buffer, Example, Hyper, RuleSpec

#: Keller Jordan's quintic coefficients, PyTorch's default.
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
ADJUST_LR_FNS = ("original", "match_rms_adamw")
#: PyTorch refuses this many Newton-Schulz steps or more.
MAX_NS_STEPS = 100


def coefficient_triple(name, value):
    """``(a, b, c)`` as three finite Python floats."""
    try:
        a, b, c = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be three floats (a, b, c), got {value!r}") from None
    return tuple(_checks.finite(f"{name}[{k}]", x) for k, x in enumerate((a, b, c)))


def ns_steps(name, value):
    """An int in [0, 100), as PyTorch allows."""
    value = _checks.integer(name, value, 0)
    if value >= MAX_NS_STEPS:
        raise ValueError(f"{name} must be below {MAX_NS_STEPS} (as in PyTorch), got {value}")
    return value


def adjust_lr_fn(name, value):
    """None (PyTorch's default, "original") or one of ``ADJUST_LR_FNS``."""
    return None if value is None else _checks.choice(name, value, ADJUST_LR_FNS)


def adjusted_lr(lr, fn, shape):
    """The rate of a ``shape`` = (A, B) matrix: ``lr * sqrt(max(1, A / B))`` ("original",
    Keller Jordan's, and None) or ``lr * 0.2 * sqrt(max(A, B))`` ("match_rms_adamw",
    Moonshot's), as ``torch.optim._muon._adjust_lr`` (an empty B gives 1, where
    PyTorch divides by zero)."""
    rows, columns = shape
    if fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, columns)))
    return lr * math.sqrt(max(1, rows / columns if columns else 0))


def orthogonalize(update, coefficients, steps, eps):
    """The Newton-Schulz iteration of ``torch.optim._muon._zeropower_via_newtonschulz``,
    in ``update``'s dtype, with NumPy's matrix products (BLAS): both backends call
    this, so they stay bit-identical. Returns a new C-contiguous array."""
    a, b, c = coefficients
    tall = update.shape[0] > update.shape[1]
    x = update.T if tall else update
    x = x / max(np.linalg.norm(x), x.dtype.type(eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        gram_update = b * gram + c * (gram @ gram)
        x = a * x + gram_update @ x
    return np.ascontiguousarray(x.T if tall else x)


def muon_scalars(h, *, step, grad_scale, fresh):
    return dict(lr=h["lr"], param_decay=1.0 - h["lr"] * h["weight_decay"], momentum=h["momentum"],
                nesterov=h["nesterov"], ns_coefficients=h["ns_coefficients"], ns_steps=h["ns_steps"],
                eps=h["eps"], adjust_lr_fn=h["adjust_lr_fn"], grad_scale=grad_scale)


def muon_run(backend, params, grads, buffers, kwargs, n_threads):
    """Per matrix, as PyTorch: the momentum pass, the orthogonalization (the same
    NumPy calls for both backends), the update pass."""
    for p, g, buf in zip(params, grads, buffers["momentum_buffer"]):
        update = np.empty_like(g) if kwargs["nesterov"] else None
        backend.muon_momentum([g], [buf], None if update is None else [update], momentum=kwargs["momentum"],
                              grad_scale=kwargs["grad_scale"], n_threads=n_threads)
        orthogonal = orthogonalize(buf if update is None else update, kwargs["ns_coefficients"],
                                   kwargs["ns_steps"], kwargs["eps"])
        backend.muon([p], [orthogonal], lr=adjusted_lr(kwargs["lr"], kwargs["adjust_lr_fn"], p.shape),
                     param_decay=kwargs["param_decay"], n_threads=n_threads)


def muon_passes(h):
    """The momentum pass reads grad and buffer and writes the buffer (and the Nesterov
    update: written without being read, which costs a read all the same, a store to
    a line not in cache loading it first); the update pass reads param and the
    orthogonalized update and writes param."""
    return [(3, 2) if h["nesterov"] else (2, 1), (2, 1)]


MUON = RuleSpec(
    name="muon",
    year=2024,
    title="Muon",
    summary="Muon: momentum orthogonalized by Newton-Schulz, for 2-D parameters (Jordan et al. 2024)",
    doc=r"""One in-place Muon step on one matrix or a list of matrices (Jordan et al. 2024).

    MomentUm Orthogonalized by Newton-Schulz: the momentum of each 2-D parameter is
    replaced by a nearby semi-orthogonal matrix (its singular values pushed toward 1)
    before it is applied, so that every direction of the matrix moves alike. With
    gradient :math:`G_t` (times ``grad_scale``) and momentum :math:`\mu`:

    .. math::
       B_t = B_{t-1} + (1 - \mu)(G_t - B_{t-1}), \qquad
       U_t = \begin{cases} G_t + \mu (B_t - G_t) & \text{nesterov} \\
       B_t & \text{otherwise} \end{cases}

    .. math::
       O_t = \mathrm{NS}^{(a,b,c)}_k\big(U_t / \max(\lVert U_t \rVert_F, \epsilon)\big), \qquad
       \theta_t = (1 - \eta \lambda)\, \theta_{t-1} - \eta_{A \times B}\, O_t

    where each of the :math:`k` Newton-Schulz steps maps :math:`X` (transposed first
    if it has more rows than columns) to :math:`aX + (bXX^\top + c(XX^\top)^2)X`, and
    :math:`\eta_{A \times B}` adjusts the rate to the matrix's shape: ``"original"``
    (and None), Keller Jordan's :math:`\eta \sqrt{\max(1, A/B)}`, or
    ``"match_rms_adamw"``, Moonshot's :math:`0.2\, \eta \sqrt{\max(A, B)}` (Liu et al.
    2025, "Muon is scalable for LLM training"), which lets AdamW's rate and weight
    decay carry over. The weight decay is decoupled, with the unadjusted rate.

    This is ``torch.optim.Muon`` (its buffer lerps, shape adjustment and decoupled
    decay, operation for operation) with one deliberate difference: PyTorch rounds
    the update to bfloat16 and runs the iteration in bfloat16, a GPU speed choice;
    here it runs in the parameter's dtype (float32 or float64), with NumPy's matrix
    products, the same calls for both backends (only the two elementwise passes
    around it are kernels). The results therefore differ from PyTorch's by
    bfloat16's rounding, not by float rounding: about 1% of each step (measured
    after 50 steps of training a small MLP: at most 6% of how far a weight moved). The quintic coefficients do not converge to an exactly
    orthogonal matrix (the singular values land roughly between 0.5 and 1.5), by
    design: they maximize the slope at zero, so few steps suffice.

    Muon is for the 2-D weights of hidden layers: biases, gains, embeddings and
    output layers go to another rule (AdamW, say), as PyTorch's documentation says.
    Every parameter must be 2-D (a ValueError otherwise, before anything is written).
    Conventions differ on the shape adjustment (above) and on where the decay and
    Nesterov sit; this follows PyTorch.
""",
    hyper=(
        _hyper.lr(1e-3),
        _hyper.weight_decay(0.1, r"Decoupled weight decay :math:`\lambda \ge 0`: "
                                 r":math:`\theta \leftarrow (1 - \eta\lambda)\theta`, as AdamW."),
        _hyper.unit("momentum", 0.95, r"Momentum :math:`\mu \in [0, 1)`."),
        _hyper.flag("nesterov", True, "Orthogonalize the Nesterov update instead of the buffer."),
        Hyper("ns_coefficients", NS_COEFFICIENTS, coefficient_triple,
              "The coefficients (a, b, c) of the quintic Newton-Schulz step.", type="(float, float, float)"),
        _hyper.eps(1e-7, r"Floor :math:`\epsilon \ge 0` of the norm the update is divided by."),
        Hyper("ns_steps", 5, ns_steps, "Newton-Schulz steps, in [0, 100).", type="int"),
        Hyper("adjust_lr_fn", None, adjust_lr_fn,
              'How the rate follows the matrix\'s shape: "original" (also None) or "match_rms_adamw".',
              type="{None, 'original', 'match_rms_adamw'}"),
    ),
    buffers=(
        Buffer("momentum_buffer", doc=r"the momentum :math:`B`"),
    ),
    scalars=muon_scalars,
    runner=muon_run,
    passes=muon_passes,
    tensorwise=True,
    param_ndim=2,
    counts_steps=False,
    uses_step=False,
    torch="Muon",
    examples=(
        Example("muon", {}, "Muon, Nesterov momentum 0.95 (its elementwise passes)", bench=True),
        Example("muon-plain-momentum", dict(nesterov=False), "Muon without Nesterov (its elementwise passes)",
                bench=True),
        Example("muon-match-rms-adamw", dict(lr=0.02, weight_decay=0.0, momentum=0.9, ns_steps=2,
                                             adjust_lr_fn="match_rms_adamw")),
        Example("muon-low-momentum-ns3", dict(lr=0.01, momentum=0.3, ns_steps=3, eps=1e-5,
                                              ns_coefficients=(3.0, -3.2, 1.2), adjust_lr_fn="original")),
        Example("muon-normalized-only", dict(lr=0.01, ns_steps=0, weight_decay=0.02, nesterov=False)),
    ),
)
