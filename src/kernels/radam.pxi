# RAdam (rectified Adam), with coupled or decoupled weight decay: one pass reading
# param, grad, exp_avg and exp_avg_sq, writing all but the grad. Whether the step is
# rectified depends on the step number only, so it is one flag per call.
# Equations: fastdescent.rules.radam.radam_step. Reference twin:
# fastdescent/reference/radam.py (same operations, same order).

cdef struct RAdamArgs:
    double step_size           # lr / bias_correction1, times r_t sqrt(bias_correction2) if rectified
    double beta1
    double beta2
    double eps
    double weight_decay
    double param_decay         # 1 - lr * weight_decay, used iff decoupled
    double grad_scale          # already negated for maximize
    bint rectified             # rho_t > 5: the adaptive step; else momentum SGD
    bint decoupled
    bint has_weight_decay      # coupled (L2) decay: added to the gradient


cdef inline void radam_elements(floating* p, const floating* g, floating* m, floating* v,
                                Py_ssize_t n, const RAdamArgs* a) noexcept nogil:
    cdef floating step_size = <floating>a.step_size, eps = <floating>a.eps
    cdef floating scale = <floating>a.grad_scale, wd = <floating>a.weight_decay, decay = <floating>a.param_decay
    cdef Lerp toward = lerp_toward(a.beta1)
    cdef floating w1 = <floating>toward.weight, w1_rest = <floating>(1.0 - toward.weight)
    cdef floating keep2 = <floating>a.beta2, w2 = <floating>(1.0 - a.beta2)
    cdef bint from_end = toward.from_end, decoupled = a.decoupled, rectified = a.rectified
    cdef bint has_wd = a.has_weight_decay and not decoupled
    cdef floating x, d, mean, sq
    cdef Py_ssize_t i
    for i in range(n):
        x = p[i]
        if decoupled:
            x = x * decay
        d = scaled_grad(g[i], x, scale, wd, has_wd)
        mean = lerp(m[i], d, w1, w1_rest, from_end)
        m[i] = mean
        sq = average_square(v[i], d, keep2, w2)
        v[i] = sq
        if rectified:
            p[i] = x - (step_size * mean) / (root(sq) + eps)
        else:
            p[i] = x - step_size * mean


cdef void radam_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    radam_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                   <float*>rows[3] + start, n, <const RAdamArgs*>args)


cdef void radam_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    radam_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                   <double*>rows[3] + start, n, <const RAdamArgs*>args)


cdef void radam_args(RAdamArgs* a, double lr, double step_size, bint rectified, double beta1, double beta2,
                     double eps, double weight_decay, bint decoupled, double grad_scale) noexcept nogil:
    a.step_size = step_size
    a.beta1 = beta1
    a.beta2 = beta2
    a.eps = eps
    a.weight_decay = weight_decay
    a.param_decay = 1.0 - lr * weight_decay
    a.grad_scale = grad_scale
    a.rectified = rectified
    a.decoupled = decoupled and weight_decay != 0.0
    a.has_weight_decay = weight_decay != 0.0


def radam(list params not None, list grads not None, list exp_avg not None, list exp_avg_sq not None, *,
          double lr, double step_size, bint rectified, double beta1, double beta2, double eps,
          double weight_decay, bint decoupled, double grad_scale, int n_threads):
    """Fused RAdam step over many tensors (private: call ``fastdescent.radam_step``).

    ``rectified`` and ``step_size`` (lr / bias_correction1, times the rectification
    and sqrt(bias_correction2) when ``rectified``) come from the face. ``decoupled``
    selects AdamW's weight decay, ``p *= 1 - lr * weight_decay``; else it is added
    to the gradient. Each buffer is a list with one array per tensor, named as the
    optimizer's state. ``grad_scale`` multiplies every gradient and carries the
    sign for ``maximize``.
    """
    cdef RAdamArgs a
    radam_args(&a, lr, step_size, rectified, beta1, beta2, eps, weight_decay, decoupled, grad_scale)
    run_kernel((params, grads, exp_avg, exp_avg_sq), n_threads, radam_segment_f32, radam_segment_f64, &a)


cdef int radam_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef RAdamArgs a
    radam_args(&a, s[0], s[1], s[2] != 0.0, s[3], s[4], s[5], s[6], s[7] != 0.0, s[8])
    return run_direct(call, radam_segment_f32, radam_segment_f64, &a)


register_direct(radam, radam_direct)
