"""Stochastic gradient descent, with momentum and Nesterov momentum."""

from .. import _checks
from .._config import effective_n_threads, resolve_backend

CONVENTIONS = ("pytorch", "classical")


def sgd_step(params, grads, momentum_buffers=None, *, lr, momentum=0.0, dampening=0.0,
             weight_decay=0.0, nesterov=False, maximize=False, convention="pytorch",
             first_step=False, grad_scale=1.0, n_threads=None, backend=None):
    r"""One in-place SGD step, with optional momentum, on one array or a list of arrays.

    With gradient :math:`g_t` (times ``grad_scale``, negated if ``maximize``) and
    L2 weight decay folded in, :math:`d_t = g_t + \lambda \theta_{t-1}`:

    * plain (``momentum=0``): :math:`\theta_t = \theta_{t-1} - \eta d_t`
      (Robbins & Monro 1951);
    * momentum, ``convention="pytorch"`` (the default, as ``torch.optim.SGD``):

      .. math::
         v_t = \mu v_{t-1} + (1 - \tau) d_t, \qquad \theta_t = \theta_{t-1} - \eta v_t

      with :math:`v_1 = d_1` when ``first_step`` is true (PyTorch's lazily
      created buffer), else from the buffer passed in;
    * momentum, ``convention="classical"`` (Polyak 1964; Sutskever et al. 2013;
      the form in most textbooks): the learning rate sits inside the buffer,

      .. math::
         v_t = \mu v_{t-1} - \eta d_t, \qquad \theta_t = \theta_{t-1} + v_t .

      The two conventions give the same iterates while :math:`\eta` is constant
      and there is no dampening (:math:`v^{classical} = -\eta v^{pytorch}`). When
      the learning rate changes they differ: PyTorch's buffer holds gradients, so
      a new rate applies at once to the whole accumulated velocity; the classical
      buffer holds past steps, each taken at the rate of its own time, so a
      decayed rate only shrinks new contributions. ``dampening`` and
      ``first_step`` belong to the PyTorch form and must be 0 / False here.

    * Nesterov momentum (``nesterov=True``, Nesterov 1983 in Sutskever et al.'s
      look-ahead-free form, as PyTorch): the step uses the gradient plus the
      momentum-carried buffer, :math:`\theta_t = \theta_{t-1} - \eta (d_t + \mu v_t)`
      (classical: :math:`\theta_t = \theta_{t-1} + \mu v_t - \eta d_t`). This
      equals evaluating the gradient at the look-ahead point
      :math:`\theta + \mu v` after a change of variables, without a second
      gradient evaluation.

    Parameters
    ----------
    params, grads, momentum_buffers : ndarray or list of ndarray
        C-contiguous float32 or float64 arrays; all of one dtype, each gradient
        and buffer shaped like its parameter. ``params`` and ``momentum_buffers``
        are updated in place; ``momentum_buffers`` is required iff ``momentum > 0``.
    lr : float
        Learning rate :math:`\eta \ge 0`.
    momentum, dampening : float
        :math:`\mu \in [0, 1)` and :math:`\tau \in [0, 1]`.
    weight_decay : float
        L2 penalty :math:`\lambda \ge 0`, added to the gradient ("coupled").
    nesterov, maximize : bool
    convention : {"pytorch", "classical"}
    first_step : bool
        PyTorch form: initialise the buffer with the gradient instead of updating it.
    grad_scale : float
        Multiplies every gradient as it is read (loss-scale removal, norm
        clipping), at no extra pass over memory.
    n_threads : int or None
        See :func:`fastdescent.get_num_threads`.
    backend : {"kernel", "reference"} or None
        None uses :func:`fastdescent.get_backend`.
    """
    arguments = sgd_arguments(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                              nesterov=nesterov, maximize=maximize, convention=convention,
                              first_step=first_step, grad_scale=grad_scale)
    if arguments["momentum"] > 0.0 and momentum_buffers is None:
        raise ValueError("momentum > 0 needs momentum_buffers")
    if arguments["momentum"] == 0.0 and momentum_buffers is not None:
        raise ValueError("momentum_buffers were given but momentum is 0")
    params, grads, momentum_buffers = _checks.validated_lists(("momentum_buffer",), params, grads, momentum_buffers)
    resolve_backend(backend).sgd(params, grads, momentum_buffers, **arguments,
                                 n_threads=effective_n_threads(n_threads))


def sgd_arguments(*, lr, momentum, dampening, weight_decay, nesterov, maximize, convention, first_step,
                  grad_scale):
    """Validate the hyperparameters; return the scalars and flags the ``sgd`` kernel takes.

    Shared by :func:`sgd_step` and the optimizer objects.
    """
    lr = _checks.nonnegative("lr", lr)
    momentum = _checks.unit_interval("momentum", momentum)
    dampening = _checks.closed_unit_interval("dampening", dampening)
    grad_scale = _checks.finite("grad_scale", grad_scale)
    classical = _checks.choice("convention", convention, CONVENTIONS) == "classical"
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True requires momentum > 0")
    if nesterov and dampening != 0.0:
        raise ValueError("nesterov=True requires dampening=0 (as in PyTorch)")
    if classical and (dampening != 0.0 or first_step):
        raise ValueError("dampening and first_step belong to the 'pytorch' convention")
    return dict(
        lr=lr, grad_scale=-grad_scale if maximize else grad_scale,
        weight_decay=_checks.nonnegative("weight_decay", weight_decay), momentum=momentum,
        dampening=dampening, nesterov=bool(nesterov), classical=classical, first_step=bool(first_step),
    )
