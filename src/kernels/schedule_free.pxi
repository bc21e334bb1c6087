# Schedule-Free AdamW and SGD (Defazio et al. 2024): one pass reading the parameter
# (it holds y, where the gradient was taken), the gradient, z, x (and exp_avg_sq),
# writing all but the gradient: z takes the base optimizer's step, x averages z,
# and the parameter gets the next y. schedule_free_y recomputes y from x and z
# (the optimizers' train(), after eval() put x in the parameter).
# Equations: fastdescent.rules.schedule_free. Reference twin:
# fastdescent/reference/schedule_free.py (same operations, same order).

cdef struct ScheduleFreeArgs:
    double lr                      # the learning rate of this step, after warmup
    double lr_decay                # lr * weight_decay (AdamW: decoupled, applied to z)
    double weight_decay            # SGD: coupled, added to the gradient at y
    double beta                    # y = beta*x + (1 - beta)*z: beta1 (AdamW) or momentum (SGD)
    double beta2
    double bias_correction2
    double eps
    double ckp1                    # x = (1 - ckp1)*x + ckp1*z: this step's averaging weight
    double grad_scale              # already negated for maximize
    bint has_weight_decay
    bint decay_at_z


cdef inline floating averaged(floating x, floating z, floating keep, floating ckp1) noexcept nogil:
    """x moved toward z, as ``x.mul_(1 - ckp1).add_(z, alpha=ckp1)``."""
    return x * keep + ckp1 * z


cdef inline floating interpolated(floating x, floating z, floating beta, floating rest) noexcept nogil:
    """y = beta*x + (1 - beta)*z, as ``x.mul(beta).add_(z, alpha=1 - beta)``."""
    return x * beta + rest * z


cdef inline void schedule_free_adamw_elements(floating* p, const floating* g, floating* z, floating* x,
                                              floating* v, Py_ssize_t n,
                                              const ScheduleFreeArgs* a) noexcept nogil:
    cdef floating lr = <floating>a.lr, lr_decay = <floating>a.lr_decay, scale = <floating>a.grad_scale
    cdef floating keep2 = <floating>a.beta2, w2 = <floating>(1.0 - a.beta2)
    cdef floating bc2 = <floating>a.bias_correction2, eps = <floating>a.eps
    cdef floating keep = <floating>(1.0 - a.ckp1), ckp1 = <floating>a.ckp1
    cdef floating beta = <floating>a.beta, rest = <floating>(1.0 - a.beta)
    cdef bint has_wd = a.has_weight_decay, at_z = a.decay_at_z
    cdef floating y, d, zi, sq, xi
    cdef Py_ssize_t i
    for i in range(n):
        y = p[i]
        d = scale * g[i]
        zi = z[i]
        if has_wd:
            zi = zi - lr_decay * (zi if at_z else y)
        sq = average_square(v[i], d, keep2, w2)
        v[i] = sq
        zi = zi - (lr * d) / (root(sq / bc2) + eps)
        z[i] = zi
        xi = averaged(x[i], zi, keep, ckp1)
        x[i] = xi
        p[i] = interpolated(xi, zi, beta, rest)


cdef inline void schedule_free_sgd_elements(floating* p, const floating* g, floating* z, floating* x,
                                            Py_ssize_t n, const ScheduleFreeArgs* a) noexcept nogil:
    cdef floating lr = <floating>a.lr, wd = <floating>a.weight_decay, scale = <floating>a.grad_scale
    cdef floating keep = <floating>(1.0 - a.ckp1), ckp1 = <floating>a.ckp1
    cdef floating beta = <floating>a.beta, rest = <floating>(1.0 - a.beta)
    cdef bint has_wd = a.has_weight_decay
    cdef floating d, zi, xi
    cdef Py_ssize_t i
    for i in range(n):
        d = scaled_grad(g[i], p[i], scale, wd, has_wd)
        zi = z[i] - lr * d
        z[i] = zi
        xi = averaged(x[i], zi, keep, ckp1)
        x[i] = xi
        p[i] = interpolated(xi, zi, beta, rest)


cdef inline void schedule_free_y_elements(floating* p, const floating* x, const floating* z, Py_ssize_t n,
                                          const ScheduleFreeArgs* a) noexcept nogil:
    cdef floating beta = <floating>a.beta, rest = <floating>(1.0 - a.beta)
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = interpolated(x[i], z[i], beta, rest)


cdef void schedule_free_adamw_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n,
                                          const void* args) noexcept nogil:
    schedule_free_adamw_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                                 <float*>rows[3] + start, <float*>rows[4] + start, n,
                                 <const ScheduleFreeArgs*>args)


cdef void schedule_free_adamw_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n,
                                          const void* args) noexcept nogil:
    schedule_free_adamw_elements(<double*>rows[0] + start, <const double*>rows[1] + start,
                                 <double*>rows[2] + start, <double*>rows[3] + start, <double*>rows[4] + start, n,
                                 <const ScheduleFreeArgs*>args)


cdef void schedule_free_sgd_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n,
                                        const void* args) noexcept nogil:
    schedule_free_sgd_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                               <float*>rows[3] + start, n, <const ScheduleFreeArgs*>args)


cdef void schedule_free_sgd_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n,
                                        const void* args) noexcept nogil:
    schedule_free_sgd_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                               <double*>rows[3] + start, n, <const ScheduleFreeArgs*>args)


cdef void schedule_free_y_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    schedule_free_y_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <const float*>rows[2] + start,
                             n, <const ScheduleFreeArgs*>args)


cdef void schedule_free_y_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    schedule_free_y_elements(<double*>rows[0] + start, <const double*>rows[1] + start,
                             <const double*>rows[2] + start, n, <const ScheduleFreeArgs*>args)


cdef void schedule_free_adamw_args(ScheduleFreeArgs* a, double lr, double weight_decay, bint decay_at_z,
                                   double beta1, double beta2, double bias_correction2, double eps, double ckp1,
                                   double grad_scale) noexcept nogil:
    a.lr = lr
    a.lr_decay = lr * weight_decay
    a.weight_decay = weight_decay
    a.beta = beta1
    a.beta2 = beta2
    a.bias_correction2 = bias_correction2
    a.eps = eps
    a.ckp1 = ckp1
    a.grad_scale = grad_scale
    a.has_weight_decay = weight_decay != 0.0
    a.decay_at_z = decay_at_z


def schedule_free_adamw(list params not None, list grads not None, list z not None, list exp_avg_sq not None,
                        list x not None, *, double lr, double weight_decay, bint decay_at_z, double beta1, double beta2,
                        double bias_correction2, double eps, double ckp1, double grad_scale, int n_threads):
    """Fused Schedule-Free AdamW step over many tensors (private: call
    ``fastdescent.schedule_free_adamw_step``).

    ``params`` hold y; ``lr`` is this step's rate (after warmup), ``ckp1`` its
    averaging weight and ``bias_correction2`` = 1 - beta2**step, all from the face.
    The decay ``lr * weight_decay`` pulls z toward 0 from y (or from z if
    ``decay_at_z``). ``grad_scale`` multiplies every gradient and carries the sign
    for ``maximize``.
    """
    cdef ScheduleFreeArgs a
    schedule_free_adamw_args(&a, lr, weight_decay, decay_at_z, beta1, beta2, bias_correction2, eps, ckp1, grad_scale)
    run_kernel((params, grads, z, x, exp_avg_sq), n_threads, schedule_free_adamw_segment_f32,
               schedule_free_adamw_segment_f64, &a)


cdef void schedule_free_sgd_args(ScheduleFreeArgs* a, double lr, double weight_decay, double momentum, double ckp1,
                                 double grad_scale) noexcept nogil:
    a.lr = lr
    a.weight_decay = weight_decay
    a.beta = momentum
    a.ckp1 = ckp1
    a.grad_scale = grad_scale
    a.has_weight_decay = weight_decay != 0.0


def schedule_free_sgd(list params not None, list grads not None, list z not None, list x not None, *,
                      double lr, double weight_decay, double momentum, double ckp1, double grad_scale, int n_threads):
    """Fused Schedule-Free SGD step over many tensors (private: call
    ``fastdescent.schedule_free_sgd_step``).

    ``params`` hold y; ``lr`` is this step's rate (after warmup) and ``ckp1`` its
    averaging weight, from the face. ``weight_decay`` is added to the gradient
    times y. ``grad_scale`` multiplies every gradient and carries the sign for
    ``maximize``.
    """
    cdef ScheduleFreeArgs a
    schedule_free_sgd_args(&a, lr, weight_decay, momentum, ckp1, grad_scale)
    run_kernel((params, grads, z, x), n_threads, schedule_free_sgd_segment_f32, schedule_free_sgd_segment_f64, &a)


def schedule_free_y(list params not None, list x not None, list z not None, *, double beta, int n_threads):
    """``params = beta*x + (1 - beta)*z``, the y of a Schedule-Free step, computed as
    the step computes it (private: the optimizers' ``train()``)."""
    cdef ScheduleFreeArgs a
    a.beta = beta
    run_kernel((params, x, z), n_threads, schedule_free_y_segment_f32, schedule_free_y_segment_f64, &a)


cdef int schedule_free_adamw_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef ScheduleFreeArgs a
    schedule_free_adamw_args(&a, s[0], s[1], s[2] != 0.0, s[3], s[4], s[5], s[6], s[7], s[8])
    return run_direct(call, schedule_free_adamw_segment_f32, schedule_free_adamw_segment_f64, &a)


register_direct(schedule_free_adamw, schedule_free_adamw_direct,
                roles=("params", "grads", "z", "x", "exp_avg_sq"))  # as run_kernel takes them


cdef int schedule_free_sgd_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef ScheduleFreeArgs a
    schedule_free_sgd_args(&a, s[0], s[1], s[2], s[3], s[4])
    return run_direct(call, schedule_free_sgd_segment_f32, schedule_free_sgd_segment_f64, &a)


register_direct(schedule_free_sgd, schedule_free_sgd_direct)
