# Lion (EvoLved Sign Momentum): one pass reading param, grad and exp_avg, writing
# param and exp_avg (20 bytes per float32 element, Adam moves 28).
# Equations: fastdescent.rules.lion.lion_step. Reference twin:
# fastdescent/reference/lion.py (same operations, same order).

cdef struct LionArgs:
    double lr
    double beta1
    double beta2
    double weight_decay
    double grad_scale              # already negated for maximize
    bint has_weight_decay


cdef inline floating sign_of(floating c) noexcept nogil:
    """NumPy's sign: 1, -1, +0 for either zero, and NaN for NaN (so a NaN in the
    momentum reaches the parameter instead of freezing it)."""
    if c > 0:
        return 1
    if c < 0:
        return -1
    if c == 0:
        return 0
    return c


cdef inline void lion_elements(floating* p, const floating* g, floating* m, Py_ssize_t n,
                               const LionArgs* a) noexcept nogil:
    cdef floating lr = <floating>a.lr, scale = <floating>a.grad_scale, wd = <floating>a.weight_decay
    cdef floating b1 = <floating>a.beta1, w1 = <floating>(1.0 - a.beta1)
    cdef floating b2 = <floating>a.beta2, w2 = <floating>(1.0 - a.beta2)
    cdef bint has_wd = a.has_weight_decay
    cdef floating d, mean, u, x
    cdef Py_ssize_t i
    for i in range(n):
        d = scale * g[i]
        mean = m[i]
        u = sign_of(b1 * mean + w1 * d)
        x = p[i]
        if has_wd:
            u = u + wd * x
        p[i] = x - lr * u
        m[i] = b2 * mean + w2 * d


cdef void lion_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    lion_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                  n, <const LionArgs*>args)


cdef void lion_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    lion_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                  n, <const LionArgs*>args)


cdef void lion_args(LionArgs* a, double lr, double beta1, double beta2, double weight_decay,
                    double grad_scale) noexcept nogil:
    a.lr = lr
    a.beta1 = beta1
    a.beta2 = beta2
    a.weight_decay = weight_decay
    a.grad_scale = grad_scale
    a.has_weight_decay = weight_decay != 0.0


def lion(list params not None, list grads not None, list exp_avg not None, *, double lr, double beta1,
         double beta2, double weight_decay, double grad_scale, int n_threads):
    """Fused Lion step over many tensors (private: call ``fastdescent.lion_step``).

    ``exp_avg`` is a list with one array per tensor (the momentum). ``grad_scale``
    multiplies every gradient and carries the sign for ``maximize``.
    """
    cdef LionArgs a
    lion_args(&a, lr, beta1, beta2, weight_decay, grad_scale)
    run_kernel((params, grads, exp_avg), n_threads, lion_segment_f32, lion_segment_f64, &a)


cdef int lion_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef LionArgs a
    lion_args(&a, s[0], s[1], s[2], s[3], s[4])
    return run_direct(call, lion_segment_f32, lion_segment_f64, &a)


register_direct(lion, lion_direct)
