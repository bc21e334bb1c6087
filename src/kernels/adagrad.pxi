# Adagrad: one pass reading param, grad and the sum of squares, writing param and
# the sum. Equations: fastdescent.rules.adagrad.adagrad_step. Reference twin:
# fastdescent/reference/adagrad.py (same operations, same order).

cdef struct AdagradArgs:
    double clr                 # lr / (1 + (step - 1) * lr_decay), from the face
    double grad_scale          # already negated for maximize
    double weight_decay
    double eps
    bint has_weight_decay


cdef inline void adagrad_elements(floating* p, const floating* g, floating* s, Py_ssize_t n,
                                  const AdagradArgs* a) noexcept nogil:
    cdef floating clr = <floating>a.clr, scale = <floating>a.grad_scale
    cdef floating wd = <floating>a.weight_decay, eps = <floating>a.eps
    cdef bint has_wd = a.has_weight_decay
    cdef floating d, sum_sq
    cdef Py_ssize_t i
    for i in range(n):
        d = scaled_grad(g[i], p[i], scale, wd, has_wd)
        sum_sq = s[i] + d * d
        s[i] = sum_sq
        p[i] = p[i] - (clr * d) / (root(sum_sq) + eps)


cdef void adagrad_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    adagrad_elements(<float*>rows[0] + start, <const float*>rows[1] + start,
                     <float*>rows[2] + start, n, <const AdagradArgs*>args)


cdef void adagrad_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    adagrad_elements(<double*>rows[0] + start, <const double*>rows[1] + start,
                     <double*>rows[2] + start, n, <const AdagradArgs*>args)


cdef void adagrad_args(AdagradArgs* a, double clr, double grad_scale, double weight_decay, double eps) noexcept nogil:
    a.clr = clr
    a.grad_scale = grad_scale
    a.weight_decay = weight_decay
    a.eps = eps
    a.has_weight_decay = weight_decay != 0.0


def adagrad(list params not None, list grads not None, list sum not None, *, double clr,
            double grad_scale, double weight_decay, double eps, int n_threads):
    """Fused Adagrad step over many tensors (private: call ``fastdescent.adagrad_step``).

    ``clr`` is the step's decayed learning rate; ``grad_scale`` multiplies every
    gradient and carries the sign for ``maximize``.
    """
    cdef AdagradArgs a
    adagrad_args(&a, clr, grad_scale, weight_decay, eps)
    run_kernel((params, grads, sum), n_threads, adagrad_segment_f32, adagrad_segment_f64, &a)


cdef int adagrad_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef AdagradArgs a
    adagrad_args(&a, s[0], s[1], s[2], s[3])
    return run_direct(call, adagrad_segment_f32, adagrad_segment_f64, &a)


register_direct(adagrad, adagrad_direct)
