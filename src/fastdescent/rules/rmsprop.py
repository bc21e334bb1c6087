"""RMSprop: gradients divided by a running root mean square, optionally centered."""

from .. import _checks
from .._config import effective_n_threads, resolve_backend
from ._adaptive import required_iff


def rmsprop_step(params, grads, square_avgs, momentum_buffers=None, grad_avgs=None, *, lr=1e-2,
                 alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                 maximize=False, grad_scale=1.0, n_threads=None, backend=None):
    r"""One in-place RMSprop step on one array or a list of arrays (Hinton, lecture 6e, 2012).

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in, :math:`d_t = g_t + \lambda \theta_{t-1}`:

    .. math::
       v_t = \alpha v_{t-1} + (1 - \alpha) d_t^2, \qquad
       \sigma_t = \sqrt{v_t} + \epsilon

    and, if ``centered`` (Graves 2013: divide by an estimate of the standard
    deviation instead of the root mean square),

    .. math::
       a_t = \alpha a_{t-1} + (1 - \alpha) d_t, \qquad
       \sigma_t = \sqrt{v_t - a_t^2} + \epsilon .

    Then without momentum :math:`\theta_t = \theta_{t-1} - \eta\, d_t / \sigma_t`;
    with momentum :math:`\mu > 0`,

    .. math::
       b_t = \mu b_{t-1} + d_t / \sigma_t, \qquad \theta_t = \theta_{t-1} - \eta b_t .

    This is ``torch.optim.RMSprop``, operation for operation (:math:`a_t` as
    ``torch.lerp``). Conventions differ: TensorFlow and Keras put :math:`\epsilon`
    inside the root, :math:`\sqrt{v_t + \epsilon}`, default :math:`\alpha` (their
    ``rho``) to 0.9 and keep :math:`\eta` inside the momentum buffer, so a
    changing learning rate acts differently there.

    Parameters
    ----------
    params, grads, square_avgs, momentum_buffers, grad_avgs : ndarray or list of ndarray
        C-contiguous float32 or float64 arrays, all of one dtype, each shaped like
        its parameter; all but ``grads`` are updated in place. PyTorch starts every
        state buffer at zero. ``momentum_buffers`` is required iff ``momentum > 0``,
        ``grad_avgs`` iff ``centered``.
    lr : float
        Learning rate :math:`\eta \ge 0`.
    alpha : float
        Decay :math:`\alpha \in [0, 1)` of the averages.
    eps : float
        :math:`\epsilon \ge 0`, added to the root for numerical stability.
    weight_decay : float
        L2 penalty :math:`\lambda \ge 0`, added to the gradient.
    momentum : float
        :math:`\mu \in [0, 1)`.
    centered, maximize : bool
    grad_scale : float
        Multiplies every gradient as it is read (loss-scale removal, norm
        clipping), at no extra pass over memory.
    n_threads : int or None
        See :func:`fastdescent.get_num_threads`.
    backend : {"kernel", "reference"} or None
        None uses :func:`fastdescent.get_backend`.
    """
    arguments = rmsprop_arguments(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                  momentum=momentum, maximize=maximize, grad_scale=grad_scale)
    if square_avgs is None:
        raise ValueError("rmsprop_step needs square_avgs")
    required_iff("momentum_buffers", momentum_buffers, arguments["momentum"] > 0.0, "momentum > 0")
    required_iff("grad_avgs", grad_avgs, bool(centered), "centered=True")
    params, grads, square_avgs, momentum_buffers, grad_avgs = _checks.validated_lists(
        ("square_avg", "momentum_buffer", "grad_avg"), params, grads, square_avgs, momentum_buffers, grad_avgs)
    resolve_backend(backend).rmsprop(params, grads, square_avgs, momentum_buffers, grad_avgs, **arguments,
                                     n_threads=effective_n_threads(n_threads))


def rmsprop_arguments(*, lr, alpha, eps, weight_decay, momentum, maximize, grad_scale):
    """Validate the hyperparameters; return the scalars the ``rmsprop`` kernel takes
    (``centered`` is told by the presence of the ``grad_avgs`` buffers).

    Shared by :func:`rmsprop_step` and the optimizer objects.
    """
    grad_scale = _checks.finite("grad_scale", grad_scale)
    return dict(
        lr=_checks.nonnegative("lr", lr),
        alpha=_checks.unit_interval("alpha", alpha),
        eps=_checks.nonnegative("eps", eps),
        weight_decay=_checks.nonnegative("weight_decay", weight_decay),
        momentum=_checks.unit_interval("momentum", momentum),
        grad_scale=-grad_scale if maximize else grad_scale,
    )
