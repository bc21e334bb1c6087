# Adadelta: one pass reading param, grad, square_avg and acc_delta, writing all but
# the grad.
# Equations: fastdescent.rules.adadelta.adadelta_step. Reference twin:
# fastdescent/reference/adadelta.py (same operations, same order).

cdef struct AdadeltaArgs:
    double lr
    double rho
    double eps
    double weight_decay
    double grad_scale          # already negated for maximize
    bint has_weight_decay


cdef inline void adadelta_elements(floating* p, const floating* g, floating* sq, floating* acc,
                                   Py_ssize_t n, const AdadeltaArgs* a) noexcept nogil:
    cdef floating lr = <floating>a.lr, eps = <floating>a.eps
    cdef floating scale = <floating>a.grad_scale, wd = <floating>a.weight_decay
    cdef floating keep = <floating>a.rho, w = <floating>(1.0 - a.rho)
    cdef bint has_wd = a.has_weight_decay
    cdef floating d, s, delta
    cdef Py_ssize_t i
    for i in range(n):
        d = scaled_grad(g[i], p[i], scale, wd, has_wd)
        s = average_square(sq[i], d, keep, w)
        sq[i] = s
        delta = root(acc[i] + eps) / root(s + eps) * d
        acc[i] = average_square(acc[i], delta, keep, w)
        p[i] = p[i] - lr * delta


cdef void adadelta_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    adadelta_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                      <float*>rows[3] + start, n, <const AdadeltaArgs*>args)


cdef void adadelta_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    adadelta_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                      <double*>rows[3] + start, n, <const AdadeltaArgs*>args)


cdef void adadelta_args(AdadeltaArgs* a, double lr, double rho, double eps, double weight_decay,
                        double grad_scale) noexcept nogil:
    a.lr = lr
    a.rho = rho
    a.eps = eps
    a.weight_decay = weight_decay
    a.grad_scale = grad_scale
    a.has_weight_decay = weight_decay != 0.0


def adadelta(list params not None, list grads not None, list square_avg not None, list acc_delta not None, *,
             double lr, double rho, double eps, double weight_decay, double grad_scale, int n_threads):
    """Fused Adadelta step over many tensors (private: call ``fastdescent.adadelta_step``).

    Each buffer is a list with one array per tensor, named as the optimizer's
    state. ``grad_scale`` multiplies every gradient and carries the sign for
    ``maximize``.
    """
    cdef AdadeltaArgs a
    adadelta_args(&a, lr, rho, eps, weight_decay, grad_scale)
    run_kernel((params, grads, square_avg, acc_delta), n_threads, adadelta_segment_f32, adadelta_segment_f64, &a)


cdef int adadelta_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef AdadeltaArgs a
    adadelta_args(&a, s[0], s[1], s[2], s[3], s[4])
    return run_direct(call, adadelta_segment_f32, adadelta_segment_f64, &a)


register_direct(adadelta, adadelta_direct)
