"""Adagrad: per-coordinate learning rates from the sum of squared gradients."""

from .. import _checks
from .._config import effective_n_threads, resolve_backend
from ._adaptive import step_number


def adagrad_step(params, grads, state_sums, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 eps=1e-10, maximize=False, grad_scale=1.0, n_threads=None, backend=None):
    r"""One in-place Adagrad step on one array or a list of arrays (Duchi, Hazan & Singer 2011).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in, :math:`d_t = g_t + \lambda \theta_{t-1}`:

    .. math::
       \tilde\eta_t = \frac{\eta}{1 + (t - 1)\,\kappa}, \qquad
       s_t = s_{t-1} + d_t^2, \qquad
       \theta_t = \theta_{t-1} - \frac{\tilde\eta_t\, d_t}{\sqrt{s_t} + \epsilon}

    as ``torch.optim.Adagrad`` (the decayed rate :math:`\tilde\eta_t` with
    ``lr_decay`` :math:`\kappa` is computed once per call, in double precision).

    Conventions differ on where :math:`\epsilon` sits: PyTorch and this function
    add it outside the root, :math:`\sqrt{s_t} + \epsilon`; Keras and optax put
    it inside, :math:`\sqrt{s_t + \epsilon}`. Keras and optax also start the sum
    at 0.1, PyTorch at 0.

    Parameters
    ----------
    params, grads, state_sums : ndarray or list of ndarray
        C-contiguous float32 or float64 arrays, all of one dtype, each gradient and
        sum shaped like its parameter. ``params`` and ``state_sums`` are updated in
        place. The sums (PyTorch's ``state["sum"]``) are allocated by the caller:
        fill them with ``initial_accumulator_value`` (PyTorch: 0) before the first
        step, so that option belongs to whoever allocates the state (the optimizer
        objects), not to this function.
    step : int
        The 1-based index of the step being taken (PyTorch's ``state["step"]``
        after its increment); only the learning-rate decay uses it.
    lr : float
        Learning rate :math:`\eta \ge 0`.
    lr_decay : float
        :math:`\kappa \ge 0`.
    weight_decay : float
        L2 penalty :math:`\lambda \ge 0`, added to the gradient.
    eps : float
        :math:`\epsilon \ge 0`, added to the root for numerical stability.
    maximize : bool
        Ascend the objective instead of descending.
    grad_scale : float
        Multiplies every gradient as it is read (loss-scale removal, norm
        clipping), at no extra pass over memory.
    n_threads : int or None
        See :func:`fastdescent.get_num_threads`.
    backend : {"kernel", "reference"} or None
        None uses :func:`fastdescent.get_backend`.
    """
    arguments = adagrad_arguments(step=step, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                  eps=eps, maximize=maximize, grad_scale=grad_scale)
    if state_sums is None:
        raise ValueError("adagrad_step needs state_sums")
    params, grads, state_sums = _checks.validated_lists(("state_sum",), params, grads, state_sums)
    resolve_backend(backend).adagrad(params, grads, state_sums, **arguments,
                                     n_threads=effective_n_threads(n_threads))


def adagrad_arguments(*, step, lr, lr_decay, weight_decay, eps, maximize, grad_scale):
    """Validate the hyperparameters; return the scalars the ``adagrad`` kernel takes.

    Shared by :func:`adagrad_step` and the optimizer objects, so both hand the
    kernel (or its reference twin) the same doubles.
    """
    step = step_number(step)
    lr = _checks.nonnegative("lr", lr)
    lr_decay = _checks.nonnegative("lr_decay", lr_decay)
    grad_scale = _checks.finite("grad_scale", grad_scale)
    return dict(
        clr=lr / (1.0 + (step - 1) * lr_decay),
        grad_scale=-grad_scale if maximize else grad_scale,
        weight_decay=_checks.nonnegative("weight_decay", weight_decay),
        eps=_checks.nonnegative("eps", eps),
    )
