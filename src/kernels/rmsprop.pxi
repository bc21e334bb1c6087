# RMSprop, plain or centered, with or without momentum: one pass reading param,
# grad and the state the options need, writing param and that state. Each buffer
# combination has its own loop, so no loop touches an absent (NULL) buffer.
# Equations: fastdescent.rules.rmsprop.rmsprop_step. Reference twin:
# fastdescent/reference/rmsprop.py (same operations, same order).

cdef struct RMSpropArgs:
    double lr
    double alpha
    double eps
    double weight_decay
    double momentum
    double grad_scale          # already negated for maximize
    bint has_weight_decay


cdef inline void rmsprop_elements(floating* p, const floating* g, floating* sq, floating* buf,
                                  floating* avg, Py_ssize_t n, const RMSpropArgs* a) noexcept nogil:
    cdef floating lr = <floating>a.lr, eps = <floating>a.eps, mu = <floating>a.momentum
    cdef floating scale = <floating>a.grad_scale, wd = <floating>a.weight_decay
    cdef floating keep = <floating>a.alpha
    cdef Lerp toward = lerp_toward(a.alpha)
    cdef floating w = <floating>toward.weight, w_rest = <floating>(1.0 - toward.weight)
    cdef bint from_end = toward.from_end, has_wd = a.has_weight_decay
    cdef floating d, s, ga, root_mean
    cdef Py_ssize_t i
    if avg == NULL and buf == NULL:
        for i in range(n):
            d = scaled_grad(g[i], p[i], scale, wd, has_wd)
            s = average_square(sq[i], d, keep, w)
            sq[i] = s
            p[i] = p[i] - (lr * d) / (root(s) + eps)
    elif avg == NULL:
        for i in range(n):
            d = scaled_grad(g[i], p[i], scale, wd, has_wd)
            s = average_square(sq[i], d, keep, w)
            sq[i] = s
            s = mu * buf[i] + d / (root(s) + eps)
            buf[i] = s
            p[i] = p[i] - lr * s
    elif buf == NULL:
        for i in range(n):
            d = scaled_grad(g[i], p[i], scale, wd, has_wd)
            s = average_square(sq[i], d, keep, w)
            sq[i] = s
            ga = lerp(avg[i], d, w, w_rest, from_end)
            avg[i] = ga
            p[i] = p[i] - (lr * d) / (root(s - ga * ga) + eps)
    else:
        for i in range(n):
            d = scaled_grad(g[i], p[i], scale, wd, has_wd)
            s = average_square(sq[i], d, keep, w)
            sq[i] = s
            ga = lerp(avg[i], d, w, w_rest, from_end)
            avg[i] = ga
            s = mu * buf[i] + d / (root(s - ga * ga) + eps)
            buf[i] = s
            p[i] = p[i] - lr * s


cdef void rmsprop_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    rmsprop_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                     (<float*>rows[3] + start) if rows[3] != NULL else NULL,
                     (<float*>rows[4] + start) if rows[4] != NULL else NULL,
                     n, <const RMSpropArgs*>args)


cdef void rmsprop_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    rmsprop_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                     (<double*>rows[3] + start) if rows[3] != NULL else NULL,
                     (<double*>rows[4] + start) if rows[4] != NULL else NULL,
                     n, <const RMSpropArgs*>args)


cdef void rmsprop_args(RMSpropArgs* a, double lr, double alpha, double eps, double weight_decay, double momentum,
                       double grad_scale) noexcept nogil:
    a.lr = lr
    a.alpha = alpha
    a.eps = eps
    a.weight_decay = weight_decay
    a.momentum = momentum
    a.grad_scale = grad_scale
    a.has_weight_decay = weight_decay != 0.0


def rmsprop(list params not None, list grads not None, list square_avg not None, momentum_buffer=None,
            grad_avg=None, *,
            double lr, double alpha, double eps, double weight_decay, double momentum,
            double grad_scale, int n_threads):
    """Fused RMSprop step over many tensors (private: call ``fastdescent.rmsprop_step``).

    ``momentum_buffer`` (momentum) and ``grad_avg`` (centered) are lists or None;
    ``momentum`` is ignored without buffers. ``grad_scale`` multiplies every
    gradient and carries the sign for ``maximize``.
    """
    cdef RMSpropArgs a
    rmsprop_args(&a, lr, alpha, eps, weight_decay, momentum, grad_scale)
    run_kernel((params, grads, square_avg, momentum_buffer, grad_avg), n_threads,
               rmsprop_segment_f32, rmsprop_segment_f64, &a)


cdef int rmsprop_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef RMSpropArgs a
    rmsprop_args(&a, s[0], s[1], s[2], s[3], s[4], s[5])
    return run_direct(call, rmsprop_segment_f32, rmsprop_segment_f64, &a)


register_direct(rmsprop, rmsprop_direct)
