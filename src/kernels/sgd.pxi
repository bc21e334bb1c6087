# SGD, SGD with momentum (PyTorch's and the classical convention) and Nesterov
# momentum: one pass reading param, grad (and the momentum buffer), writing param
# (and the buffer). Equations and conventions: fastdescent.rules.sgd.sgd_step.
# Reference twin: fastdescent/reference/sgd.py (same operations, same order).

cdef struct SGDArgs:
    double lr
    double grad_scale          # already negated for maximize
    double weight_decay
    double momentum
    double dampening
    bint has_weight_decay
    bint nesterov
    bint classical             # v = mu*v - lr*g; p += v  (else PyTorch's form)
    bint first_step            # PyTorch form: the buffer starts as the first gradient


cdef inline void sgd_elements(floating* p, const floating* g, floating* buf, Py_ssize_t n,
                              const SGDArgs* a) noexcept nogil:
    # Scalars rounded to the buffer dtype once, as NumPy does with a Python float.
    cdef floating lr = <floating>a.lr, scale = <floating>a.grad_scale
    cdef floating wd = <floating>a.weight_decay, mu = <floating>a.momentum
    cdef floating keep = <floating>(1.0 - a.dampening)
    cdef bint has_wd = a.has_weight_decay, nesterov = a.nesterov, first = a.first_step
    cdef floating d, v
    cdef Py_ssize_t i
    if buf == NULL:
        for i in range(n):
            d = scale * g[i]
            if has_wd:
                d = d + wd * p[i]
            p[i] = p[i] - lr * d
    elif a.classical:
        for i in range(n):
            d = scale * g[i]
            if has_wd:
                d = d + wd * p[i]
            v = mu * buf[i] - lr * d
            buf[i] = v
            if nesterov:
                p[i] = p[i] + (mu * v - lr * d)
            else:
                p[i] = p[i] + v
    else:
        for i in range(n):
            d = scale * g[i]
            if has_wd:
                d = d + wd * p[i]
            if first:
                v = d
            else:
                v = mu * buf[i] + keep * d
            buf[i] = v
            if nesterov:
                d = d + mu * v
            else:
                d = v
            p[i] = p[i] - lr * d


cdef void sgd_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    sgd_elements(<float*>rows[0] + start, <const float*>rows[1] + start,
                 (<float*>rows[2] + start) if rows[2] != NULL else NULL, n, <const SGDArgs*>args)


cdef void sgd_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    sgd_elements(<double*>rows[0] + start, <const double*>rows[1] + start,
                 (<double*>rows[2] + start) if rows[2] != NULL else NULL, n, <const SGDArgs*>args)


cdef void sgd_args(SGDArgs* a, double lr, double grad_scale, double weight_decay, double momentum,
                   double dampening, bint nesterov, bint classical, bint first_step) noexcept nogil:
    a.lr = lr
    a.grad_scale = grad_scale
    a.weight_decay = weight_decay
    a.momentum = momentum
    a.dampening = dampening
    a.has_weight_decay = weight_decay != 0.0
    a.nesterov = nesterov
    a.classical = classical
    a.first_step = first_step


def sgd(list params not None, list grads not None, momentum_buffer=None, *, double lr, double grad_scale,
        double weight_decay, double momentum, double dampening, bint nesterov,
        bint classical, bint first_step, int n_threads):
    """Fused SGD step over many tensors (private: call ``fastdescent.sgd_step``).

    ``momentum_buffer`` is a list (one array per tensor), or None for plain SGD (then ``momentum`` is
    ignored). ``grad_scale`` multiplies every gradient and carries the sign for
    ``maximize``.
    """
    cdef SGDArgs a
    sgd_args(&a, lr, grad_scale, weight_decay, momentum, dampening, nesterov, classical, first_step)
    run_kernel((params, grads, momentum_buffer), n_threads, sgd_segment_f32, sgd_segment_f64, &a)


cdef int sgd_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef SGDArgs a
    sgd_args(&a, s[0], s[1], s[2], s[3], s[4], s[5] != 0.0, s[6] != 0.0, s[7] != 0.0)
    return run_direct(call, sgd_segment_f32, sgd_segment_f64, &a)


register_direct(sgd, sgd_direct)
